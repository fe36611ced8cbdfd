"""Compute budgets: parse what the user asked, solve the method's knob, record what was achieved.

A budget is a fraction of the baseline's GMACs (``0.7``), an absolute target (``gmacs=2.9``) or the
method's native knob (``r=13``, ``keep_rate=0.7``). For GMACs targets the knob is solved on the
analytic GMACs of the method's schedule, which is monotone in the knob.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from harness.errors import HarnessError
from harness.schedule import ArchSpec, Schedule, analytic_gmacs

# A GMACs target further than this (relative) outside what the knob can reach is a recorded skip.
REACH_TOLERANCE = 0.02
# A cell whose achieved GMACs are further than this (relative) from its target is ``off_target``:
# measured and kept, but never an ``ok`` row under that budget.
TARGET_TOLERANCE = 0.02


@dataclass(frozen=True)
class Budget:
    """A budget. ``kind`` is fraction, gmacs or knob; ``knob`` names the knob.

    ``text`` is canonical (:func:`canonical_text`): ``0.70``, ``7e-1`` and ``0.7`` are one budget,
    ``0.7``, which is what a cell's id hashes and its record stores.
    """

    text: str
    kind: str
    value: float
    knob: Optional[str] = None


@dataclass(frozen=True)
class Resolved:
    """A budget solved for one method on one model."""

    knob_value: Optional[float]
    schedule: Schedule
    gmacs: float
    gmacs_target: Optional[float]
    skip_reason: Optional[str] = None


def number_text(value: float) -> str:
    """The shortest text that reads back as ``value``, without a trailing ``.0`` (``0.7``, ``13``, ``2.9``)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def canonical_text(kind: str, value: float, knob: Optional[str] = None) -> str:
    """A budget's one spelling: ``0.7``, ``gmacs=2.9`` or ``r=13``, whatever zeros or exponent it was typed with."""
    prefix = {"fraction": "", "gmacs": "gmacs="}.get(kind, f"{knob}=")
    return prefix + number_text(value)


def parse_budget(text: str) -> Budget:
    """Parse ``0.7``, ``gmacs=2.9`` or ``<knob>=<value>``; malformed or out-of-range input raises."""
    text = str(text).strip()
    key, sep, raw = text.partition("=")
    try:
        value = float(raw if sep else text)
    except ValueError:
        raise HarnessError(f"malformed budget {text!r}: use a fraction (0.7), gmacs=2.9 or knob=value (r=13)") from None
    if not math.isfinite(value):
        raise HarnessError(f"budget {text!r} is not a finite number")
    if not sep:
        if not 0 < value <= 1:
            raise HarnessError(f"budget {text} out of range: a fraction of the baseline GMACs must be in (0, 1]")
        return Budget(canonical_text("fraction", value), "fraction", value)
    key = key.strip()
    if key == "gmacs":
        if value <= 0:
            raise HarnessError(f"budget {text!r} out of range: a GMACs target must be positive")
        return Budget(canonical_text("gmacs", value), "gmacs", value)
    if not key.isidentifier():
        raise HarnessError(f"malformed budget {text!r}: {key!r} is not a knob name")
    return Budget(canonical_text("knob", value, key), "knob", value, knob=key)


def _gmacs_at(method, arch: ArchSpec, value: float) -> float:
    return analytic_gmacs(arch, method.schedule(arch, value))


def _candidates(method, arch: ArchSpec, target: float) -> list[float]:
    knob = method.knob
    if knob.kind is int:
        return list(range(int(knob.low), int(knob.high) + 1))
    # Bisection on a monotone function; which end removes more is read off the end points.
    lo, hi = float(knob.low), float(knob.high)
    increasing = _gmacs_at(method, arch, hi) >= _gmacs_at(method, arch, lo)
    for _ in range(50):
        mid = (lo + hi) / 2
        if (_gmacs_at(method, arch, mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    # rounded before the choice, so a step-function knob cannot flip to the other side afterwards
    return [round(lo, 6), round(hi, 6)]


def resolve(method, arch: ArchSpec, budget: Budget) -> Resolved:
    """Solve ``budget`` for ``method`` (a Method instance) on ``arch``.

    Raises:
        HarnessError: a knob budget names another method's knob or is out of the knob's range.
    """
    knob = method.knob
    if budget.kind == "knob":
        if knob is None or budget.knob != knob.name:
            have = knob.name if knob else "no knob"
            raise HarnessError(f"budget {budget.text!r} does not apply to method {method.name!r} (its knob: {have})")
        value = knob.check(budget.value)
        schedule = method.schedule(arch, value)
        return Resolved(value, schedule, analytic_gmacs(arch, schedule), None)
    baseline = analytic_gmacs(arch, Schedule.full(arch))
    target = budget.value * baseline if budget.kind == "fraction" else budget.value
    if knob is None:
        return Resolved(None, Schedule.full(arch), baseline, target, "method has no knob: it runs once, as the baseline")
    values = _candidates(method, arch, target)
    best = min(values, key=lambda v: abs(_gmacs_at(method, arch, v) - target))
    schedule = method.schedule(arch, best)
    achieved = analytic_gmacs(arch, schedule)
    reach = [_gmacs_at(method, arch, v) for v in (knob.low, knob.high)]
    if not min(reach) * (1 - REACH_TOLERANCE) <= target <= max(reach) * (1 + REACH_TOLERANCE):
        reason = f"target {target:.3f} GMACs outside what {knob.name} reaches ({min(reach):.3f}..{max(reach):.3f})"
        return Resolved(best, schedule, achieved, target, reason)
    return Resolved(best, schedule, achieved, target)


def off_pct(gmacs: float, target: Optional[float]) -> Optional[float]:
    """How far ``gmacs`` lands from ``target``, in percent of the target (signed); None without a target."""
    return None if target is None else round(100 * (gmacs / target - 1), 3)


def off_target(gmacs: float, target: Optional[float], tolerance: float = TARGET_TOLERANCE) -> Optional[str]:
    """Why ``gmacs`` does not count as meeting ``target`` (None when it does, or there is no target)."""
    if target is None or abs(gmacs / target - 1) <= tolerance:
        return None
    return (f"achieved {gmacs:.3f} GMACs for a {target:.3f} GMACs target ({100 * (gmacs / target - 1):+.1f} %, "
            f"tolerance ±{100 * tolerance:g} %)")
