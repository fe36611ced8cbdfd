"""Representation Shift: keep the tokens the block changed most.

Choi, Lee, Ko, Kim, Kil and Kim, "Representation Shift: Unifying Token Compression with
FlashAttention", ICCV 2025, arXiv 2508.00367; reference repository
https://github.com/mlvlab/Representation-Shift (not reachable here: built from the paper's text).

The paper scores a token by how much a layer ``F`` moved it, Δx = D(F(x), x), and prunes the tokens
that moved least. The score needs only a layer's input and output, never an attention map, so the
fused attention kernel (``scaled_dot_product_attention``, FlashAttention on a GPU) stays in use.

Modifications (seam stage ``"post"``: after the MLP residual of each prune block):
 - score: ``||x_out - x_in||_2`` per token, in fp32, where ``x_in`` is the token entering the block
   (``ctx.block_input``) and ``x_out`` the token leaving it (attention and MLP residual branches
   both applied);
 - prune blocks: 0-based 3, 6, 9 of 12 (EViT's drop locations, scaled to other depths; option
   ``drop_loc`` overrides); each keeps ceil(keep_rate x non-prefix tokens entering) non-prefix
   tokens with the largest shift (EViT's per-block rate), the rest are dropped (no fusion);
 - kept tokens stay in their original order; prefix tokens (class, distillation, registers) are
   never candidates and stay first; sizes and positions follow the kept tokens
   (``harness.seam.keep_tokens``), so rope / relpos models are supported;
 - any schedule can be followed (``reprshift@tome``: this score at ToMe's token counts).

Choices, against the paper:
 - distance: L2, the paper's D ("a distance metric like the L2 norm"; its Figure 2 computes the
   L2 distance);
 - where the shift is measured: the paper's illustration (Figure 2) measures it across the MLP
   layer. The seam hands a reducer the block's input and output, so we measure across the whole
   block (attention + MLP residual branches): the MLP-only shift would need the tokens between
   the two branches, which a stage-"post" reducer does not see. A deviation from the paper's figure;
   on a pre-norm block the two differ by the attention branch's update;
 - prune blocks, keep schedule and token order: not specified in the paper text we could read; the
   choices above are ours, EViT's schedule so that ``reprshift`` compares with ``topk`` (the
   class-attention score at the same drop blocks and rate) on the score alone. Pruning comes after
   the MLP (the score needs the block's output), where ``topk`` prunes before it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from harness import margins
from harness.registry import Knob, Method, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, install, keep_tokens
from harness.methods.random import chosen_blocks


def representation_shift(x_out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """Each token's shift (B, N): the L2 norm of ``x_out - x_in`` (both (B, N, C)), in fp32."""
    return (x_out.float() - x_in.float()).norm(dim=-1)


def largest_shift(shift: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the ``keep`` tokens with the largest ``shift`` (B, N), ascending."""
    kept = shift.topk(keep, dim=1, largest=True, sorted=False).indices
    margins.note_boundary(shift, keep, "representation-shift keep")
    return kept.sort(dim=1).values


def num_keep(num_tokens: int, keep_rate: float) -> int:
    """Non-prefix tokens a prune block keeps of ``num_tokens``: ceil(keep_rate x num_tokens)."""
    return math.ceil(keep_rate * num_tokens)


def reprshift_reducer(target: int) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer that keeps the ``target`` tokens (prefix included) the block moved most."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        p = ctx.num_prefix
        if x.shape[1] <= target:
            return x
        shift = representation_shift(x[:, p:], ctx.block_input[:, p:])
        return keep_tokens(ctx, x, largest_shift(shift, target - p) + p)

    return reduce


@register_method
class RepresentationShift(Method):
    """Representation Shift: keep the tokens whose representation the block changed most (Choi et al., ICCV 2025)."""

    name = "reprshift"
    version = "1"
    stage = "post"
    tracks_positions = True
    knob = Knob("keep_rate", float, 0.01, 1.0, identity=1.0)

    option_defaults = {"drop_loc": None}

    def drop_loc(self, depth: int) -> tuple[int, ...]:
        """0-based blocks that prune, for a model of ``depth`` blocks."""
        return chosen_blocks(self.options["drop_loc"], depth, f"{self.name} drop_loc")

    def schedule(self, arch, value: float) -> Schedule:
        tokens, out = arch.tokens_in, []
        drops = self.drop_loc(arch.depth)
        for i in range(arch.depth):
            if i in drops:
                tokens = min(tokens, arch.num_prefix + num_keep(tokens - arch.num_prefix, value))
            out.append(tokens)
        if tokens == arch.tokens_in:
            return Schedule.full(arch)  # nothing pruned: the unpatched model (the stage is moot)
        return Schedule(arch.tokens_in, tuple(out), stage=self.stage)

    def patch(self, model, value: float, arch) -> None:
        self.patch_schedule(model, self.schedule(arch, value))

    def patch_schedule(self, model, schedule: Schedule) -> None:
        """Prune by representation shift to ``schedule`` (whole tokens), after each block's MLP."""
        reducers, prev = {}, schedule.tokens_in
        for i, n in enumerate(schedule.tokens_out):
            if round(n) < prev:
                reducers[i] = reprshift_reducer(round(n))
            prev = round(n)
        install(model, reducers, capture_qkv=False, method=self.name, stage=self.stage,
                tracks_positions=self.tracks_positions)
