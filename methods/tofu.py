"""ToFu: Token Fusion, pruning in the early blocks and norm-preserving merging in the late ones.

Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token Merging", WACV 2024,
arXiv 2312.01026. No official code was released by the authors; the reference implementation is the
one in the PiToMe repository (https://github.com/hchautran/PiToMe, ``algo/tofu/merge.py``,
``algo/tofu/patch/deit.py`` and ``patch/timm.py``, commit 550b5de), checked against it here on the
reference checkpoint in fp32 (``fidelity/deit_tiny_cifar10_newmethods_golden.json``, case
``tofu_ratio0.9``), and under CPU bf16 autocast with eager attention
(``tests/fixtures/golden/deit_tiny_cifar10_bf16_golden.json``, case ``tofu_ratio0.9``, made by
running it: bit for bit).

Modifications (as that implementation):
 - between attention and MLP of every block, ``r = floor(T - T x ratio)`` tokens leave, ``T``
   the tokens entering the block (prefix tokens included): ToMe's bipartite soft matching on the
   keys averaged over heads (:func:`methods.tome.bipartite_soft_matching`) picks the ``r`` A tokens
   best matched to a B token;
 - in blocks ``i <= depth // 2`` (0-based) the matched A tokens are dropped ("prune"); in the
   later blocks they are fused into their B partner by MLERP: the mean of the partner and the
   tokens fused into it, rescaled by the largest norm among them over the partner's norm before
   fusion (the reference divides by that norm, not by the mean's; we do the same);
 - no token sizes are tracked, so proportional attention never applies and an average-pool head
   is not weighted (as the reference).

Deviations from the reference: every prefix token is protected (the reference protects only the
class token, so a distillation token could be fused); ``r`` is clamped to half the non-prefix
tokens as in :mod:`methods.tome` (the reference does not clamp; the two agree for ``ratio > 0.5``);
on models whose blocks need token positions (EVA / rope, BEiT, relpos; the reference has none) a
fused token keeps its destination's position, a pruned one leaves with its own.

Where the reference is undefined the cell is refused (``unsupported``, the reason recorded), not run
ToMe-clamped: a block whose ``floor(T - T x ratio)`` exceeds what the clamp allows (the reference
would match the class token itself, or more A tokens than it has). That is ``ratio = 0.5`` exactly,
the knob's lower end: the reference removes ``floor(T / 2)`` of ``T`` tokens counted with the class
token, so at block 2 (T = 50) its matching takes the class token and at block 8 it raises. Every
``ratio > 0.5`` runs (the budgets 0.9 / 0.7 / 0.5 need 0.87-0.98).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from harness.errors import UnsupportedModel
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, bipartite_soft_matching, clamp_r, merge_positions


def tokens_removed(tokens: int, ratio: float, num_prefix: int) -> int:
    """Tokens a block with ``tokens`` entering removes at ``ratio`` (the reference's arithmetic, clamped)."""
    if ratio >= 1.0:
        return 0
    return clamp_r(math.floor(tokens - tokens * ratio), tokens, num_prefix)


def fuse_mlerp(b: torch.Tensor, index: torch.Tensor, moved: torch.Tensor) -> torch.Tensor:
    """MLERP fusion of ``moved`` tokens into ``b`` at ``index``: mean, rescaled to the largest norm.

    Args:
        b: (B, Nb, C) destination tokens.
        index: (B, r, C) each moved token's destination row.
        moved: (B, r, C) the tokens fused in.
    """
    b_norm = b.norm(dim=-1)
    mean = b.scatter_reduce(1, index, moved, reduce="mean")
    norm = b_norm.scatter_reduce(1, index[..., 0], moved.norm(dim=-1), reduce="amax")
    return mean / b_norm[..., None] * norm[..., None]


def tofu_reducer(ratio: float, fuse: bool) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer of one block: prune (``fuse`` False) or fuse by MLERP at ``ratio``."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        r = tokens_removed(x.shape[1], ratio, ctx.num_prefix)
        merge = bipartite_soft_matching(ctx.keys(), r, ctx.num_prefix)
        merge_positions(ctx, merge, x)  # a fused token keeps its destination's position
        return merge(x, mode=fuse_mlerp if fuse else "prune")

    return reduce


@register_method
class ToFu(Method):
    """ToFu: prune early, fuse late by norm-preserving merging, at one keep ratio per block (Kim et al., WACV 2024)."""

    name = "tofu"
    premises = Premises(tracks_positions=True)
    version = "1"
    # the paper: "applicable to ViTs with or without additional training" (abstract, WACV 2024);
    # pruning and MLERP merging both pass gradients to the kept tokens
    cannot_train = None
    knob = Knob("ratio", float, 0.5, 1.0, identity=1.0)

    @staticmethod
    def fuses(block: int, depth: int) -> bool:
        """Blocks after the middle fuse; the others prune (the reference's strategy list)."""
        return block > depth // 2

    def schedule(self, arch, value: float) -> Schedule:
        tokens, out = arch.tokens_in, []
        for _ in range(arch.depth):
            tokens -= tokens_removed(tokens, value, arch.num_prefix)
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def undefined_at(self, arch, value: float) -> Optional[str]:
        """Why the reference ToFu cannot run at ``value`` on ``arch`` (module docstring), or None."""
        tokens = arch.tokens_in
        for i in range(arch.depth):
            asked = math.floor(tokens - tokens * value) if value < 1.0 else 0
            if asked > tokens_removed(tokens, value, arch.num_prefix):
                return (f"tofu ratio={value}: block {i} would remove {asked} of {tokens} tokens, more than its matching "
                        f"can without the class token (the reference matches the class token there): undefined")
            tokens -= tokens_removed(tokens, value, arch.num_prefix)
        return None

    def reducers(self, model, arch, value: float) -> dict:
        why = self.undefined_at(arch, value)
        if why:
            raise UnsupportedModel(why)
        return {} if value >= 1.0 else {i: tofu_reducer(value, self.fuses(i, arch.depth)) for i in range(arch.depth)}
