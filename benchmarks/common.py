"""What every benchmark shares: the model, the budget, and the methods it is run for.

Kept free of asv's name prefixes (``time_``, ``track_``, ...) so asv finds no benchmark here.
"""
from __future__ import annotations

import functools

import torch

from harness.sweep.budget import Resolved, parse_budget, resolve
from harness.sweep.cell import build_unpatched, prepare_cell
from harness.sweep.config import ModelConfig, load_config
from harness.loading.models import ModelSpec, resolve_model
from harness.paths import PROJECT_ROOT
from harness.registry import Method, make_method, method_names
from harness.schedule import ArchSpec

MODEL = "deit_small_patch16_224"
BUDGET = "0.7"  # a fraction of the baseline's analytic GMACs
METHODS = method_names()


@functools.cache
def method_options() -> dict:
    """``[methods.<name>]`` options of the project's benchmark.toml, as the default sweep uses them."""
    return load_config(PROJECT_ROOT / "benchmark.toml").method_options


def make(method: str) -> Method:
    """The method as a sweep builds it; a method that must search first (DiffRate) is skipped.

    Raises:
        NotImplementedError: the method needs calibration on data (asv records the benchmark as skipped).
    """
    instance = make_method(method, method_options())
    if instance.needs_calibration:
        raise NotImplementedError(f"{method} needs calibration on data before it has a schedule")
    return instance


def spec() -> ModelSpec:
    """DeiT-S with seeded random weights: shapes and timings do not depend on trained weights."""
    return resolve_model(MODEL, {MODEL: ModelConfig(timm=MODEL, weights="random", data="synthetic")}, None)


def deit_s() -> torch.nn.Module:
    """The unpatched DeiT-S of :func:`spec`."""
    return build_unpatched(spec())


def solve(method: str, arch: ArchSpec) -> Resolved:
    """``method`` at :data:`BUDGET` on ``arch``, solved as a sweep would."""
    return resolve(make(method), arch, parse_budget(BUDGET))


def patched(method: str) -> tuple[torch.nn.Module, Resolved]:
    """A fresh DeiT-S patched with ``method`` at :data:`BUDGET` (on the CPU), and the solved budget."""
    cell = prepare_cell(spec(), make(method), parse_budget(BUDGET))
    return cell.model, cell.resolved
