"""A prepared cell: the one place a model is built, its budget resolved, patched and placed.

The runner, token maps, the profiling script, the asv benchmarks and the fidelity test all call
:func:`prepare_cell`, so a model runs the same way wherever it is measured or drawn:

    cell = prepare_cell(spec, make_method("tome"), parse_budget("0.7"), CellSettings(device="cuda"))
    cell.model(images)   # patched, on its device, in eval mode

A method that searches its schedule first (DiffRate) gets the search from ``calibrate`` (the
harness's :class:`harness.calibration.Calibrator`), on a model of its own; the patched model is a
fresh one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from harness import budget as budgets
from harness import measure, seam
from harness.errors import HarnessError
from harness.models import ModelSpec, Transform, build_model, eval_transform
from harness.registry import Method
from harness.schedule import ArchSpec, Schedule, analytic_gmacs, arch_spec

# (method, spec, unpatched model, arch, knob value) -> the search's record fields
Calibrate = Callable[[Method, ModelSpec, torch.nn.Module, ArchSpec, float], dict]


@dataclass(frozen=True)
class CellSettings:
    """How a cell's model runs: where, and with which attention kernels.

    Attributes:
        device: where the patched model is placed.
        dtype: the autocast dtype its forward runs in (``fp32``, ``bf16``, ``fp16``).
        attention: ``fused`` (timm's scaled_dot_product_attention) or ``eager``.
        prop_attn: proportional attention as ``mask``, ``fold`` or ``flex`` (:func:`harness.seam.set_prop_attn_impl`).
        sdpa_backend: SDPA's kernel pinned while the cell runs (``auto``: PyTorch chooses).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: str = "fp32"
    attention: str = "fused"
    prop_attn: str = "mask"
    sdpa_backend: str = "auto"

    def kernels(self):
        """The context a cell's forwards run in (SDPA's kernel pinned when asked)."""
        return measure.sdpa_kernel(self.sdpa_backend)


@dataclass
class PreparedCell:
    """A model ready to measure, and what its budget resolved to.

    Attributes:
        model: the patched model on its device, in eval mode (None when the budget is skipped).
        transform: the model's eval transform (from its own config).
        arch: the model's shape, as the schedule arithmetic reads it.
        resolved: the knob value, schedule, analytic GMACs and target (and a skip reason).
        gmacs_baseline: analytic GMACs of the unpatched model.
        searched: record fields of the method's search (empty when it did not search).
        described: record fields the method adds about its schedule (:meth:`Method.describe`).
    """

    model: Optional[torch.nn.Module]
    transform: Transform
    arch: ArchSpec
    method: Method
    resolved: budgets.Resolved
    gmacs_baseline: float
    searched: dict = field(default_factory=dict)
    described: dict = field(default_factory=dict)

    @property
    def knob_value(self) -> Optional[float]:
        return self.resolved.knob_value

    @property
    def schedule(self) -> Schedule:
        return self.resolved.schedule

    @property
    def gmacs(self) -> float:
        return self.resolved.gmacs

    @property
    def skip_reason(self) -> Optional[str]:
        return self.resolved.skip_reason

    def budget_fields(self) -> dict:
        """The record's fields about the budget: knob, GMACs planned and targeted, tokens per block."""
        r, base = self.resolved, self.gmacs_baseline
        out = {"knob": self.method.knob.name if self.method.knob else None, "knob_value": r.knob_value,
               "gmacs_target": r.gmacs_target, "gmacs": round(r.gmacs, 4), "gmacs_baseline": round(base, 4),
               "gmacs_ratio": round(r.gmacs / base, 4), "tokens_per_block": r.schedule.as_list()}
        if r.skip_reason:
            out.update(status="skipped", error=r.skip_reason)
        return out


def build_unpatched(spec: ModelSpec, state_dict: Optional[dict] = None,
                    settings: Optional[CellSettings] = None) -> torch.nn.Module:
    """The spec's model unpatched (the baseline a method is timed against); placed when ``settings`` are given."""
    model = build_model(spec, state_dict)
    if settings is not None:
        measure.set_attention(model, settings.attention)
        model = model.to(settings.device).eval()
    return model


def prepare_cell(spec: ModelSpec, method: Method, budget: Optional[budgets.Budget] = None,
                 settings: Optional[CellSettings] = None, *, knob_value: Optional[float] = None,
                 state_dict: Optional[dict] = None, calibrate: Optional[Calibrate] = None) -> PreparedCell:
    """Build ``spec``'s model, resolve ``budget`` (or take ``knob_value``), patch it with ``method``, place it.

    Args:
        spec: the model (:func:`harness.models.resolve_model`).
        method: the method instance (:func:`harness.registry.make_method`).
        budget: what the user asked (None: no knob, or ``knob_value`` given).
        settings: device and kernels (default: CPU, fp32, fused attention, mask).
        knob_value: a fixed knob value instead of solving ``budget``.
        state_dict: the model's weights already read (:func:`harness.models.load_checkpoint`).
        calibrate: the harness's search service, for a method that ``needs_calibration``.

    Raises:
        HarnessError: a calibrating method's schedule is asked for without ``calibrate``.
    """
    settings = settings or CellSettings()
    model = build_model(spec, state_dict)
    arch, transform = arch_spec(model), eval_transform(spec, model)
    searched = {}
    if method.needs_calibration and budget is not None and knob_value is None:
        unreachable = search_skip(method, arch, budget)
        if unreachable:  # recorded as skipped, like any method's unreachable budget: no search, no model
            return PreparedCell(None, transform, arch, method, unreachable, unreachable.gmacs)
        if calibrate is None:
            raise HarnessError(f"{method.name} searches its schedule on data first: prepare_cell needs calibrate")
        # the search meets the target itself: the knob is the GMACs ratio, no bisection
        knob_value = calibration_knob(method, arch, budget)
        method, searched = bind_calibration(method, calibrate(method, spec, model, arch, knob_value))
        model = build_model(spec, state_dict)  # patch a fresh model after the search
    resolved, baseline = solve(method, arch, budget, knob_value)
    cell = PreparedCell(None, transform, arch, method, resolved, baseline, searched)
    if not resolved.skip_reason:
        cell.model = _patch_and_place(model, method, resolved.knob_value, arch, settings)
        cell.described = method.describe(arch, resolved.knob_value)
    return cell


def bind_calibration(method: Method, found) -> tuple[Method, dict]:
    """The method bound to what its search found (a copy: the searching instance is left as it was)
    and the record fields of the search. A plugin of the first contract returned the fields alone."""
    if isinstance(found, dict):
        return method, found
    return method.with_calibration(found.state), dict(found.fields)


def _patch_and_place(model, method: Method, value, arch: ArchSpec, settings: CellSettings) -> torch.nn.Module:
    measure.set_attention(model, settings.attention)
    method.patch(model, value, arch)
    seam.set_prop_attn_impl(model, settings.prop_attn)  # a no-op where the method tracks no sizes
    return model.to(settings.device)


def solve(method: Method, arch: ArchSpec, budget: Optional[budgets.Budget],
          knob_value: Optional[float] = None) -> tuple[budgets.Resolved, float]:
    """The budget resolved for ``method`` on ``arch`` (at ``knob_value`` when fixed), and the baseline GMACs."""
    baseline = analytic_gmacs(arch, Schedule.full(arch))
    if knob_value is not None:
        schedule = method.schedule(arch, knob_value)
        # the target asked (a calibrating method's knob may sit at the end of its range, within tolerance)
        target = None if budget is None or budget.kind == "knob" else _target_ratio(arch, budget) * baseline
        return budgets.Resolved(knob_value, schedule, analytic_gmacs(arch, schedule), target), baseline
    if budget is None or method.knob is None:
        return budgets.Resolved(None, method.schedule(arch, None), baseline, None), baseline
    return budgets.resolve(method, arch, budget), baseline


def calibration_knob(method: Method, arch: ArchSpec, budget: budgets.Budget) -> float:
    """The knob of a calibrating method (its target as a fraction of the baseline GMACs) for ``budget``."""
    if budget.kind == "knob":
        if budget.knob != method.knob.name:
            raise HarnessError(f"budget {budget.text!r} does not apply to {method.name!r} (its knob: {method.knob.name})")
        return method.knob.check(budget.value)
    ratio = _target_ratio(arch, budget)
    # within the reach tolerance every method allows (budgets.REACH_TOLERANCE), the nearest end of the range
    return method.knob.check(round(min(max(ratio, method.knob.low), method.knob.high), 6))


def search_skip(method: Method, arch: ArchSpec, budget: budgets.Budget) -> Optional[budgets.Resolved]:
    """The skipped budget of a calibrating method whose GMACs target its knob cannot reach (None: reachable).

    The same rule as :func:`harness.budget.resolve` for every other method: a target further than
    ``REACH_TOLERANCE`` outside the knob's range is a recorded skip with the reason, never an error.
    A knob budget is checked against the knob's range when the sweep is planned.
    """
    if budget.kind == "knob":
        return None
    knob, baseline = method.knob, analytic_gmacs(arch, Schedule.full(arch))
    ratio, tol = _target_ratio(arch, budget), budgets.REACH_TOLERANCE
    if knob.low * (1 - tol) <= ratio <= knob.high * (1 + tol):
        return None
    reason = (f"target {ratio * baseline:.3f} GMACs outside what {knob.name} reaches "
              f"({knob.low * baseline:.3f}..{knob.high * baseline:.3f})")
    return budgets.Resolved(None, Schedule.full(arch), baseline, ratio * baseline, reason)


def _target_ratio(arch: ArchSpec, budget: budgets.Budget) -> float:
    """A fraction or GMACs budget as a fraction of the baseline's GMACs."""
    return budget.value if budget.kind == "fraction" else budget.value / analytic_gmacs(arch, Schedule.full(arch))
