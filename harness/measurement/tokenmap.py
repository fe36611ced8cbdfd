"""Token maps: which image patches each surviving token stands for, drawn on real test images.

Provenance is tracked generically, without touching the seam or any method: for the length of one
reducer call, each token carries P extra channels, its composition over the P image patches
(one-hot before anything is reduced, zero for prefix tokens). Every reducer in the harness takes
its decision from ``ctx`` (``ctx.keys()``, ``ctx.cls_attn()``, a seeded generator), never from the
values of ``x``, and then moves whole token rows: it gathers them (pruning), averages them by size
(ToMe) or sums them with weights (EViT's fused token). Applied to ``[x, S]`` the same operations
carry ``S`` along: a surviving token's row of ``S`` is non-zero exactly on the patches it stands for.
The extra channels are split off again before the MLP, so the model computes what it always does;
:func:`trace` checks that (tracked logits == untracked logits) and refuses a reducer that breaks
the assumption (one that reads ``x``'s values or width: MCTF's metric, ToFu's norms) or mixes tokens
with negative weights (DCT's low-pass filter: its tokens are not groups of patches); those methods
are left out of the figure with a warning saying why.

Each patch is then *kept* (its token stands for it alone), *merged* (its token stands for several
patches: ToMe's merges, EViT's fused token) or *dropped* (no surviving token has it).
"""
from __future__ import annotations

import colorsys
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from harness.errors import HarnessError

log = logging.getLogger(__name__)

DROPPED, KEPT, MERGED = -1, 0, 1


@dataclass
class Trace:
    """One method's forward on a batch.

    Attributes:
        sources: per block, (B, N_i, P) bool: which patches each token leaving the block stands for.
        logits: (B, classes) of the tracked forward.
    """

    sources: list[torch.Tensor]
    logits: torch.Tensor


def _tracking_reducer(reducer, tracker: dict, num_patches: int):
    def reduce(x: torch.Tensor, ctx) -> torch.Tensor:
        if ctx.index == 0:
            b, n = x.shape[:2]
            eye = torch.eye(num_patches, dtype=x.dtype, device=x.device).expand(b, -1, -1)
            tracker["S"] = torch.cat([x.new_zeros(b, n - num_patches, num_patches), eye], 1)
            tracker["sources"], tracker["min_weight"] = [], 0.0
        src = tracker["S"]
        if reducer is not None:
            c = x.shape[-1]
            out = reducer(torch.cat([x, src.to(x.dtype)], -1), ctx)
            x, src = out[..., :c], out[..., c:]
        tracker["S"] = src
        tracker["min_weight"] = min(tracker["min_weight"], src.min().item())  # eager only: a token map, not a sweep
        tracker["sources"].append(src > 0)
        return x

    return reduce


def track(model) -> dict:
    """Wrap every block's reducer of a patched ``model`` so it records token provenance.

    Returns:
        The tracker dict; after a forward, ``tracker["sources"]`` holds one (B, N_i, P) bool per block.
    """
    from harness import seam

    if seam.token_state(model) is None:
        seam.install(model, {})  # the baseline: identity reducers still record
    tracker: dict = {}
    num_patches = model.patch_embed.num_patches
    seam.wrap_reducers(model, lambda _, reducer: _tracking_reducer(reducer, tracker, num_patches), every_block=True)
    return tracker


@torch.no_grad()
def trace(make_patched, images: torch.Tensor, check: bool = True) -> Trace:
    """Run a freshly patched model on ``images`` with provenance tracking.

    Args:
        make_patched: () -> a freshly built and patched model (called twice when ``check``).
        images: (B, 3, H, W) normalised model input.
        check: also run an untracked copy and require equal logits (the tracking must be invisible).

    Raises:
        RuntimeError: tracking changed the model's output, so the provenance cannot be trusted.
    """
    model = make_patched()
    tracker = track(model)
    logits = model(images)
    negative = tracker["min_weight"]
    if negative < -1e-5:
        raise RuntimeError(f"a reducer mixes tokens with negative weights (provenance weight {negative:.2g}): its "
                           f"tokens are not groups of patches, so there is no token map to draw")
    if check:
        plain = make_patched()(images)
        if not torch.allclose(logits, plain, atol=1e-4, rtol=1e-4):
            raise RuntimeError("provenance tracking changed the logits: a reducer reads token values or width "
                               f"(max diff {(logits - plain).abs().max().item():.2e}); token maps would be wrong")
    return Trace(tracker["sources"], logits)


