"""Representation Shift: keep the tokens the MLP changed most.

Choi, Lee, Ko, Kim, Kil and Kim, "Representation Shift: Unifying Token Compression with
FlashAttention", ICCV 2025, arXiv 2508.00367, https://github.com/mlvlab/Representation-Shift. The
repository's code is not reachable here: built from the paper's text and the repository README's
evaluation command (``main.py --model deit_base --use_flash True --drop_r
[0.2,0,0,0.2,0,0,0.2,0,0,0,0,0]``).

The paper scores a token by how much a layer ``F`` moved it, Δx = D(F(x), x), and prunes the tokens
that moved least. The score needs only a layer's input and output, never an attention map, so the
fused attention kernel (``scaled_dot_product_attention``, FlashAttention on a GPU) stays in use.

Modifications (seam stage ``"post"``: after the MLP residual of each prune block):
 - score: ``||x_out - x_mid||_2`` per token, in fp32, the shift across the MLP (the paper's Figure 2):
   ``x_mid`` is the token entering the MLP's residual branch (``ctx.mlp_input``, after the
   attention's residual) and ``x_out`` the token leaving the block; option ``layer = "block"``
   measures across the whole block instead (``x_in`` = ``ctx.block_input``);
 - prune blocks: 0-based 0, 3, 6 of 12, where the README's ``--drop_r`` list is non-zero (scaled to
   other depths as 0, depth // 4, depth // 2; option ``drop_loc`` overrides), each with the same
   rate, the knob ``drop_r`` (the README's 0.2 is ``drop_r=0.2``);
 - a prune block that receives T non-prefix tokens drops ``int(drop_r x T)`` of them, those with the
   smallest shift (no fusion, no merging);
 - kept tokens stay in their original order; prefix tokens (class, distillation, registers) are
   never candidates and stay first; sizes and positions follow the kept tokens
   (``harness.seam.keep_tokens``), so rope / relpos models are supported;
 - any schedule can be followed (``reprshift@tome``: this score at ToMe's token counts).

Choices, against the paper:
 - distance: L2, the paper's D ("a distance metric like the L2 norm"; its Figure 2 computes the
   L2 distance);
 - where the shift is measured: across the MLP, as the paper's illustration (Figure 2) computes it;
   the whole block (``layer = "block"``) is kept as an option, not the default;
 - prune blocks and rate: the README's command (blocks 0, 3, 6, one rate); that the rate is a
   fraction of the tokens the block receives, its rounding (``int``), where in the block the tokens
   leave (after the MLP, which the score needs) and the token order are not in the text we could
   read: those are our choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harness import margins
from harness.errors import HarnessError
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, chosen_blocks, keep_tokens, shrinking_blocks


def representation_shift(x_out: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """Each token's shift (B, N): the L2 norm of ``x_out - x_in`` (both (B, N, C)), in fp32."""
    return (x_out.float() - x_in.float()).norm(dim=-1)


def largest_shift(shift: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the ``keep`` tokens with the largest ``shift`` (B, N), ascending."""
    kept = shift.topk(keep, dim=1, largest=True, sorted=False).indices
    margins.note_boundary(shift, keep, "representation-shift keep")
    return kept.sort(dim=1).values


def num_keep(num_tokens: int, drop_r: float) -> int:
    """Non-prefix tokens a prune block keeps of ``num_tokens``: all but int(drop_r x num_tokens)."""
    return num_tokens - int(drop_r * num_tokens)


def prune_blocks(depth: int) -> tuple[int, ...]:
    """The README's prune blocks (0, 3, 6 of 12, 0-based), scaled to ``depth``."""
    return tuple(sorted({0, depth // 4, depth // 2}))


LAYERS = ("mlp", "block")  # where the shift is measured: across the MLP (the paper's), or the whole block


def reprshift_reducer(target: int, layer: str = "mlp") -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer that keeps the ``target`` tokens (prefix included) the ``layer`` moved most."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        p = ctx.num_prefix
        if x.shape[1] <= target:
            return x
        before = ctx.mlp_input if layer == "mlp" else ctx.block_input
        shift = representation_shift(x[:, p:], before[:, p:])
        return keep_tokens(ctx, x, largest_shift(shift, target - p) + p)

    return reduce


@register_method
class RepresentationShift(Method):
    """Representation Shift: keep the tokens whose representation the MLP changed most (Choi et al., ICCV 2025)."""

    name = "reprshift"
    version = "1"
    cannot_train = ("Representation Shift is a training-free metric (arXiv 2508.00367, abstract: token "
                    "compression 'without attention maps or retraining'); the README gives evaluation only")
    stage = "post"
    premises = Premises(tracks_positions=True)
    knob = Knob("drop_r", float, 0.0, 0.99, identity=0.0)

    @dataclass(frozen=True)
    class Options:
        drop_loc: Optional[tuple[int, ...]] = None  # 0-based pruning blocks (default: 0, 3, 6 of 12 scaled)
        layer: str = "mlp"  # the shift across the MLP (the paper's) or across the whole "block"

    @property
    def layer(self) -> str:
        """Where the shift is measured: "mlp" (the paper's) or "block"."""
        layer = self.options.layer
        if layer not in LAYERS:
            raise HarnessError(f"reprshift layer {layer!r}; choices: {', '.join(LAYERS)}")
        return layer

    def drop_loc(self, depth: int) -> tuple[int, ...]:
        """0-based blocks that prune, for a model of ``depth`` blocks."""
        loc = self.options.drop_loc
        return prune_blocks(depth) if loc is None else chosen_blocks(loc, depth, f"{self.name} drop_loc")

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

    def reducers(self, model, arch, value: float) -> dict:
        return self.follow(model, arch, self.schedule(arch, value))

    def follow(self, model, arch, schedule: Schedule) -> dict:
        """Prune by representation shift to ``schedule`` (whole tokens), after each block's MLP."""
        return {i: reprshift_reducer(n, self.layer) for i, n in shrinking_blocks(schedule).items()}
