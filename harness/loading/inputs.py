"""A sweep's inputs, read once and shared by its cells: weights, their hashes, eval and calibration
sets, and the unpatched baseline each method is timed against."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from harness.sweep.cell import CellSettings, build_unpatched
from harness.loading.data import EvalSet, load_calibration_set, load_eval_set
from harness.loading.models import ModelSpec, Transform, checkpoint_sha, eval_transform, load_checkpoint
from harness.paths import DataRoot


class Inputs:
    """Caches keyed by model (and transform and limit): nothing is read or decoded twice.

    Args:
        root: the data root eval sets are found under.
        limit: eval images per model (0: the whole split).
        progress: a callable given one line before each long decode.
    """

    def __init__(self, root: DataRoot, limit: int, progress: Callable[[str], None] = lambda s: None):
        self.root, self.limit, self.progress = root, limit, progress
        self._state_dicts: dict[str, Optional[dict]] = {}
        self._shas: dict[str, Optional[str]] = {}
        self._sets: dict[tuple, EvalSet] = {}
        self._baselines: dict[str, torch.nn.Module] = {}

    def checkpoint_sha(self, spec: ModelSpec) -> Optional[str]:
        """The checkpoint's hash, read once per sweep (every cell id needs it)."""
        if spec.name not in self._shas:
            self._shas[spec.name] = checkpoint_sha(spec)
        return self._shas[spec.name]

    def state_dict(self, spec: ModelSpec) -> Optional[dict]:
        """The model's weights, read and checked once."""
        if spec.name not in self._state_dicts:
            self._state_dicts[spec.name] = load_checkpoint(spec)
        return self._state_dicts[spec.name]

    def eval_set(self, spec: ModelSpec, transform: Transform) -> EvalSet:
        """The test images a model is measured on, decoded once per transform and limit."""
        key = (spec.data, spec.data_path, transform, self.limit)
        if key not in self._sets:
            self.progress(f"loading eval set {spec.data} (limit {self.limit or 'none'}) ...")
            self._sets[key] = load_eval_set(spec, transform, self.root, self.limit)
        return self._sets[key]

    def calibration_set(self, spec: ModelSpec, transform: Transform, limit: int) -> EvalSet:
        """Training images for a method's search (never the test split), decoded once."""
        key = ("calibration", spec.data, spec.data_path, transform, limit)
        if key not in self._sets:
            self.progress(f"loading calibration set {spec.data} (limit {limit or 'none'}) ...")
            self._sets[key] = load_calibration_set(spec, transform, self.root, limit)
        return self._sets[key]

    def check(self, spec: ModelSpec) -> None:
        """Read the weights and decode the eval set now: a corrupt checkpoint or a missing dataset
        is then one error before the first cell, not a failed record per cell."""
        self.eval_set(spec, eval_transform(spec, build_unpatched(spec, self.state_dict(spec))))

    def baseline(self, spec: ModelSpec, settings: CellSettings) -> torch.nn.Module:
        """The unpatched model on the device, timed in alternation with each method's (speed-ups).

        Built once per model while the sweep stays on that model (cells come model by model;
        nothing patches or trains it); asking for another model's lets the previous one go first,
        so no model sits on the device beside cells of another.
        """
        if spec.name not in self._baselines:
            self.release_baselines()
            self._baselines[spec.name] = build_unpatched(spec, self.state_dict(spec), settings)
        return self._baselines[spec.name]

    def release_baselines(self) -> None:
        """Let every baseline go (and CUDA's cache of their memory)."""
        self._baselines.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