def patch_roles(sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patch, its role and owner token, from one image's (N, P) bool provenance.

    Returns:
        ``role`` (P,) DROPPED / KEPT / MERGED and ``owner`` (P,) the index of the token that stands
        for the patch (-1 when dropped).
    """
    has = sources.any(0)
    owner = torch.where(has, sources.float().argmax(0), torch.full_like(has, -1, dtype=torch.long))
    group = sources.sum(1)  # patches per token
    role = torch.full(owner.shape, DROPPED, dtype=torch.long)
    role[has] = torch.where(group[owner[has]] > 1, MERGED, KEPT)
    return role, owner


def _group_colours(num_tokens: int):
    """A colour per token, hues spread by the golden ratio so neighbouring indices differ."""
    import numpy as np

    hues = (np.arange(num_tokens) * 0.618034) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.75, 0.95) for h in hues])


def render(image, sources: torch.Tensor, grid: int):
    """An (H, W, 3) float picture: kept patches as they are, dropped greyed, merged tinted by token.

    Args:
        image: (H, W, 3) float in [0, 1], what the model saw.
        sources: (N, P) bool provenance of one image after some block.
        grid: patches per side (P = grid * grid).
    """
    import numpy as np

    role, owner = (t.numpy() for t in patch_roles(sources))
    h, w = image.shape[:2]
    ph, pw = h // grid, w // grid
    up = lambda a: np.kron(a.reshape(grid, grid), np.ones((ph, pw), dtype=a.dtype))  # noqa: E731
    role_px, owner_px = up(role), up(owner)
    grey = image.mean(-1, keepdims=True) * 0.3 + 0.62
    tint = _group_colours(sources.shape[0])[np.clip(owner_px, 0, None)]
    out = np.where((role_px == DROPPED)[..., None], grey, image)
    out = np.where((role_px == MERGED)[..., None], 0.4 * image + 0.6 * tint, out)
    # thin white outlines around merged groups (kept patches stay clean)
    merged = role_px == MERGED
    edge = np.zeros(owner_px.shape, dtype=bool)
    edge[:, 1:] |= (owner_px[:, 1:] != owner_px[:, :-1]) & (merged[:, 1:] | merged[:, :-1])
    edge[1:, :] |= (owner_px[1:, :] != owner_px[:-1, :]) & (merged[1:, :] | merged[:-1, :])
    out[edge] = 1.0
    return out


def default_depths(depth: int) -> list[int]:
    """Blocks (0-based) to show: EViT's drop blocks (4th, 7th, 10th of 12) and the last."""
    from harness.seam import drop_blocks

    return sorted({*drop_blocks(depth), depth - 1})


def _to_image(x: torch.Tensor, transform):
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def figure(plt, image, traces: dict[str, Trace], index: int, depths: list[int], grid: int,
           label: Optional[str], class_names: tuple[str, ...]):
    """One image: a row per method, the input then the token map after each block of ``depths``."""
    from matplotlib.patches import Patch

    rows, cols = len(traces), len(depths) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 0.6, 1.1 * rows + 0.5), squeeze=False)
    for r, (name, tr) in enumerate(traces.items()):
        pred = int(tr.logits[index].argmax())
        axes[r, 0].imshow(image)
        mark = "" if label is None else (" ✓" if class_names[pred] == label else " ✗")
        axes[r, 0].set_ylabel(f"{name}\n{class_names[pred]}{mark}", rotation=0, ha="right", va="center", labelpad=4)
        for c, d in enumerate(depths, 1):
            src = tr.sources[d][index]
            axes[r, c].imshow(render(image, src, grid))
            axes[r, c].set_xlabel(f"{src.shape[0]} tokens", labelpad=1)
            if r == 0:
                axes[r, c].set_title(f"after block {d + 1}")
        if r == 0:
            axes[r, 0].set_title("input" if label is None else f"input ({label})")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
    legend = [Patch(facecolor="white", edgecolor="#444444", label="kept"),
              Patch(facecolor="#9e9e9e", label="dropped"),
              Patch(facecolor="#e8a33c", label="merged (colour = token)")]
    fig.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, frameon=False)
    fig.tight_layout(h_pad=0.3, w_pad=0.2)
    return fig


@dataclass(frozen=True)
class Search:
    """Where a searching method (DiffRate) gets its schedule for a token map: the runner's calibration.

    Attributes:
        cache_root: ``<results>/cache``, the sweep's calibration cache (a search a sweep made is reused).
        calib_limit: training images the search runs on (a sweep's ``calib_limit`` finds its cached search).
    """

    cache_root: Path
    calib_limit: int

    @classmethod
    def defaults(cls) -> "Search":
        """A sweep's defaults (:class:`harness.sweep.config.RunConfig`): its results folder and ``calib_limit``."""
        from harness.sweep.config import RunConfig

        run = RunConfig()
        return cls(Path(run.results_dir) / "cache", run.calib_limit)


