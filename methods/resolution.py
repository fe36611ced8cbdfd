"""Lower input resolution: the unpatched model on a smaller patch grid (a baseline to beat).

Paper: Liao et al., "Are We Using the Right Benchmark: An Evaluation Framework for Visual Token
Compression Methods" (VTC-Bench), ACL 2026, arXiv 2510.07143. Reference repository:
Chenfei-Liao/VTC-Bench, commit 983e443ebb41fac8db19829499fe388c87885b58 (read: the README's
downsampling baseline and ``external/DART/Qwen2-VL/qwen-vl-utils/.../vision_process.py``, where
the image is resized with PIL to a size whose sides are multiples of the patch factor before it is
tokenised). Their finding: simply downsampling the image beats many token-compression methods at
the same token count. Here it is the reference line every other method must beat (``baseline``).

Modifications: none inside the blocks. At a knob value below 1 the model runs at a smaller patch
grid (h, w) chosen by :func:`grid_for_fraction`:

- the absolute position embedding is resampled to (h, w) by timm itself
  (``VisionTransformer.set_input_size``: bicubic, antialiased, prefix rows kept);
- a forward pre-hook on ``patch_embed`` resizes the incoming image to (h x patch, w x patch)
  pixels (bilinear, antialiased, ``align_corners=False``) before the patch embedding;
- every block then runs all (h x w) patches plus the prefix tokens, so the schedule is that count
  in every block, and the stem embeds h x w patches (``analytic_gmacs`` scales the stem with the
  patches entering).

At the identity (1.0) nothing is resized and no hook is installed: the logits are the unpatched
model's, bit for bit. The seam is installed without reducers only so that ``observed`` records the
tokens each block passes on, as for every other method.

Deviations from the paper and the reference code, and why:

- The image is resized inside the model, from the harness's eval tensor (224 x 224 after the
  model's own transform, normalised), not once from the original file as the reference (and any
  real deployment) does with PIL: the harness feeds every method the same tensor. For the CIFAR-10
  reference models the 32 x 32 originals are first upsampled to 224 by the eval transform and then
  downsampled here, so the reduced image is a resampling of a resampling (slightly blurrier than a
  single resize from the original; which way it moves accuracy is not known).
- The resampling filter: VTC-Bench downsamples with PIL's bicubic filter by an integer factor;
  here ``F.interpolate(mode="bilinear", antialias=True)`` resizes to the grid's pixel size, which is
  rarely an integer factor of 224 (208, 192, 160 px). Antialiased bilinear was chosen because it is
  defined for any size and differentiable; it is a different low-pass than PIL bicubic, so
  accuracies can differ slightly from the reference's at the same grid.
- The reference downsamples by a pixel ratio for a native-resolution encoder (Qwen2-VL); a timm
  ViT has a fixed grid, so the knob is the fraction of the native patch count, and the grid is the
  largest (h, w) with h x w <= fraction x native count, |h - w| <= 1 patch and neither side above the
  native side: at most one patch of aspect distortion (e.g. 13 x 14 on a 14 x 14 model, 208 x 224
  pixels, squeezes the image's height by 1/14 relative to its width), allowed for twice as many
  GMACs steps as square grids give. The extra one is a column (h = k rows, w = k + 1 columns).
- GMACs move in whole-grid steps (DeiT 224/16: 14x14 = 196 patches, 13x14 = 182, 13x13 = 169,
  12x13 = 156, 12x12 = 144, ...), so a fraction budget can land further than 2 % from its target:
  such a cell is recorded ``off_target`` by the harness, never ``ok``.
- Models with a non-square native grid, no ``set_input_size``, a hybrid (CNN) stem or blocks that
  are not timm's ``vision_transformer.Block`` (rotary / relative-position families) are refused as
  unsupported below the identity knob.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from harness.errors import UnsupportedModel
from harness.registry import Knob, Method, register_method
from harness.schedule import Schedule
from harness.seam import check_blocks

# the budget solver rounds a float knob to 6 decimals before it compares the two sides of a step
# (harness.sweep.budget._candidates): quantising the same way puts each grid's threshold halfway between
# two such values, so the solver's lower and upper candidates always land on the two grids either side
KNOB_DECIMALS = 6


def allowed_grids(side: int) -> list[tuple[int, int]]:
    """Grids (h, w) of a ``side`` x ``side`` model with |h - w| <= 1 and neither side above ``side``,
    by patch count: (1, 1), (1, 2), (2, 2), (2, 3), ..., (side, side)."""
    grids = [(k, k) for k in range(1, side + 1)] + [(k, k + 1) for k in range(1, side)]
    return sorted(grids, key=lambda g: g[0] * g[1])


def grid_for_fraction(fraction: float, side: int) -> tuple[int, int]:
    """The largest allowed grid with at most ``fraction`` of the ``side`` x ``side`` patches; (1, 1)
    below one patch. Monotone in ``fraction``; (side, side) at 1.

    ``fraction`` counts to 6 decimals, and a fraction within 1e-6 of a grid's share reaches it:
    182 / 196 gives 13 x 14 although its 6-decimal form, 0.928571, is 181.99992 patches.
    """
    limit = (round(float(fraction), KNOB_DECIMALS) + 10 ** -KNOB_DECIMALS) * side * side
    fitting = [g for g in allowed_grids(side) if g[0] * g[1] <= limit]
    return fitting[-1] if fitting else (1, 1)


def native_side(num_patches: int) -> int:
    """The side of a square native grid of ``num_patches``; a non-square grid is unsupported."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise UnsupportedModel(f"resolution needs a square native patch grid; {num_patches} patches is not one")
    return side


