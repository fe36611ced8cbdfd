"""The one block forward of every family, with the reduction before, between or after its branches.

Until a block has a reducer or a reducer ran before it, the block runs timm's own forward unchanged
(the identity knob is bit-identical). Otherwise the block is composed from its family's adapter
(:mod:`harness.seam.families`: q, k, v, position term, layer scale) and timm's own submodules
(norms, projections, MLP, drop-path), with :func:`~harness.seam.attend.attend` for every family, and
its reducer runs at its stage: ``"pre"`` (before the attention, :mod:`harness.seam.lookahead`),
``"mid"`` (between attention and MLP) or ``"post"`` (after the MLP).
"""
from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harness.seam.attend import attend, attend_explicitly, policy_attention
from harness.seam.context import BlockContext, Reducer
from harness.seam.families import BlockInputs, Family, project
from harness.seam.lookahead import attention_from_probs, reduce_ahead
from harness.seam.premises import checked_positions
from harness.seam.state import TokenState, attention_dtype, log_size

REDUCER_ATTR = "_seam_reducer"  # where a patched block keeps its reducer (a module there gets its own scope)


@dataclass
class BlockSeam:
    """What the seam keeps on one patched block: its place, its family and the model's state."""

    index: int
    num_prefix: int
    stage: str
    family: Family
    state: TokenState
    attention: Optional[Callable] = None  # the composed attention branch (default ``attention_branch``)


def patch_block(blk: torch.nn.Module, seam: BlockSeam, reducer: Optional[Reducer]) -> None:
    """Route ``blk``'s forward through the seam with ``reducer`` at ``seam.stage``."""
    blk._seam = seam
    seam.attention = seam.attention or attention_branch
    setattr(blk, REDUCER_ATTR, reducer)
    blk.forward = types.MethodType(seam_forward, blk)


def seam_forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                 is_causal: bool = False, shared_rel_pos_bias: Optional[torch.Tensor] = None,
                 shared_rel_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A patched block's forward (every family's arguments; each family uses its own)."""
    seam: BlockSeam = self._seam
    state = seam.state
    if seam.index == 0:
        state.reset()
    shared = shared_rel_pos_bias if shared_rel_pos_bias is not None else shared_rel_pos
    inputs = BlockInputs(rope, attn_mask, is_causal, shared)
    reducer = getattr(self, REDUCER_ATTR)
    if reducer is None and not state.reduced:
        x = seam.family.timm_forward(self, x, inputs)  # nothing reduced yet, nothing to reduce here
    else:
        x = _reducing_forward(self, seam, reducer, x, inputs)
    if state.recording:
        state.observed.append(x.shape[1])
    return x


def _reducing_forward(blk, seam: BlockSeam, reducer: Optional[Reducer], x: torch.Tensor,
                      inputs: BlockInputs) -> torch.Tensor:
    """The block from its parts, ``reducer`` at its stage."""
    family, state = seam.family, seam.state
    ctx = BlockContext(seam.index, seam.num_prefix, state, blk, None, block_input=x)
    if reducer is not None and seam.stage == "pre":
        x = reduce_ahead(blk, ctx, reducer, x)
    x = x + blk.drop_path1(family.layer_scale(blk, 1, seam.attention(blk, family, state, blk.norm1(x), inputs, ctx)))
    if reducer is not None and seam.stage == "mid":
        x = _reduce(reducer, x, ctx)
    ctx.mlp_input = x
    x = x + blk.drop_path2(family.layer_scale(blk, 2, blk.mlp(blk.norm2(x))))
    if reducer is not None and seam.stage == "post":
        x = _reduce(reducer, x, ctx)
    return x


def _reduce(reducer: Reducer, x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    out = reducer(x, ctx)
    return checked_positions(ctx.state, x.shape[1], out) if ctx.state.needs_positions else out


def attention_branch(blk, family: Family, state: TokenState, x: torch.Tensor, inputs: BlockInputs,
                     ctx: BlockContext) -> torch.Tensor:
    """The block's attention branch on its current (normed) tokens ``x``, with positions and sizes;
    fills ``ctx`` with the q, k, v and position bias it used."""
    attn = blk.attn
    if state.attn_probs is not None:  # a "pre" reducer's merged attention map (MCTF)
        probs, state.attn_probs = state.attn_probs, None
        return attention_from_probs(attn, x, probs)
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v, fused = project(attn, x)
    ctx.captured_qkv = fused if family.exposes_qkv else None
    q, k = family.rotate(attn, q, k, v, inputs, state.positions)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    ctx.q, ctx.k, ctx.v = q, k, v
    ctx.position_bias = mask = family.position_bias(attn, inputs, state.positions)
    if inputs.attn_mask is not None:
        mask = inputs.attn_mask if mask is None else mask + inputs.attn_mask
    if state.policy is not None:  # tokens masked, not dropped (DynamicViT's training)
        out = policy_attention(q, k, v, state.policy, mask, attn)
    elif forms_map(blk, state):
        out, ctx.attn_probs = attend_explicitly(q, k, v, log_size(state), mask, inputs.is_causal, attn)
    else:
        out = attend(q, k, v, log_size(state), state.prop_attn_impl, mask, inputs.is_causal, attn, attention_dtype(x))
    out = out.transpose(1, 2).reshape(b, n, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def forms_map(blk, state: TokenState) -> bool:
    """Whether ``blk`` forms its attention map explicitly and hands it to its reducer (``ctx.attention()``).

    timm's eager attention (``fused_attn=False``) forms the map anyway: keeping it costs nothing. A
    method whose reducers read the map in every block (``state.attention_map``) has its reducing
    blocks form it once, explicitly, rather than a fused kernel plus a second q kᵀ and softmax in
    the reducer. Blocks without a reducer keep their kernel.
    """
    if getattr(blk, REDUCER_ATTR, None) is None:
        return False
    return state.attention_map or not getattr(blk.attn, "fused_attn", True)
