"""Key-norm pruning: a template plugin (copy it to ``methods/<name>.py`` or into your own package).

Not a published method: it exists to show the whole plugin contract in one short file. A real
method's docstring names the paper, the arXiv id and the reference repository here, e.g.
"Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, arXiv 2210.09461,
https://github.com/facebookresearch/ToMe".

Modifications (what the method changes in the model, block by block):
 - between attention and MLP of every block, drops the ``r`` non-prefix tokens whose key (averaged
   over heads, ``ctx.keys()``) has the smallest L2 norm; the survivors keep their original order;
 - prefix tokens (class, distillation, registers) always stay, first and in order;
 - at least one non-prefix token is always kept, so ``r`` is clamped per block; the schedule applies
   the same clamp, so it reports exactly what the forward does;
 - any other method's schedule can be followed (``follow``): ``keynorm@tome`` prunes by key
   norm at ToMe's token counts.

This file lives in ``docs/``, outside ``methods/``, so the harness does not register it. Register it
by copying it to ``methods/keynorm.py``, or from an outside package through the ``harness.methods``
entry-point group (see ``docs/adding-a-method.md``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, keep_tokens, shrinking_blocks

# The knob's upper end: 98 drops half of DeiT's 196 patches in the first block. Larger r would
# clamp in every block anyway, and the contract tests check the schedule is monotone up to here.
R_MAX = 98


# --- The algorithm: pure tensor functions, testable with hand-made tensors and no model. ---------

def clamp_r(r: int, num_tokens: int, num_prefix: int, min_kept: int = 1) -> int:
    """Tokens a block can drop: ``r``, but never the prefix tokens nor the last ``min_kept`` others."""
    return max(0, min(r, num_tokens - num_prefix - min_kept))


def smallest_norm_drop(metric: torch.Tensor, num_drop: int, num_prefix: int) -> torch.Tensor:
    """Indices (B, N - num_prefix - num_drop) of the non-prefix tokens to keep, ascending.

    Args:
        metric: (B, N, D) per-token features (here: keys averaged over heads).
        num_drop: how many non-prefix tokens to drop, the ones with the smallest ``metric`` norm.
        num_prefix: leading tokens that are never candidates (they are kept by the caller).

    Returns:
        Indices into ``metric``'s token axis (prefix offset included), sorted so that the kept
        tokens stay in their original order.
    """
    norms = metric[:, num_prefix:].float().norm(dim=-1)
    keep = norms.shape[1] - num_drop
    kept = norms.topk(keep, dim=1, largest=True, sorted=False).indices
    return kept.sort(dim=1).values + num_prefix


# --- The adapter: a reducer per block, installed at the harness's one seam. ---------------------

def keynorm_reducer(target: int):
    """The seam reducer that prunes a block's tokens down to ``target`` (prefix included)."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        num_drop = x.shape[1] - target
        if num_drop <= 0:
            return x
        index = smallest_norm_drop(ctx.keys(), num_drop, ctx.num_prefix)
        # the harness's keep_tokens: prefix first, then the kept tokens; each survivor's size (after
        # a merging method ran) and position (rope / relpos models) follow it
        return keep_tokens(ctx, x, index)

    return reduce


@register_method
class KeyNormPruning(Method):
    """Key-norm pruning (template): drop the r tokens with the smallest key norm in every block."""

    # The registry key, what users write in --methods. Must be unique among registered methods.
    name = "keynorm"
    # Bump whenever results would change: the version is part of every record and of the cell's identity.
    version = "1"
    # The native knob: its name is what budgets like ``r=8`` refer to; ``identity`` removes nothing.
    knob = Knob("r", int, 0, R_MAX, identity=0)
    # What it assumes of a model (the seam also checks each premise where it is used): pruning with
    # harness.seam.keep_tokens keeps token positions in sync, so rope / relpos models are supported.
    premises = Premises(tracks_positions=True)
    # Where in each block the reducers run: "mid" (after the attention residual, before the MLP) is
    # the default and what most papers do; written out here to show it.
    stage = "mid"

    @dataclass(frozen=True)
    class Options:
        """Every option a config may set ([methods.keynorm] in benchmark.toml), typed, with its default."""

        min_kept: int = 1  # non-prefix tokens every block keeps, at least

        def __post_init__(self):
            if self.min_kept < 1:
                raise ValueError(f"min_kept={self.min_kept}: at least one non-prefix token must stay")

    def schedule(self, arch, value: int) -> Schedule:
        """Tokens leaving each block: ``value`` fewer each time, clamped as the forward clamps."""
        tokens, out = arch.tokens_in, []
        for _ in range(arch.depth):
            tokens -= clamp_r(int(value), tokens, arch.num_prefix, self.options.min_kept)
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def reducers(self, model, arch, value: int) -> dict:
        """A reducer for each block that drops tokens at knob ``value``; the harness installs them."""
        return self.follow(model, arch, self.schedule(arch, value))

    def follow(self, model, arch, schedule: Schedule) -> dict:
        """Optional: prune to any schedule, which lets ``keynorm@<leader>`` follow another method.

        Only blocks whose count drops get a reducer (and pay for ``ctx.keys()``).
        """
        return {i: keynorm_reducer(n) for i, n in shrinking_blocks(schedule).items()}
