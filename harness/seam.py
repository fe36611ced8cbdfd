"""The one seam: token reduction between attention and MLP in timm's ViT ``Block``.

ToMe, EViT, DiffRate and random pruning all act at the same place: after a block's attention
residual, before its MLP. The harness patches that place once; methods supply a *reducer*
``(x, ctx) -> x`` per block and never copy a timm forward.

What is kept from current timm: the block's own submodules run unchanged (LayerScale, q/k-norm,
fused ``scaled_dot_product_attention``, drop-path), prefix tokens (class, distillation, registers)
are handed to reducers as ``ctx.num_prefix`` so they are never dropped, and per-token sizes feed
proportional attention as an additive float mask, which SDPA accepts without the eager path.

Reducers read what the block just computed through ``ctx``: ``ctx.keys()`` (keys averaged over
heads, ToMe's metric) and ``ctx.cls_attn()`` (the class token's attention row, EViT's and
DiffRate's score). Both are derived lazily from the qkv projection the block already ran, so only
blocks that ask pay: a 1 x N attention row, not the eager N x N matrix.
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from harness.errors import UnsupportedModel

log = logging.getLogger(__name__)


@dataclass
class TokenState:
    """What a patched model carries from block to block during one forward pass.

    Attributes:
        size: (B, N, 1) number of patches each token stands for, or None while nothing merged.
        prop_attn: add log(size) to attention logits (proportional attention).
        recording: append the tokens leaving each block to ``observed`` (tests, token maps).
        observed: tokens leaving each block in the last forward, when recording.
    """

    prop_attn: bool = False
    size: Optional[torch.Tensor] = None
    recording: bool = False
    observed: list = field(default_factory=list)

    def reset(self) -> None:
        self.size = None
        self.observed = []


@dataclass
class BlockContext:
    """What a reducer sees of the block that just ran its attention."""

    index: int
    num_prefix: int
    state: TokenState
    block: torch.nn.Module
    qkv: Optional[torch.Tensor]

    def _split_qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qkv is None:
            raise RuntimeError("this block did not capture its qkv projection")
        attn = self.block.attn
        b, n, _ = self.qkv.shape
        qkv = self.qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])

    def keys(self) -> torch.Tensor:
        """Keys averaged over heads, (B, N, head_dim): ToMe's similarity metric."""
        return self._split_qk()[1].mean(1)

    def cls_attn(self) -> torch.Tensor:
        """The class token's attention over all tokens, averaged over heads: (B, N).

        Computed from the class query alone (B x H x 1 x N), with the same size bias the block's
        attention used, so it equals row 0 of the block's softmax attention.
        """
        q, k = self._split_qk()
        logits = (q[:, :, :1] * self.block.attn.scale) @ k.transpose(-2, -1)
        bias = attention_bias(self.state, logits.dtype)
        if bias is not None:
            logits = logits + bias
        return logits.float().softmax(-1).mean(1)[:, 0]


Reducer = Callable[[torch.Tensor, BlockContext], torch.Tensor]


def attention_bias(state: TokenState, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """log(size) as a (B, 1, 1, N) additive mask, or None when nothing was merged."""
    if not state.prop_attn or state.size is None:
        return None
    return state.size.log().to(dtype).transpose(1, 2).unsqueeze(1)


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast q/k are in the autocast dtype while the residual stream x stays fp32; SDPA
    # wants a float mask in the query's dtype.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens of ``x`` (B, N, C) at ``index`` (B, K): (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _seam_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    # The seam: timm's Block.forward with the reduction between its two residual branches.
    state: TokenState = self._seam_state
    if self._seam_index == 0:
        state.reset()
    bias = attention_bias(state, _attention_dtype(x))
    if bias is not None:
        attn_mask = bias if attn_mask is None else attn_mask + bias
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
    if self._seam_reducer is not None:
        ctx = BlockContext(self._seam_index, self._seam_num_prefix, state, self, self._seam_qkv)
        self._seam_qkv = None
        x = self._seam_reducer(x, ctx)
    if state.recording:
        state.observed.append(x.shape[1])
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return x


def _capture_qkv(block: torch.nn.Module) -> Callable:
    def hook(_module, _inputs, output):
        block._seam_qkv = output

    return hook


def _check_supported(model: torch.nn.Module) -> None:
    from timm.models.vision_transformer import Attention, Block

    if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
        raise UnsupportedModel(f"unsupported model {type(model).__name__}: not a timm VisionTransformer")
    for blk in model.blocks:
        if not isinstance(blk, Block) or type(blk).forward is not Block.forward:
            raise UnsupportedModel(f"unsupported block {type(blk).__name__}: the seam needs timm's vision_transformer.Block")
        if not isinstance(blk.attn, Attention) or not isinstance(getattr(blk.attn, "qkv", None), torch.nn.Linear):
            raise UnsupportedModel(f"unsupported attention {type(blk.attn).__name__}: the seam needs a fused qkv projection")
    if hasattr(model, "_seam_state"):
        raise RuntimeError("model is already patched; patch a fresh model")


def _size_weighted_head(model: torch.nn.Module) -> None:
    """Make average pooling weight each token by its size (MAE-style heads after merging)."""
    original = model.forward_head

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        size = self._seam_state.size
        if size is not None and self.global_pool == "avg" and getattr(self, "attn_pool", None) is None:
            start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
            w = size[:, start:]
            # mean(x * w * n / sum(w)) == sum(x * w) / sum(w): timm's own pooling then does the rest
            x = torch.cat([x[:, :start], x[:, start:] * (w * w.shape[1] / w.sum(1, keepdim=True)).to(x.dtype)], 1)
        return original(x, pre_logits=pre_logits)

    model.forward_head = types.MethodType(forward_head, model)


def install(model: torch.nn.Module, reducers: dict[int, Reducer], prop_attn: bool = False,
            capture_qkv: bool = True) -> TokenState:
    """Patch ``model`` in place so ``reducers[i]`` runs between block i's attention and MLP.

    Args:
        model: a fresh timm VisionTransformer (or subclass such as DeiT's distilled model).
        reducers: block index -> reducer; blocks without one run as in timm.
        prop_attn: add log(token size) to attention logits once tokens carry sizes.
        capture_qkv: keep the qkv projection of reduced blocks so ``ctx.keys()`` / ``ctx.cls_attn()`` work.

    Returns:
        The TokenState the patched model carries (sizes, observed counts).

    Raises:
        UnsupportedModel: the model is not a timm ViT made of standard Blocks.
    """
    _check_supported(model)
    depth = len(model.blocks)
    bad = [i for i in reducers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"reducer block indices {bad} outside 0..{depth - 1}")
    state = TokenState(prop_attn=prop_attn)
    model._seam_state = state
    for i, blk in enumerate(model.blocks):
        blk._seam_state = state
        blk._seam_index = i
        blk._seam_num_prefix = model.num_prefix_tokens
        blk._seam_reducer = reducers.get(i)
        blk._seam_qkv = None
        if capture_qkv and i in reducers:
            blk.attn.qkv.register_forward_hook(_capture_qkv(blk))
        blk.forward = types.MethodType(_seam_forward, blk)
    _size_weighted_head(model)
    return state

