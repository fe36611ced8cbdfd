"""Block-shift pruning: the outsider's method of ``docs/adding-a-method.md`` (section 7), in one file.

Not a published method (Representation Shift, ``methods/reprshift.py``, is the paper closest to
it): a researcher's first plugin, written from the documentation alone. After each chosen block's
attention, keep the tokens the attention moved most, ``||x - ctx.block_input||`` (the tokens after
the attention residual minus the tokens that entered the block), and drop the rest before the MLP.

It uses only the documented API: ``harness.registry`` (the contract), ``harness.schedule`` (the
token schedule) and ``harness.seam`` (``ctx.block_input``, ``keep_tokens``, ``num_keep``,
``drop_blocks``, ``shrinking_blocks``); no forward hook, no import of another method.

Modifications (what the method changes in the model, block by block):
 - at the drop blocks (EViT's 3, 6, 9 of 12, scaled to the depth; option ``drop_loc``), between
   attention and MLP, keeps ``ceil(keep_rate x patches)`` non-prefix tokens with the largest shift,
   in their original order; prefix tokens always stay first;
 - any other method's schedule can be followed (``blockshift@tome``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, chosen_blocks, keep_tokens, num_keep, shrinking_blocks


def largest_shift(shift: torch.Tensor, keep: int, num_prefix: int) -> torch.Tensor:
    """Indices (B, keep) of the non-prefix tokens with the largest ``shift`` (B, N), ascending, prefix offset included."""
    kept = shift[:, num_prefix:].topk(keep, dim=1, sorted=False).indices
    return kept.sort(dim=1).values + num_prefix


def blockshift_reducer(target: int):
    """The seam reducer that keeps the ``target`` tokens (prefix included) the attention moved most."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if x.shape[1] <= target:
            return x
        shift = (x - ctx.block_input).float().norm(dim=-1)  # what this block's attention did to each token
        return keep_tokens(ctx, x, largest_shift(shift, target - ctx.num_prefix, ctx.num_prefix))

    return reduce


@register_method
class BlockShift(Method):
    """Block-shift pruning (walk-through): keep the tokens the block's attention moved most."""

    name = "blockshift"
    version = "1"
    knob = Knob("keep_rate", float, 0.01, 1.0, identity=1.0)
    premises = Premises(tracks_positions=True)  # keep_tokens keeps positions: rope / relpos models run
    stage = "mid"

    @dataclass(frozen=True)
    class Options:
        drop_loc: Optional[tuple[int, ...]] = None  # 0-based drop blocks (default: 3, 6, 9 of 12, scaled)

    def schedule(self, arch, value: float) -> Schedule:
        tokens, out = arch.tokens_in, []
        drops = chosen_blocks(self.options.drop_loc, arch.depth, "blockshift drop_loc")
        for i in range(arch.depth):
            if i in drops:
                tokens = arch.num_prefix + num_keep(tokens - arch.num_prefix, value)
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def reducers(self, model, arch, value: float) -> dict:
        return self.follow(model, arch, self.schedule(arch, value))

    def follow(self, model, arch, schedule: Schedule) -> dict:
        return {i: blockshift_reducer(n) for i, n in shrinking_blocks(schedule).items()}
