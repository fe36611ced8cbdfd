"""Random pruning: a seeded, uniformly random subset of non-prefix tokens survives.

The control every token-reduction paper needs: a method is only as good as its margin over
dropping tokens at random at the same schedule. (Haurum et al., "Which Tokens to Use?
Investigating Token Reduction in Vision Transformers", ICCVW 2023, arXiv 2308.04657.)

Modifications: between attention and MLP of each block whose schedule shrinks, keeps a uniformly
random subset (independent per image, seeded) of the non-prefix tokens, in their original order;
class, distillation and register tokens always stay. The native knob ``keep_rate`` prunes at
EViT's drop blocks (the 4th, 7th and 10th of 12, scaled to other depths), keeping
ceil(keep_rate x non-prefix tokens) each time. Any other method's schedule can be followed instead
(``patch_schedule``), which gives "random at the schedule of method X".
"""
from __future__ import annotations

import math

import torch

from harness.registry import Knob, Method, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, gather_tokens, install


def random_keep_index(batch: int, num_tokens: int, num_keep: int, generator: torch.Generator) -> torch.Tensor:
    """Indices (batch, num_keep) of a uniformly random subset of range(num_tokens) per row, ascending."""
    scores = torch.rand(batch, num_tokens, generator=generator, device=generator.device)
    return scores.argsort(dim=1)[:, :num_keep].sort(dim=1).values


def drop_blocks(depth: int) -> tuple[int, ...]:
    """EViT's default drop locations (blocks 3, 6, 9 of 12, 0-based), scaled to ``depth``."""
    return tuple(sorted({depth // 4, depth // 2, (3 * depth) // 4}))


@register_method
class RandomPruning(Method):
    """Random pruning: seeded uniform token dropping at EViT's drop blocks (or any schedule)."""

    name = "random"
    version = "1"
    knob = Knob("keep_rate", float, 0.01, 1.0, identity=1.0)

    @classmethod
    def option_names(cls) -> list[str]:
        return ["seed"]

    def resolved_options(self) -> dict:
        return {"seed": int(self.options.get("seed", 0))}

    def schedule(self, arch, value: float) -> Schedule:
        tokens, out = arch.tokens_in, []
        drops = drop_blocks(arch.depth)
        for i in range(arch.depth):
            if i in drops:
                tokens = arch.num_prefix + math.ceil(value * (tokens - arch.num_prefix))
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def patch(self, model, value: float, arch) -> None:
        self.patch_schedule(model, self.schedule(arch, value))

    def patch_schedule(self, model, schedule: Schedule) -> None:
        """Prune at random to follow ``schedule`` (rounded to whole tokens)."""
        seed = int(self.options.get("seed", 0))
        generators: dict[torch.device, torch.Generator] = {}

        def reducer_for(target: int):
            def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
                if x.shape[1] <= target:
                    return x
                if x.device not in generators:
                    generators[x.device] = torch.Generator(device=x.device).manual_seed(seed)
                p = ctx.num_prefix
                idx = random_keep_index(x.shape[0], x.shape[1] - p, target - p, generators[x.device]) + p
                if ctx.state.size is not None:
                    ctx.state.size = torch.cat([ctx.state.size[:, :p], gather_tokens(ctx.state.size, idx)], 1)
                return torch.cat([x[:, :p], gather_tokens(x, idx)], 1)

            return reduce

        reducers, prev = {}, schedule.tokens_in
        for i, n in enumerate(schedule.tokens_out):
            if round(n) < prev:
                reducers[i] = reducer_for(round(n))
            prev = round(n)
        install(model, reducers, capture_qkv=False)
