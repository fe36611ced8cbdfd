"""Random pruning: a seeded, uniformly random subset of non-prefix tokens survives.

The control every token-reduction paper needs: a method is only as good as its margin over
dropping tokens at random at the same schedule. (Haurum et al., "Which Tokens to Use?
Investigating Token Reduction in Vision Transformers", ICCVW 2023, arXiv 2308.04657.)

Modifications: between attention and MLP of each block whose schedule shrinks, keeps a uniformly
random subset (independent per image, seeded) of the non-prefix tokens, in their original order;
class, distillation and register tokens always stay; on models whose blocks need token positions
(EVA / rope, BEiT, relpos) each kept token keeps its position (rotary embedding, relative bias). The native knob ``keep_rate`` prunes at
EViT's drop blocks (the 4th, 7th and 10th of 12, scaled to other depths), keeping
ceil(keep_rate x non-prefix tokens) each time. Any other method's schedule can be followed instead
(``patch_schedule``), which gives "random at the schedule of method X".

Randomness without a generator (version 2): each token's random score is a counter-based hash of
(seed, block, image index within the batch, token index), a few rounds of 32-bit multiply-xorshift
in int64 tensor ops (:func:`random_scores`), and the kept tokens are the ``topk`` of those scores.
No ``torch.Generator`` runs in the forward, so it compiles as one graph with static shapes and
never syncs with the host; a draw depends on nothing but its key: the same seed keeps the same
tokens whatever ran before (warm-up passes included), on any device. Image ``i`` of every batch of
one size draws the same pattern (its key is its place in the batch); the pattern is independent of
the image's content, so accuracy stays an unbiased estimate. Version 1 drew from a generator
advanced by every forward, so its draws depended on how many batches ran before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, drop_blocks, keep_tokens, shrinking_blocks


_MASK32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (xorshift-multiply rounds, multipliers below 2^31 so that int64
    products never overflow); works on Python ints and int64 tensors alike."""
    x = x & _MASK32
    for multiplier in (0x7FEB352D, 0x2C1B3C6D, 0x297A2D39):
        x = ((x ^ (x >> 16)) * multiplier) & _MASK32
    return x ^ (x >> 16)


def random_scores(batch: int, num_tokens: int, key: int, device=None) -> torch.Tensor:
    """Uniform pseudo-random int64 scores in [0, 2^32), (batch, num_tokens), from ``key`` alone.

    Score (i, j) hashes (key, i, j): a counter-based generator, reproducible and traceable.
    """
    image = torch.arange(batch, device=device, dtype=torch.int64).unsqueeze(1)
    token = torch.arange(num_tokens, device=device, dtype=torch.int64).unsqueeze(0)
    return mix32(mix32(mix32(key) + image) + token)


def random_keep_index(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Indices (B, num_keep) of the ``num_keep`` highest ``scores`` (B, N) per row, ascending:
    a uniformly random subset when the scores are i.i.d."""
    return scores.topk(num_keep, dim=1, sorted=False).indices.sort(dim=1).values


def block_key(seed: int, block: int) -> int:
    """The hash key of ``block``'s draws under ``seed``."""
    return mix32(mix32(seed) + block)


@register_method
class RandomPruning(Method):
    """Random pruning: seeded uniform token dropping at EViT's drop blocks (or any schedule)."""

    name = "random"
    premises = Premises(tracks_positions=True)
    version = "2"  # 2: counter-based hash draws (traceable, independent of earlier forwards)
    knob = Knob("keep_rate", float, 0.01, 1.0, identity=1.0)
    # trained as EViT's random-keep control (its official main.py --random): the draws depend on the
    # block and image, not on training, so the pruning trains as it evaluates
    cannot_train = None

    @dataclass(frozen=True)
    class Options:
        seed: int = 0  # the draws' seed (with the block and the image: counter-based, module docstring)

    def schedule(self, arch, value: float) -> Schedule:
        tokens, out = arch.tokens_in, []
        drops = drop_blocks(arch.depth)
        for i in range(arch.depth):
            if i in drops:
                tokens = arch.num_prefix + math.ceil(value * (tokens - arch.num_prefix))
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def reducers(self, model, arch, value: float) -> dict:
        return self.follow(model, arch, self.schedule(arch, value))

    def follow(self, model, arch, schedule: Schedule) -> dict:
        """Prune at random to follow ``schedule`` (rounded to whole tokens)."""
        seed = self.options.seed

        def reducer_for(target: int, key: int):
            def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
                if x.shape[1] <= target:
                    return x
                p = ctx.num_prefix
                scores = random_scores(x.shape[0], x.shape[1] - p, key, x.device)
                idx = random_keep_index(scores, target - p) + p
                return keep_tokens(ctx, x, idx)  # sizes and positions follow the kept tokens

            return reduce

        return {i: reducer_for(n, block_key(seed, i)) for i, n in shrinking_blocks(schedule).items()}