def resize_images(x: torch.Tensor, size_px: tuple[int, int]) -> torch.Tensor:
    """Images (B, C, H, W) resized to ``size_px`` (height, width): bilinear, antialiased."""
    return F.interpolate(x, size=size_px, mode="bilinear", antialias=True, align_corners=False)


def _resize_input(module, args, size_px: tuple[int, int]):
    # module-level (a partial, not a closure over the model), so a deep copy of the model resizes too
    return (resize_images(args[0], size_px), *args[1:])


def set_grid(model: torch.nn.Module, grid: tuple[int, int]) -> tuple[int, int]:
    """Run ``model`` at patch grid ``grid``: timm resamples its position embedding, and a pre-hook on
    the patch embedding resizes every input image to match. Returns the image size in pixels."""
    ph, pw = model.patch_embed.patch_size
    size_px = (grid[0] * ph, grid[1] * pw)
    model.set_input_size(img_size=size_px)
    model.patch_embed.register_forward_pre_hook(functools.partial(_resize_input, size_px=size_px))
    return size_px


@register_method
class LowerResolution(Method):
    """Lower resolution (baseline): the unpatched model on a smaller patch grid, image resized to it."""

    name = "resolution"
    version = "1"
    cannot_train = ("the downsampling baseline of VTC-Bench resizes the input of a frozen model "
                    "(arXiv 2510.07143: an evaluation framework, no training); fine-tuned at a lower "
                    "resolution it would be another baseline (FixRes), not this one")
    knob = Knob("patches", float, 0.0, 1.0, identity=1.0)
    baseline = True

    def grid(self, arch, value: float) -> tuple[int, int]:
        """The patch grid (h, w) at knob ``value`` (fraction of the native patch count)."""
        return grid_for_fraction(value, native_side(arch.num_patches))

    def schedule(self, arch, value: float) -> Schedule:
        h, w = self.grid(arch, value)
        tokens = arch.num_prefix + h * w
        return Schedule(tokens, (tokens,) * arch.depth)

    def describe(self, arch, value) -> dict:
        h, w = self.grid(arch, value)
        return {"grid": [h, w]}

    def patch(self, model, value: float, arch) -> None:
        side = native_side(arch.num_patches)
        if tuple(model.patch_embed.grid_size) != (side, side):
            raise UnsupportedModel(f"resolution: the model's grid {tuple(model.patch_embed.grid_size)} is not the "
                                   f"{side} x {side} its schedule assumes")
        grid = self.grid(arch, value)
        if grid != (side, side):
            if check_blocks(model) != "vit" or not hasattr(model, "set_input_size"):
                raise UnsupportedModel(f"resolution resamples timm VisionTransformer position embeddings only, not "
                                       f"{type(model).__name__}'s")
            if getattr(model.patch_embed, "backbone", None) is not None:
                raise UnsupportedModel("resolution: a hybrid stem's grid cell is not one patch of pixels (its CNN "
                                       "downsamples first), so the image size for a grid is not patch x grid")
            set_grid(model, grid)
        self.install(model, {})  # records each block's tokens; reduces nothing
