"""EViT: keep the attentive tokens, fuse the inattentive ones.

Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022, arXiv 2202.07800, https://github.com/youweiliang/evit (``evit.py``).

Modifications:
 - at the drop blocks (0-based 3, 6, 9 of 12 as ``deit_small_patch16_shrink_base``; scaled to other
   depths; option ``drop_loc`` overrides), between attention and MLP, keeps the
   ceil(keep_rate x non-prefix tokens) non-prefix tokens the class token attends to most (attention
   averaged over heads, softmax over all tokens, as the official ``attn[:, :, 0, 1:].mean(1)``);
 - kept tokens come in descending attention order, as the official ``torch.topk(..., sorted=True)``
   gather leaves them, not in their original order;
 - inattentive-token fusion (option ``fuse``, default on): the dropped tokens become ONE token, their
   sum weighted by their class attention exactly as the official code (the weights are not
   renormalised to sum to one), appended after the kept tokens; at later drop blocks it is an
   ordinary non-prefix token that can be kept or fused again;
 - a drop block that would keep every token does nothing and adds no fused token (official early return);
 - prefix tokens (class, distillation, registers) always stay, first and in order; the official code
   protects only the class token;
 - on models whose blocks need token positions (EVA / rope, BEiT, relpos; the official code has
   none) kept tokens keep their positions and the fused token takes the position of the dropped
   token with the highest class attention (its largest-weight source): a choice of ours.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harness.keeprate import KeepRate, KeepRateWarmup
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import (BlockContext, attentive_split, chosen_blocks, current_positions, gather_tokens,
                          keep_tokens, num_keep, top_attentive)


def fuse_tokens(x: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """One token (B, 1, C): the dropped tokens of ``x`` weighted by their (unnormalised) ``scores``."""
    weights = scores.gather(1, dropped).unsqueeze(-1).to(x.dtype)
    return (gather_tokens(x, dropped) * weights).sum(dim=1, keepdim=True)


def select_tokens(x: torch.Tensor, cls_attn: torch.Tensor, keep_rate: float, num_prefix: int,
                  fuse: bool) -> torch.Tensor:
    """EViT's reorganisation of ``x`` (B, N, C) given the class attention ``cls_attn`` (B, N).

    Returns prefix tokens, then the kept tokens by descending attention, then (``fuse``) the fused
    token; ``x`` itself when every non-prefix token would be kept.
    """
    scores = cls_attn[:, num_prefix:]
    keep = num_keep(scores.shape[1], keep_rate)
    if keep >= scores.shape[1]:
        return x
    kept, dropped = top_attentive(scores, keep)
    body = x[:, num_prefix:]
    parts = [x[:, :num_prefix], gather_tokens(body, kept)]
    if fuse:
        parts.append(fuse_tokens(body, scores, dropped))
    return torch.cat(parts, dim=1)


def tokens_after_drop(tokens: int, keep_rate: float, num_prefix: int, fuse: bool) -> int:
    """Tokens leaving a drop block that receives ``tokens`` (prefix included)."""
    keep = num_keep(tokens - num_prefix, keep_rate)
    if keep >= tokens - num_prefix:
        return tokens
    return num_prefix + keep + int(fuse)


def fused_position(scores: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """(B, 1) index (among the candidates) of the dropped token with the highest class attention:
    the position the fused token takes on models whose blocks need token positions."""
    return dropped.gather(1, scores.gather(1, dropped).argmax(dim=1, keepdim=True))


def evit_reducer(keep_rate: KeepRate, fuse: bool) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer for one drop block: :func:`select_tokens`, with token positions kept in sync
    (the kept tokens keep theirs; the fused token takes its most attended source's)."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if ctx.state.size is not None:
            raise RuntimeError("EViT does not carry token sizes; another reducer merged tokens first")
        p, split = ctx.num_prefix, attentive_split(ctx, keep_rate.value)
        if split is None:
            return x
        scores, kept, dropped = split
        positions = current_positions(ctx.state, x)
        out = keep_tokens(ctx, x, kept + p)  # prefix tokens, then the kept ones by descending attention
        if not fuse:
            return out
        if positions is not None:
            src = fused_position(scores, dropped) + p
            ctx.state.positions = torch.cat([ctx.state.positions, positions.gather(1, src)], 1)
        return torch.cat([out, fuse_tokens(x[:, p:], scores, dropped)], dim=1)

    return reduce


@register_method
class EViT(KeepRateWarmup, Method):
    """EViT: keep the tokens the class token attends to, fuse the rest into one (Liang et al., ICLR 2022)."""

    name = "evit"
    premises = Premises(needs_class_token=True, tracks_positions=True)
    version = "1"
    knob = Knob("keep_rate", float, 0.01, 1.0, identity=1.0)
    # the paper trains with the reorganisation in place, the keep rate warmed up (harness.keeprate)

    @dataclass(frozen=True)
    class Options:
        fuse: bool = True  # the dropped tokens fused into one, weighted by attention (False: Top-K's drop)
        drop_loc: Optional[tuple[int, ...]] = None  # 0-based drop blocks (default: the paper's 3, 6, 9 on 12)

    implicit_defaults = {"fuse": True, "drop_loc": None}  # ids stored before defaults were filled

    @property
    def fuse(self) -> bool:
        """Whether dropped tokens are fused into one extra token."""
        return self.options.fuse

    def drop_loc(self, depth: int) -> tuple[int, ...]:
        """0-based blocks that drop tokens for a model of ``depth`` blocks."""
        return chosen_blocks(self.options.drop_loc, depth, f"{self.name} drop_loc")

    def schedule(self, arch, value: float) -> Schedule:
        tokens, out = arch.tokens_in, []
        drops = self.drop_loc(arch.depth)
        for i in range(arch.depth):
            if i in drops:
                tokens = tokens_after_drop(tokens, value, arch.num_prefix, self.fuse)
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def reducers(self, model, arch, value: float) -> dict:
        # every drop block reads the model's one keep rate (the warm-up changes it while training);
        # at the identity the blocks are patched without reducers, so the warm-up cannot start from 1
        keep_rate = self.keep_rate(model, value)
        if value >= 1.0:
            return {}
        return {i: evit_reducer(keep_rate, self.fuse) for i in self.drop_loc(arch.depth)}
