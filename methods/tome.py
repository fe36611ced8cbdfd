"""ToMe: Token Merging.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, arXiv 2210.09461,
https://github.com/facebookresearch/ToMe (``tome/merge.py``, ``tome/patch/timm.py``, ``tome/utils.py``).

Modifications:
 - between attention and MLP of every block, merges ``r`` tokens by bipartite soft matching:
   tokens alternate into sets A (even positions) and B (odd positions), each A token finds its most
   similar B token by cosine similarity of the keys averaged over heads, and the ``r`` best-matched
   A tokens are averaged into their partners;
 - merging is a size-weighted average; sizes (patches per token) start at one and travel with the
   model's TokenState from block to block;
 - proportional attention (log size added to the attention logits) is on by default, as in the
   official timm patch; option ``prop_attn=false`` turns it off (the official MAE patch does);
 - average-pooling heads weight each token by its size (the seam does this, as the official MAE patch);
 - prefix tokens (class, distillation, registers) are never merged: the official code protects the
   class token (A row set to -inf) and the distillation token (B column set to -inf); we protect
   every token before ``num_prefix`` the same way and keep prefix tokens first, in their order;
 - ``r`` is clamped each block to half the non-prefix tokens, since every merged A token needs a B
   partner: the schedule applies the same clamp, so it reports exactly what the forward does;
 - on models whose blocks need token positions (EVA / rope, BEiT, relpos) a merged token keeps its
   destination's (B token's) position: its rotary embedding / relative-position bias is the
   destination's (the official code has no such models; the destination is the token that stays);
 - schedules: constant ``r`` (default), ``inflection`` in [-1, 1] (the official ``parse_r`` pair
   ``(r, inflection)``; -1 is the paper's "decreasing" schedule), or an explicit per-block ``r_list``
   (padded with zeros, as ``parse_r``), which replaces the knob whenever the knob is not 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harness.errors import HarnessError
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, bipartite_soft_matching, clamp_r, merge_tokens

# r at which a 224 px /16 model (197 tokens) merges half its tokens in the first block; the forward
# clamps larger r to half the tokens anyway.
R_MAX = 98


def parse_r(depth: int, r: int, inflection: float = 0.0) -> list[int]:
    """Per-block r for a constant (inflection 0) or linearly trending schedule.

    Same arithmetic as the official ``parse_r((r, inflection))``: r per block runs linearly from
    ``int(r * (1 - inflection))`` to its mirror around r, each value truncated to an int.
    """
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (depth - 1) if depth > 1 else 0.0
    return [int(low + step * i) for i in range(depth)]


def tokens_after(tokens_in: int, rs: list[int], num_prefix: int) -> tuple[int, ...]:
    """Tokens leaving each block when block i merges ``rs[i]`` tokens (clamped as in the forward)."""
    tokens, out = tokens_in, []
    for r in rs:
        tokens -= clamp_r(r, tokens, num_prefix)
        out.append(tokens)
    return tuple(out)


def tome_reducer(r: int) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer that merges ``r`` tokens by the keys' similarity and carries sizes."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        merge = bipartite_soft_matching(ctx.keys(), r, ctx.num_prefix)
        return merge_tokens(ctx, merge, x)

    return reduce


@register_method
class ToMe(Method):
    """ToMe: merge r similar tokens per block by bipartite soft matching (Bolya et al., ICLR 2023)."""

    name = "tome"
    premises = Premises(merges=True, tracks_positions=True)
    version = "1"
    knob = Knob("r", int, 0, R_MAX, identity=0)
    # the paper trains with merging in place (Sec. 4, "with training"): gradients flow through the
    # size-weighted merge, the matching itself is not differentiated (no_grad, as the official code)
    cannot_train = None

    @dataclass(frozen=True)
    class Options:
        prop_attn: bool = True  # proportional attention: log(size) added to the logits
        inflection: float = 0.0  # the schedule's slope over depth (the official parse_r), in [-1, 1]
        r_list: Optional[tuple[int, ...]] = None  # r per block, overriding the knob's constant r

    implicit_defaults = {"prop_attn": True, "inflection": 0.0, "r_list": None}  # ids stored before defaults were filled

    def layer_r(self, depth: int, r: int) -> list[int]:
        """r for each of ``depth`` blocks at knob value ``r`` under this method's schedule options."""
        r_list, inflection = self.options.r_list, self.options.inflection
        if r_list is not None and len(r_list) > depth:
            raise HarnessError(f"tome r_list has {len(r_list)} entries, the model {depth} blocks")
        if not -1.0 <= inflection <= 1.0:
            raise HarnessError(f"tome inflection={inflection} out of range [-1, 1]")
        if r == 0:
            return [0] * depth
        if r_list is not None:
            return [int(v) for v in r_list] + [0] * (depth - len(r_list))
        return parse_r(depth, int(r), inflection)

    def schedule(self, arch, value: int) -> Schedule:
        rs = self.layer_r(arch.depth, value)
        return Schedule(arch.tokens_in, tokens_after(arch.tokens_in, rs, arch.num_prefix))

    @property
    def prop_attn(self) -> bool:
        return self.options.prop_attn

    def reducers(self, model, arch, value: int) -> dict:
        return {i: tome_reducer(r) for i, r in enumerate(self.layer_r(arch.depth, value)) if r > 0}
