"""A model's prefix layout and the premises a method may need of it, checked where they are used.

A method that ranks tokens by the class token's attention needs a class token at index 0; a merging
method needs a head whose pooling counts a merged token by its size; a model whose blocks need each
token's position (rotary embeddings, relative-position bias) needs reducers that keep
``state.positions`` in sync. Declarations (:func:`check_premises`) refuse early; the checks at use
(``ctx.cls_attn()``, the size-weighted head, :func:`checked_positions`) refuse whatever was declared.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from harness.errors import UnsupportedModel
from harness.seam.families import POSITION_FAMILIES, check_blocks
from harness.seam.state import TokenState


@dataclass(frozen=True)
class PrefixLayout:
    """The tokens a timm ViT puts before its patches, in timm's order: class, registers, distillation.

    Attributes:
        num_prefix: how many (``model.num_prefix_tokens``).
        class_token: token 0 is a class token (``model.cls_token``); without one, row 0 of the
            attention is a register's or the top-left patch's, not a class token's.
        registers: register tokens (``model.num_reg_tokens``).
        distillation: a distillation token (DeiT's distilled models).
        pool: the head's pooling (``model.global_pool``; "map" is an attention-pool head).
    """

    num_prefix: int
    class_token: bool
    registers: int
    distillation: bool
    pool: str


# poolings the seam makes size-aware (a merged token counted ``size`` times, as the blocks'
# proportional attention counts it): "token" reads the class token alone, which no method merges,
# and "avg" is weighted by size in :func:`size_weighted_head`
SIZE_AWARE_POOLS = ("token", "avg")


def prefix_layout(model: torch.nn.Module) -> PrefixLayout:
    """The model's prefix tokens and pooling, read off the timm attributes that define them."""
    cls = getattr(model, "cls_token", None) is not None
    regs = int(getattr(model, "num_reg_tokens", 0) or 0)
    reg_token = getattr(model, "reg_token", None)  # EVA keeps its registers in ``reg_token`` (1, R, C)
    if not regs and isinstance(reg_token, torch.Tensor):
        regs = int(reg_token.shape[1])
    dist = getattr(model, "dist_token", None) is not None
    pool = "map" if getattr(model, "attn_pool", None) is not None else str(getattr(model, "global_pool", ""))
    layout = PrefixLayout(int(model.num_prefix_tokens), cls, regs, dist, pool)
    if layout.num_prefix != cls + regs + dist:
        raise UnsupportedModel(f"{type(model).__name__} has {layout.num_prefix} prefix tokens but class/registers/"
                               f"distillation account for {cls + regs + dist}: unknown prefix layout")
    return layout


def check_premises(model: torch.nn.Module, method: str, needs_class_token: bool = False,
                   merges: bool = False, tracks_positions: bool = True) -> PrefixLayout:
    """Raise :class:`UnsupportedModel` when ``model`` cannot give what ``method`` declares it assumes."""
    layout = prefix_layout(model)
    if not tracks_positions:
        family = check_blocks(model)
        if family in POSITION_FAMILIES:
            raise UnsupportedModel(f"{method} does not keep token positions in sync (tracks_positions) and "
                                   f"{type(model).__name__}'s {family} blocks need each token's position "
                                   f"({'rotary embedding' if family == 'eva' else 'relative-position bias'})")
    if needs_class_token and not layout.class_token:
        raise UnsupportedModel(f"{method} ranks tokens by the class token's attention and "
                               f"{type(model).__name__} has no class token (pooling {layout.pool!r}, "
                               f"{layout.registers} register tokens): row 0 would be another token's")
    if merges and layout.pool not in SIZE_AWARE_POOLS:
        raise UnsupportedModel(f"{method} merges tokens and the head's {layout.pool!r} pooling would count a "
                               f"merged token once where the blocks count it by its size "
                               f"(size-aware pooling: {', '.join(SIZE_AWARE_POOLS)})")
    return layout


def checked_positions(state: TokenState, entering: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` as a reducer left it (``entering`` tokens came in), refused if its token count and
    ``state.positions`` disagree: the next block would take rotary embeddings or relative bias at the
    wrong tokens' positions. No positions yet means none was reduced: the count must not change."""
    known = entering if state.positions is None else state.positions.shape[1]
    if known != x.shape[1]:
        raise UnsupportedModel(f"{state.method} changed the token count without keeping token positions in sync "
                               f"(keep_tokens / merge_positions), and this model's blocks need each token's position")
    return x


def _size_weighted_forward_head(self, x: torch.Tensor, pre_logits: bool = False):
    """The model class's own ``forward_head``, with average pooling weighted by token size.

    Module-level and reaching the head through ``self`` (no closure over a bound method), so a
    deep copy of a patched model runs its own head.
    """
    state = self._seam_state
    size = state.size
    if size is not None and state.pool not in SIZE_AWARE_POOLS:  # merged tokens reach a head that ignores sizes
        raise UnsupportedModel(f"{state.method} merges tokens (they carry sizes) and the head's {state.pool!r} pooling "
                               f"counts a merged token once (size-aware pooling: {', '.join(SIZE_AWARE_POOLS)})")
    if size is not None and self.global_pool == "avg" and getattr(self, "attn_pool", None) is None:
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        w = size[:, start:]
        # mean(x * w * n / sum(w)) == sum(x * w) / sum(w): timm's own pooling then does the rest
        x = torch.cat([x[:, :start], x[:, start:] * (w * w.shape[1] / w.sum(1, keepdim=True)).to(x.dtype)], 1)
    return type(self).forward_head(self, x, pre_logits=pre_logits)


def size_weighted_head(model: torch.nn.Module) -> None:
    """Make average pooling weight each token by its size (MAE-style heads after merging)."""
    model.forward_head = types.MethodType(_size_weighted_forward_head, model)
