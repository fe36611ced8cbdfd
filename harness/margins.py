"""Decision margins: how close each discrete token decision came to going the other way.

Token reduction is a chain of discrete decisions (which tokens rank above the keep / merge
boundary, which partner a token merges into, which branch an image takes). When two candidates
score within a rounding error of each other, a different CPU kernel (fused or explicit attention,
AVX-512 or AVX2 summation order) can flip the decision, and one flipped merge moves the logits by
~0.07 while the method is exactly right. A fidelity check must tell such a near-tie from a bug, so
the selection code notes the margin of each decision it makes: the score gap at the decision,
divided by the largest score magnitude among the candidates (a relative gap, per image).

Outside :func:`recording` every ``note_*`` call costs one module-global read and records nothing
(also under ``torch.compile``: dynamo guards on the global being None). The log is a diagnostic
switched on by a ``with`` block, not state a run depends on: that is why it is a module global
rather than something every pure selection function would have to be handed.

Usage (the golden test)::

    with margins.recording(model) as log:
        logits = model(x)
    log.closest(image)  # -> Margin(relative=3.1e-08, block=9, decision="mctf merge rank") or None
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

_LOG: Optional["MarginLog"] = None


@dataclass(frozen=True)
class Margin:
    """The closest call of one image: its relative score gap, the block and the decision."""

    relative: float
    block: int
    decision: str


@dataclass
class MarginLog:
    """Per-image relative margins of every decision noted during one :func:`recording`."""

    block: int = -1
    entries: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)

    def add(self, decision: str, relative: torch.Tensor) -> None:
        self.entries.append((self.block, decision, relative.detach().float().cpu()))

    def closest(self, image: int) -> Optional[Margin]:
        """The smallest margin any decision had on ``image``; None when nothing was noted."""
        best: Optional[Margin] = None
        for block, decision, relative in self.entries:
            value = float(relative[image])
            if best is None or value < best.relative:
                best = Margin(value, block, decision)
        return best


def is_recording() -> bool:
    """Whether margins are being noted now: a method may skip work done only for the log."""
    return _LOG is not None


@contextlib.contextmanager
def recording(model: torch.nn.Module) -> Iterator[MarginLog]:
    """Note every decision's margin while ``model`` runs; the block index is read from ``model.blocks``."""
    global _LOG
    log = MarginLog()

    def enter(index: int):
        def hook(_module, _args):
            log.block = index
        return hook

    hooks = [blk.register_forward_pre_hook(enter(i)) for i, blk in enumerate(getattr(model, "blocks", []))]
    previous, _LOG = _LOG, log
    try:
        yield log
    finally:
        _LOG = previous
        for h in hooks:
            h.remove()


def _scale(scores: torch.Tensor) -> torch.Tensor:
    """(B,) the largest finite |score| of each image's candidates (1 where there is none)."""
    finite = torch.where(torch.isfinite(scores), scores.abs(), torch.zeros_like(scores))
    scale = finite.flatten(1).amax(dim=1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _gap(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``high - low``, +inf where the lower one is not a real candidate (-inf)."""
    return torch.where(torch.isfinite(low), high - low, torch.full_like(high, math.inf))


def note_boundary(scores: torch.Tensor, k: int, decision: str) -> None:
    """A keep / merge cut that takes the ``k`` highest of ``scores`` (B, N): the gap between the
    k-th and the (k+1)-th highest (a near-tie there swaps a token across the cut)."""
    if _LOG is None or not 0 < k < scores.shape[1]:
        return
    scores = scores.detach().float()
    top = scores.topk(k + 1, dim=1).values
    _LOG.add(decision, _gap(top[:, k - 1], top[:, k]) / _scale(scores))


def note_order(scores: torch.Tensor, decision: str, from_rank: int = 0, to_rank: Optional[int] = None) -> None:
    """A ranking whose positions matter (PiToMe's alternate A / B split by energy; tokens written
    out in score order, whose positions the next block's even / odd split reads): the smallest gap
    between neighbours in the sorted ``scores`` (B, N) over ranks ``from_rank`` to ``to_rank - 1``
    (default: all), with the pairs across a cut at either end included."""
    first, last = max(from_rank - 1, 0), scores.shape[1] if to_rank is None else to_rank + 1
    if _LOG is None or min(last, scores.shape[1]) - first < 2:
        return
    scores = scores.detach().float()
    ranked = scores.sort(dim=1, descending=True).values[:, first:last]
    _LOG.add(decision, _gap(ranked[:, :-1], ranked[:, 1:]).amin(dim=1) / _scale(scores))


def note_best(scores: torch.Tensor, rows: Optional[torch.Tensor], decision: str) -> None:
    """Each of ``rows`` (B, R) picks the highest of its ``scores`` (B, M, K) row: the gap between
    its best and second-best candidate, smallest over the rows that act (None: every row)."""
    if _LOG is None or scores.shape[-1] < 2:
        return
    scores = scores.detach().float()
    if rows is not None:
        if rows.shape[1] == 0:
            return
        scores = scores.gather(1, rows[..., None].expand(-1, -1, scores.shape[-1]))
    top = scores.topk(2, dim=-1).values
    _LOG.add(decision, _gap(top[..., 0], top[..., 1]).amin(dim=1) / _scale(scores))


def note_lowest_pair(dist: torch.Tensor, decision: str) -> None:
    """An agglomerative step that merges the closest pair of a symmetric ``dist`` (B, T, T): the
    gap between the closest pair and the next one (each pair is in ``dist`` twice, as (i, j) and (j, i))."""
    if _LOG is None or dist.shape[1] < 3:
        return
    flat = dist.detach().float().flatten(1)
    low = flat.topk(3, dim=1, largest=False).values
    _LOG.add(decision, _gap(-low[:, 0], -low[:, 2]) / _scale(flat))


def note_threshold(values: torch.Tensor, threshold: float, decision: str) -> None:
    """A per-image branch on ``values`` (B,) against ``threshold``: their relative distance."""
    if _LOG is None:
        return
    values = values.detach().float()
    scale = torch.clamp(torch.maximum(values.abs(), torch.full_like(values, abs(threshold))), min=1e-30)
    _LOG.add(decision, (values - threshold).abs() / scale)