def token_maps(model_name: str, methods: list[str], budget_text: str, n_images: int, reports_dir: Path,
               method_options: Optional[dict] = None, configured: Optional[dict] = None, root: Optional[Path] = None,
               depths: Optional[list[int]] = None, search: Optional[Search] = None) -> list[Path]:
    """Token maps of ``methods`` at ``budget_text`` for the first ``n_images`` (class-balanced) test images.

    Runs the model (CPU, fp32); a searching method searches there too (``search``, default:
    :meth:`Search.defaults`), or reuses a cached search.
    Writes ``<reports_dir>/figures/tokenmap_<model>_<budget>_<k>.png`` per image and returns their
    paths (PNG only: the figure is raster images, which a PDF would only wrap at twice the size).
    """
    from harness.loading.data import CIFAR10_CLASSES
    from harness.loading.models import load_checkpoint, resolve_model
    from harness.paths import data_root

    root = root or data_root()
    spec = resolve_model(model_name, configured or {}, root)
    state_dict = load_checkpoint(spec)
    calibrate = _calibrator(root, n_images, search or Search.defaults())
    traces, arch, transform = _traces(spec, state_dict, methods, budget_text, method_options or {}, calibrate)
    images, labels = _images(spec, transform, root, n_images)
    names = CIFAR10_CLASSES if spec.data == "cifar10" else tuple(str(i) for i in range(10 ** 4))
    grid = int(round(arch.num_patches ** 0.5))
    if depths and max(depths) >= arch.depth:
        raise HarnessError(f"--depths {max(depths) + 1} is past {model_name}'s last block ({arch.depth})")
    return _draw(traces, images, labels, transform, names, depths or default_depths(arch.depth), grid,
                 Path(reports_dir), f"tokenmap_{model_name}_{budget_text}")


def _calibrator(root: Path, n_images: int, search: Search):
    """The runner's calibration service, on the CPU in fp32 (what a token map runs in)."""
    from harness.sweep.calibration import Calibrator
    from harness.sweep.cell import CellSettings
    from harness.loading.inputs import Inputs
    from harness.paths import DataRoot

    return Calibrator(Inputs(DataRoot(str(root)), n_images, log.info), CellSettings(), search.cache_root,
                      search.calib_limit)


def _traces(spec, state_dict, methods: list[str], budget_text: str, method_options: dict, calibrate=None):
    """Each method's trace on the images, and the model's arch and transform (from the first cell)."""
    from harness.sweep.budget import parse_budget
    from harness.sweep.cell import prepare_cell
    from harness.registry import make_method

    budget, found, first = parse_budget(budget_text), {}, None
    for name in methods:
        method = make_method(name, method_options)
        cell = prepare_cell(spec, method, budget, state_dict=state_dict, calibrate=calibrate)
        first = first or cell
        if cell.skip_reason:
            log.warning("%s at %s skipped: %s", name, budget_text, cell.skip_reason)
            continue
        if method.baseline:  # resolution: fewer, larger patches from the start, not a reduction of these
            log.warning("no token map for %s: a baseline changes the input grid, not the tokens", name)
            continue

        def make(method=cell.method, value=cell.knob_value):  # as solved (or searched, the search bound) once
            return prepare_cell(spec, method, budget, knob_value=value, state_dict=state_dict).model

        log.info("tracing %s (knob %s)", name, cell.knob_value)
        found[name] = (make, cell)
    return found, first.arch, first.transform


def _images(spec, transform, root: Path, n_images: int):
    from harness.loading.data import load_cifar10, load_eval_set

    evalset = (load_cifar10(root, "test", transform, n_images) if spec.data == "cifar10"
               else load_eval_set(spec, transform, root, n_images))
    if evalset.images is None:
        raise ValueError(f"model {spec.name} has synthetic data: no images to draw")
    return evalset.batch(0, len(evalset), torch.device("cpu"))


def _draw(found: dict, images, labels, transform, names, depths: list[int], grid: int, reports_dir: Path,
          stem: str) -> list[Path]:
    from harness.reporting.plots import paper_style, save

    traces = {}
    for name, (make, _) in found.items():
        try:
            traces[name] = trace(make, images)
        except RuntimeError as exc:  # a reducer the generic tracking cannot follow: say so, draw the rest
            log.warning("no token map for %s: %s", name, exc)
    written = []
    with paper_style() as plt:
        for i in range(len(images)):
            label = None if labels is None else names[int(labels[i])]
            fig = figure(plt, _to_image(images[i], transform), traces, i, depths, grid, label, names)
            written += save(fig, reports_dir / "figures", f"{stem}_{i}", ("png",))
    return written
