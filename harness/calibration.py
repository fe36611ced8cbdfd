"""Calibration as a harness service: what a searching method (DiffRate) asks the harness for.

A method that sets ``needs_calibration`` gets, in :meth:`harness.registry.Method.calibrate`, a
:class:`Calibration`: the training images (decoded when first asked for, never the test split),
the run's device and dtype, a key naming the weights and data, a cache of earlier results and a
progress channel. The method owns its search; the harness owns data, caching, progress and the
order of ranks (rank 0 searches first, the others then find its result in the cache).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from harness import distributed, progress
from harness.data import EvalSet
from harness.errors import UnsupportedModel
from harness.models import ModelSpec, eval_transform

log = logging.getLogger(__name__)


class Calibration:
    """What a calibrating method gets.

    Attributes:
        device, dtype: where and how the run evaluates.
        key: identifies model weights, data and the method's settings, for the method's cache key.
        force: search again even when a cached result exists (``--recalibrate``).
        cache_dir: the method's cache folder (None: nothing is cached).
    """

    def __init__(self, train: Union[EvalSet, Callable[[], EvalSet]], device: torch.device, dtype: str, key: dict,
                 force: bool = False, cache_dir: Optional[Path] = None):
        self._train = train
        self.device, self.dtype, self.key, self.force = device, dtype, key, force
        self.cache_dir = None if cache_dir is None else Path(cache_dir)

    @property
    def train(self) -> EvalSet:
        """Training images with labels (never the test split), class-balanced to ``calib_limit``."""
        if callable(self._train):
            self._train = self._train()
        return self._train

    def cached(self, name: str) -> Optional[dict]:
        """The result stored under ``name``; None when absent, uncached or ``force``."""
        path = self._path(name)
        if self.force or path is None or not path.is_file():
            return None
        return json.loads(path.read_text())

    def store(self, name: str, found: dict) -> None:
        """Keep ``found`` under ``name`` for later runs."""
        path = self._path(name)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(found, indent=1))

    @staticmethod
    def report(message: str, *args) -> None:
        """A progress line (throttle it: :class:`harness.progress.Throttle`)."""
        progress.report(message, *args)

    def _path(self, name: str) -> Optional[Path]:
        return None if self.cache_dir is None else self.cache_dir / f"{name}.json"


class Calibrator:
    """The service :func:`harness.cell.prepare_cell` calls for a method that searches first.

    Args:
        inputs: the sweep's shared inputs (calibration sets, checkpoint hashes).
        settings: the cells' device and dtype.
        cache_root: ``<results>/cache``; each method caches under its ``cache_name``.
        calib_limit: training images for the search.
        force: ignore cached searches.
        dist: the process group (rank 0 searches first).
    """

    def __init__(self, inputs, settings, cache_root: Path, calib_limit: int, force: bool = False,
                 dist: Optional[distributed.Dist] = None):
        self.inputs, self.settings, self.cache_root = inputs, settings, Path(cache_root)
        self.calib_limit, self.force, self.dist = calib_limit, force, dist or distributed.Dist()

    def __call__(self, method, spec: ModelSpec, model, arch, value: float) -> dict:
        transform = eval_transform(spec, model)
        if not self.inputs.eval_set(spec, transform).has_labels:
            raise UnsupportedModel(f"{method.name} searches its schedule on labelled training images and "
                                   f"{spec.data} data has none (a search on noise learns nothing); give it fixed "
                                   f"schedules instead (e.g. [methods.diffrate] schedules = \"published\")")
        train = self.inputs.calibration_set(spec, transform, self.calib_limit)
        key = {"model": spec.name, "arch": spec.arch, "checkpoint_sha": self.inputs.checkpoint_sha(spec),
               "data": train.name, "calib_limit": self.calib_limit, **method.calibration_identity()}
        data = Calibration(train, self.settings.device, self.settings.dtype, key, self.force,
                           self.cache_root / method.cache_name)
        data.cache_dir.mkdir(parents=True, exist_ok=True)
        # rank 0 searches first; the other ranks then find its result in the cache
        if not self.dist.is_main:
            distributed.barrier(self.dist)
        found = method.calibrate(model.to(self.settings.device), value, arch, data)
        if self.dist.is_main:
            distributed.barrier(self.dist)
        return found
