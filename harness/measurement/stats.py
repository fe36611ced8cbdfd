"""The statistics the report prints: intervals for accuracies, paired tests between methods, spreads of speed-ups.

Pure functions on counts, 0/1 vectors and lists of ratios (numpy only to read prediction files):

- :func:`wilson`: the 95 % Wilson score interval of a proportion k/n (good at small n and near 0 or 1,
  where the normal interval overshoots);
- :func:`mcnemar_exact`, :func:`mcnemar`: the exact two-sided McNemar test of two classifiers scored
  on the same images, from their discordant pairs;
- :func:`paired_test`: that test for two stored records, read from their prediction files;
- :func:`ratio_summary`: median, quartiles and relative spread of per-round speed-ups;
- :func:`too_few_rounds`: why a spread (IQR, ``noisy``) or a speed-up is "n/a" from so few rounds;
- :func:`holm`, :func:`benjamini_hochberg`: p-values adjusted within a family of comparisons;
- :func:`newcombe_paired`: the 95 % interval of the difference of two paired proportions.

``docs/statistics.md`` explains how the report uses them.
"""
from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

log = logging.getLogger(__name__)

# the two-sided 95 % quantile of the standard normal
Z95 = 1.959963984540054
ALPHA = 0.05
# timing rounds a spread (IQR, the report's "noisy") or a speed-up needs: with one round q1 = q3 and
# nothing could ever look noisy; with two the quartiles are the two rounds themselves
MIN_ROUNDS = 3


class Paired(NamedTuple):
    """The discordant pairs of two classifiers on the same images, and the exact McNemar p-value.

    ``b``: images the first got right and the second wrong; ``c``: the other way round.
    """
    b: int
    c: int
    p: float


class RatioSummary(NamedTuple):
    """Median and quartiles of per-round ratios; ``spread`` = (q3 - q1) / median."""
    median: float
    q1: float
    q3: float
    spread: float


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``k / n``, as fractions (95 % by default).

    Raises:
        ValueError: ``n`` is not positive or ``k`` lies outside 0..n.
    """
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n and n > 0, got k={k}, n={n}")
    p, z2 = k / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # at k = 0 and k = n one end is exactly 0 or 1; float rounding would miss it
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c``.

    Under the null hypothesis each discordant image is equally likely to favour either classifier,
    so min(b, c) follows Binomial(b + c, 1/2); the p-value doubles its lower tail (capped at 1).
    Exact integer arithmetic: no normal approximation, right at small counts.
    """
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0), then C(n, i) built up term by term
    for i in range(1, k + 1):
        term = term * (n - i + 1) // i
        tail += term
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar(correct_a: Sequence, correct_b: Sequence) -> Paired:
    """The exact McNemar test of two 0/1 correctness vectors over the same images, in the same order.

    Raises:
        ValueError: the vectors differ in length.
    """
    import numpy as np

    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"paired vectors differ in length: {len(a)} and {len(b_)}")
    b, c = int((a & ~b_).sum()), int((b_ & ~a).sum())
    return Paired(b, c, mcnemar_exact(b, c))


def load_predictions(path: Path):
    """``(pred, label)`` int arrays from a record's ``.npz`` prediction file."""
    import numpy as np

    with np.load(path) as data:
        return np.asarray(data["pred"]), np.asarray(data["label"])


def paired_test(rec_a: dict, rec_b: dict, results_dir: Path,
                load: Callable = load_predictions) -> Optional[Paired]:
    """The exact McNemar test of two records, read from their prediction files; None when not paired.

    Two records are paired only if both name a prediction file (``predictions``, relative to
    ``results_dir``) and the same ``eval_set_sha``, and their files hold the same labels in the same
    order. A missing or unreadable file is logged and counts as unpaired.

    Args:
        rec_a, rec_b: the records (dicts; ``predictions`` and ``eval_set_sha`` are read).
        results_dir: the results directory the prediction paths are relative to.
        load: reads ``(pred, label)`` from a path; pass a cached version to read each file once.
    """
    files = [rec.get("predictions") for rec in (rec_a, rec_b)]
    shas = [rec.get("eval_set_sha") for rec in (rec_a, rec_b)]
    if not all(isinstance(f, str) and f for f in files) or not shas[0] or shas[0] != shas[1]:
        return None
    try:
        (pred_a, label_a), (pred_b, label_b) = (load(Path(results_dir) / f) for f in files)
    except (OSError, KeyError, ValueError) as exc:
        log.warning("predictions unreadable, test not available: %s", exc)
        return None
    if len(label_a) != len(label_b) or (label_a != label_b).any():
        log.warning("predictions %s and %s do not cover the same images; not paired", *files)
        return None
    return mcnemar(pred_a == label_a, pred_b == label_b)


def ratio_summary(ratios: Sequence[float]) -> RatioSummary:
    """Median, quartiles (linear interpolation, numpy's default) and relative spread of ``ratios``.

    Raises:
        ValueError: no ratios.
    """
    values = sorted(float(r) for r in ratios)
    if not values:
        raise ValueError("ratio_summary needs at least one ratio")
    median = statistics.median(values)
    if len(values) == 1:
        q1 = q3 = median
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return RatioSummary(median, q1, q3, (q3 - q1) / median if median else math.inf)


def too_few_rounds(n: int, what: str) -> Optional[str]:
    """Why ``what`` is "n/a" from ``n`` timing rounds (fewer than :data:`MIN_ROUNDS`); None when enough."""
    if n >= MIN_ROUNDS:
        return None
    return f"{n} timing round{'s' if n != 1 else ''}: {what} needs at least {MIN_ROUNDS}"


def holm(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Holm's step-down adjusted p-values, in the input order (None stays None and is not counted).

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) * p(j)): a family
    rejected where the adjusted value is below alpha keeps its family-wise error rate at alpha.
    """
    known = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, out, running = len(known), [None] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def benjamini_hochberg(pvalues: Sequence[Optional[float]]) -> list[Optional[float]]:
    """Benjamini-Hochberg q-values (step-up, false discovery rate), in the input order (None stays None).

    The i-th smallest of m p-values becomes min over j >= i of min(1, m * p(j) / j).
    """
    known = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m, out, running = len(known), [None] * len(pvalues), 1.0
    for rank in range(m - 1, -1, -1):
        p, i = known[rank]
        running = min(running, m * p / (rank + 1))
        out[i] = min(1.0, running)
    return out


def newcombe_paired(both: int, only_a: int, only_b: int, neither: int, z: float = Z95) -> tuple[float, float, float]:
    """Difference of two paired proportions (a's minus b's) and its 95 % interval, as fractions.

    Newcombe's (1998) method 10: the square-and-add of the two marginal Wilson intervals, with the
    correlation phi of the paired outcomes (no continuity correction). ``both``: images both got
    right; ``only_a``, ``only_b``: the discordant ones; ``neither``: both wrong.

    Raises:
        ValueError: a negative count or no images.
    """
    n = both + only_a + only_b + neither
    if n <= 0 or min(both, only_a, only_b, neither) < 0:
        raise ValueError(f"newcombe_paired needs non-negative counts and n > 0, got {both, only_a, only_b, neither}")
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson(both + only_a, n, z)
    l2, u2 = wilson(both + only_b, n, z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(margins) if margins else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2, p1 - p2 - delta, p1 - p2 + eps
