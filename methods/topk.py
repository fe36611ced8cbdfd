"""Top-K: EViT without fusion, the attentive-token baseline.

Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers",
ICCVW 2023, arXiv 2308.04657, https://github.com/JoakimHaurum/TokenReduction; the selection is
EViT's (Liang et al., ICLR 2022, arXiv 2202.07800, https://github.com/youweiliang/evit).

Modifications: as :mod:`methods.evit` with ``fuse`` fixed off: at the drop blocks (0-based 3, 6, 9
of 12, scaled to other depths; option ``drop_loc`` overrides), between attention and MLP, keeps the
ceil(keep_rate x non-prefix tokens) tokens the class token attends to most (descending attention
order, :func:`harness.seam.top_attentive`) and drops the rest; prefix tokens always stay; a drop
block that would keep every token does nothing; on models whose blocks need token positions the
kept tokens keep theirs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harness.keeprate import KeepRate, KeepRateWarmup
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, attentive_split, chosen_blocks, keep_tokens, num_keep


def topk_reducer(keep_rate: KeepRate) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer for one drop block: the most attended non-prefix tokens, by descending attention."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        split = attentive_split(ctx, keep_rate.value)
        return x if split is None else keep_tokens(ctx, x, split[1] + ctx.num_prefix)

    return reduce


@register_method
class TopK(KeepRateWarmup, Method):
    """Top-K: keep the tokens the class token attends to most, drop the rest (EViT without fusion)."""

    name = "topk"
    premises = Premises(needs_class_token=True, tracks_positions=True)
    version = "1"
    knob = Knob("keep_rate", float, 0.01, 1.0, identity=1.0)

    @dataclass(frozen=True)
    class Options:
        drop_loc: Optional[tuple[int, ...]] = None  # 0-based drop blocks (default: EViT's 3, 6, 9 on 12)

    implicit_defaults = {"drop_loc": None}  # ids stored before defaults were filled

    def schedule(self, arch, value: float) -> Schedule:
        tokens, out = arch.tokens_in, []
        drops = chosen_blocks(self.options.drop_loc, arch.depth, f"{self.name} drop_loc")
        for i in range(arch.depth):
            if i in drops:
                tokens = arch.num_prefix + min(num_keep(tokens - arch.num_prefix, value), tokens - arch.num_prefix)
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def reducers(self, model, arch, value: float) -> dict:
        keep_rate = self.keep_rate(model, value)  # trained with EViT's keep-rate warm-up (harness.keeprate)
        if value >= 1.0:
            return {}
        return {i: topk_reducer(keep_rate) for i in chosen_blocks(self.options.drop_loc, arch.depth, f"{self.name} drop_loc")}
