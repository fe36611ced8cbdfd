"""The one seam: token reduction inside timm's ViT blocks, at one of three places.

ToMe, EViT, DiffRate and random pruning all act at the same place: after a block's attention
residual, before its MLP (stage ``"mid"``). The harness patches the blocks once (:func:`install`);
methods supply a *reducer* ``(x, ctx) -> x`` per block and never copy a timm forward. Two other
places (:data:`STAGES`) serve methods whose papers reduce elsewhere: ``"pre"``, before the block's
attention (MCTF's one-step-ahead attention, :mod:`harness.seam.lookahead`), and ``"post"``, after
the block's MLP residual (DCT's low-pass filter). One method uses one stage (``Method.stage``); its
schedule carries it (``Schedule.stage``), and the GMACs convention follows it.

The package, downhill:

 - :mod:`~harness.seam.state`: the :class:`TokenState` a patched model carries from block to block
   (sizes, positions, observed counts) and the names of the seam's choices;
 - :mod:`~harness.seam.families`: one adapter per timm block family (ViT, EVA / rope, BEiT, relpos):
   how it gets q, k, v, its position term and its layer scale;
 - :mod:`~harness.seam.attend`: ``attend(q, k, v, bias, impl)``, used by every family, with the three
   ways proportional attention reaches the kernel ("mask", "fold", "flex"), and ``policy_attention``
   for tokens masked rather than dropped (``TokenState.policy``: DynamicViT while it trains);
 - :mod:`~harness.seam.context`: the :class:`BlockContext` a reducer reads (keys, class attention,
   attention probabilities, values, the block's input), derived lazily, once;
 - :mod:`~harness.seam.ops`: the operations methods share (keep / gather with positions, bipartite
   matching, size-weighted merge, class-attention split, drop-block placement);
 - :mod:`~harness.seam.premises`: the prefix layout and the premises checked where they are used;
 - :mod:`~harness.seam.forward`: the one block forward, reducer before / between / after the branches.

What is kept from current timm: the block's own submodules run unchanged (LayerScale, q/k-norm,
fused ``scaled_dot_product_attention``, drop-path), prefix tokens (class, distillation, registers)
are handed to reducers as ``ctx.num_prefix`` so they are never dropped, and per-token sizes feed
proportional attention (log size added to every key's logits).

Every reducer is held to static shapes and no host syncs (``tests/test_compile.py``): the forward
must compile with ``torch.compile(fullgraph=True)``. Token maps, FLOP counting and profilers reach
a patched model's reducers through :func:`block_reducers` and :func:`wrap_reducers` (profilers
its attention branch through :func:`wrap_attention`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from harness.errors import UnsupportedModel
from harness.seam.attend import (PROP_ATTN_KERNELS, attend, attend_explicitly, eager_attention, flex_attention_bias,
                                 fold_attention, policy_attention)
from harness.seam.context import BlockContext, Reducer
from harness.seam.families import (ADAPTERS, FAMILIES, POSITION_FAMILIES, block_family, check_blocks,
                                   gather_pair_bias, gather_rope, split_heads)
from harness.seam.forward import REDUCER_ATTR, BlockSeam, patch_block
from harness.seam.lookahead import one_step_ahead_probs
from harness.seam.ops import (attentive_split, bipartite_soft_matching, chosen_blocks, clamp_r, current_positions, drop_blocks,
                              gather_tokens, keep_all, keep_tokens, merge_positions, merge_tokens, merge_wavg, num_keep,
                              shrinking_blocks, top_attentive)
from harness.seam.premises import (SIZE_AWARE_POOLS, PrefixLayout, check_premises, prefix_layout,
                                   size_weighted_head)
from harness.seam.state import (PROP_ATTN_IMPLS, STAGES, TokenState, attention_bias, check_impl, log_size)

__all__ = [
    "ADAPTERS", "FAMILIES", "POSITION_FAMILIES", "PROP_ATTN_IMPLS", "PROP_ATTN_KERNELS", "SIZE_AWARE_POOLS", "STAGES",
    "BlockContext", "PrefixLayout", "Reducer", "TokenState", "attend", "attend_explicitly", "attentive_split", "attention_bias", "bipartite_soft_matching",
    "block_family", "block_reducers", "check_blocks", "check_premises", "chosen_blocks", "clamp_r",
    "current_positions", "drop_blocks", "eager_attention", "flex_attention_bias", "fold_attention",
    "gather_pair_bias", "gather_rope", "gather_tokens", "install", "keep_all", "keep_tokens", "log_size",
    "merge_positions", "merge_tokens", "merge_wavg", "num_keep", "one_step_ahead_probs", "policy_attention", "prefix_layout",
    "set_prop_attn_impl", "shrinking_blocks",
    "split_heads", "token_state", "top_attentive", "wrap_attention", "wrap_reducers",
]


def install(model: torch.nn.Module, reducers: dict[int, Reducer], prop_attn: bool = False,
            capture_qkv: bool = True, prop_attn_impl: str = "mask", needs_class_token: bool = False,
            merges: bool = False, method: str = "this method", stage: str = "mid",
            tracks_positions: bool = False, attention_map: bool = False) -> TokenState:
    """Patch ``model`` in place so ``reducers[i]`` runs in block i at ``stage`` (between attention and MLP).

    Args:
        model: a fresh timm ViT (``Block``, ``EvaBlock``, BEiT or relpos blocks; :func:`block_family`).
        reducers: block index -> reducer; blocks without one run as in timm.
        prop_attn: add log(token size) to attention logits once tokens carry sizes.
        capture_qkv: kept for callers of earlier versions; every reducing block hands its context
            the q, k and v it computed anyway.
        prop_attn_impl: how log(size) reaches the attention kernel ("mask", "fold", "flex"; :mod:`~harness.seam.attend`).
        needs_class_token / merges / tracks_positions: the method's declared premises
            (:func:`check_premises`): it reads ``ctx.cls_attn()``; it merges tokens (the head must
            pool by size); it keeps ``state.positions`` in sync (:func:`keep_tokens`,
            :func:`merge_positions`), required on EVA / rope, BEiT and relpos blocks.
        method: the method's name, for the refusal's message.
        stage: where every reducer runs (:data:`STAGES`): "pre", "mid" (the default) or "post".
        attention_map: the reducers read the block's attention map (``ctx.attention()``) in every
            block: each reducing block forms it once, explicitly (timm's eager attention), and the
            reducer gets that map, instead of a fused kernel and a second q kᵀ and softmax.

    Returns the TokenState the patched model carries (sizes, positions, observed counts). Raises
    :class:`UnsupportedModel` for blocks the seam does not know or a premise the model cannot give.
    """
    family = _check_supported(model)
    if reducers:  # the identity knob patches nothing a premise could fail
        check_premises(model, method, needs_class_token, merges, tracks_positions)
    check_impl(prop_attn_impl)
    _check_request(reducers, len(model.blocks), stage, family, method)
    layout = prefix_layout(model)
    state = TokenState(prop_attn=prop_attn, prop_attn_impl=prop_attn_impl, needs_positions=family in POSITION_FAMILIES,
                       class_token=layout.class_token, pool=layout.pool, method=method, attention_map=attention_map)
    model._seam_state = state
    for i, blk in enumerate(model.blocks):
        patch_block(blk, BlockSeam(i, model.num_prefix_tokens, stage, ADAPTERS[family], state), reducers.get(i))
    size_weighted_head(model)
    return state


def _check_supported(model: torch.nn.Module) -> str:
    family = check_blocks(model)
    if hasattr(model, "_seam_state"):
        raise RuntimeError("model is already patched; patch a fresh model")
    return family


def _check_request(reducers: dict, depth: int, stage: str, family: str, method: str) -> None:
    """Refuse a stage the seam does not know, one it cannot run on ``family``, blocks the model lacks."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choices: {', '.join(STAGES)}")
    if reducers and stage == "pre" and family != "vit":
        raise UnsupportedModel(f"{method} reduces before the attention (stage 'pre'), which the seam supports on "
                               f"timm's vision_transformer.Block only, not on {family} blocks")
    bad = [i for i in reducers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"reducer block indices {bad} outside 0..{depth - 1}")


def token_state(model: torch.nn.Module) -> Optional[TokenState]:
    """The :class:`TokenState` of a patched ``model`` (sizes, positions, observed counts), or None."""
    return getattr(model, "_seam_state", None)


def set_prop_attn_impl(model: torch.nn.Module, impl: str) -> None:
    """Choose how a patched ``model`` feeds proportional attention: "mask", "fold" or "flex".

    An unpatched model has no proportional attention: nothing to set. The choice changes kernels,
    not results (to float rounding).
    """
    check_impl(impl)
    state = token_state(model)
    if state is not None:
        state.prop_attn_impl = impl


def block_reducers(model: torch.nn.Module) -> dict[int, Reducer]:
    """Block index -> reducer of each block of a patched ``model`` that has one."""
    found = {i: getattr(blk, REDUCER_ATTR, None) for i, blk in enumerate(getattr(model, "blocks", []))}
    return {i: reducer for i, reducer in found.items() if reducer is not None}


def wrap_attention(model: torch.nn.Module, wrap: Callable[[Callable], Callable]) -> None:
    """Wrap the attention branch of every block of a patched ``model`` (e.g. in a profiler label).

    The seam composes a block's attention once the block reduces or a reduction reached it; until
    then the block runs timm's forward, which calls ``blk.attn`` (wrap that too to see both).
    """
    for blk in getattr(model, "blocks", []):
        if hasattr(blk, "_seam"):  # an unpatched model (the baseline) has no seam to wrap
            blk._seam.attention = wrap(blk._seam.attention)


def wrap_reducers(model: torch.nn.Module, wrap: Callable[[int, Optional[Reducer]], Optional[Reducer]],
                  every_block: bool = False) -> Callable[[], None]:
    """Replace each reducer of a patched ``model`` by ``wrap(index, reducer)``; returns the undo.

    Args:
        wrap: block index and its reducer -> the reducer to run instead. An ``nn.Module`` becomes a
            submodule of the block, so tracers scope its ops as ``blocks.<i>._seam_reducer``.
        every_block: also wrap blocks without a reducer (``wrap`` receives None), e.g. to record
            what every block leaves.
    """
    blocks = [(i, blk, getattr(blk, REDUCER_ATTR)) for i, blk in enumerate(model.blocks) if hasattr(blk, "_seam")]
    blocks = [entry for entry in blocks if every_block or entry[2] is not None]
    for i, blk, reducer in blocks:
        setattr(blk, REDUCER_ATTR, wrap(i, reducer))

    def undo() -> None:
        for _, blk, reducer in blocks:
            delattr(blk, REDUCER_ATTR)  # drops a module wrapper; the plain reducer goes back
            setattr(blk, REDUCER_ATTR, reducer)

    return undo
