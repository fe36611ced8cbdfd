"""Calibration as a harness service: what a searching method (DiffRate) asks the harness for.

A method that sets ``needs_calibration`` gets, in :meth:`harness.registry.Method.calibrate`, a
:class:`Calibration`: the training images (decoded when first asked for, never the test split),
the run's device and dtype, a key naming the weights and data, a cache of earlier results and a
progress channel. The method owns its search; the harness owns data, caching, progress and the
order of ranks.

One search per configuration: under ``torchrun`` rank 0 searches and the other ranks then read its
result from the cache (they never search; a rank that cannot read it fails the cell on every rank).
Processes that share a results folder (submitit jobs) search one configuration one at a time (a
file lock per cache entry), so the second finds the first's result. ``--recalibrate`` searches
each configuration once per run: a result stored by this run (``run_id``, shared by a sweep's
ranks and submitit jobs) is read, not searched again.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import pickle
import uuid
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from harness.sweep import distributed
from harness import progress
from harness.loading.data import EvalSet
from harness.errors import HarnessError, UnsupportedModel
from harness.loading.models import ModelSpec, eval_transform

log = logging.getLogger(__name__)

# the field of a stored search naming the run that searched it (what ``--recalibrate`` compares)
RUN_FIELD = "calibration_run"


class Calibration:
    """What a calibrating method gets.

    Attributes:
        device, dtype: where and how the run evaluates.
        key: identifies model weights, data and the method's settings, for the method's cache key.
        force: search again even when a cached result exists (``--recalibrate``), unless this run
            (``run_id``) stored it.
        cache_dir: the method's cache folder (None: nothing is cached).
        run_id: the run this search belongs to (default: a fresh one).
    """

    def __init__(self, train: Union[EvalSet, Callable[[], EvalSet]], device: torch.device, dtype: str, key: dict,
                 force: bool = False, cache_dir: Optional[Path] = None, run_id: Optional[str] = None):
        self._train = train
        self.device, self.dtype, self.key, self.force = device, dtype, key, force
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.run_id = run_id or uuid.uuid4().hex
        self._locks: dict[str, object] = {}

    @property
    def train(self) -> EvalSet:
        """Training images with labels (never the test split), class-balanced to ``calib_limit``."""
        if callable(self._train):
            self._train = self._train()
        return self._train

    def cached(self, name: str) -> Optional[dict]:
        """The result stored under ``name``; None when absent, uncached or to be searched again (``force``).

        Until that result is stored (:meth:`store`) or the cell ends, this process holds the entry's
        lock: another process asking for it waits, then reads what this one stored.
        """
        path = self._path(name)
        if path is None:
            return None
        self._lock(name)
        found = json.loads(path.read_text()) if path.is_file() else None
        if found is None or (self.force and found.get(RUN_FIELD) != self.run_id):
            return None
        self.release(name)
        return {k: v for k, v in found.items() if k != RUN_FIELD}

    def store(self, name: str, found: dict) -> None:
        """Keep ``found`` under ``name`` for later runs (written whole, then renamed into place)."""
        path = self._path(name)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            tmp.write_text(json.dumps({**found, RUN_FIELD: self.run_id}, indent=1))
            tmp.replace(path)
        self.release(name)

    def release(self, name: Optional[str] = None) -> None:
        """Let go of the lock on ``name`` (every lock this holds when None)."""
        for key in ([name] if name is not None else list(self._locks)):
            lock = self._locks.pop(key, None)
            if lock is not None:
                lock.close()  # closing the file drops its flock

    @staticmethod
    def report(message: str, *args) -> None:
        """A progress line (throttle it: :class:`harness.progress.Throttle`)."""
        progress.report(message, *args)

    def _path(self, name: str) -> Optional[Path]:
        return None if self.cache_dir is None else self.cache_dir / f"{name}.json"

    def _lock(self, name: str) -> None:
        if name in self._locks:
            return
        try:
            import fcntl
        except ImportError:  # no flock here (Windows): one process per results folder
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.cache_dir / f".{name}.lock", "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        self._locks[name] = handle


class Calibrator:
    """The service :func:`harness.sweep.cell.prepare_cell` calls for a method that searches first.

    Args:
        inputs: the sweep's shared inputs (calibration sets, checkpoint hashes).
        settings: the cells' device and dtype.
        cache_root: ``<results>/cache``; each method caches under its ``cache_name``.
        calib_limit: training images for the search.
        force: search again instead of reading cached searches, once per configuration and run.
        dist: the process group (rank 0 searches, the others read its result).
        run_id: names this run in the searches it stores; the jobs of one submitit sweep share it.
    """

    def __init__(self, inputs, settings, cache_root: Path, calib_limit: int, force: bool = False,
                 dist: Optional[distributed.Dist] = None, run_id: Optional[str] = None):
        self.inputs, self.settings, self.cache_root = inputs, settings, Path(cache_root)
        self.calib_limit, self.force, self.dist = calib_limit, force, dist or distributed.Dist()
        self.run_id = run_id or uuid.uuid4().hex

    def __call__(self, method, spec: ModelSpec, model, arch, value: float) -> dict:
        transform = eval_transform(spec, model)
        if not self.inputs.eval_set(spec, transform).has_labels:
            raise UnsupportedModel(f"{method.name} searches its schedule on labelled training images and "
                                   f"{spec.data} data has none (a search on noise learns nothing); give it fixed "
                                   f"schedules instead (e.g. [methods.diffrate] schedules = \"published\")")
        data = self._calibration(method, spec, transform)
        search = (lambda: method.calibrate(model.to(self.settings.device), value, arch, data))
        found, err = _attempt(search, data) if self.dist.is_main else (None, None)
        err = distributed.broadcast(_portable(err), self.dist)  # rank 0's outcome, on every rank
        if err is None and not self.dist.is_main:
            found, err = _attempt(search, data)  # rank 0's result, read from the cache
        first = distributed.first_error(_portable(err), self.dist)
        if first is not None:
            raise err if err is not None else first  # a rank's own error keeps its traceback
        return found

    def _calibration(self, method, spec: ModelSpec, transform) -> Calibration:
        train = self.inputs.calibration_set(spec, transform, self.calib_limit)
        key = {"model": spec.name, "arch": spec.arch, "checkpoint_sha": self.inputs.checkpoint_sha(spec),
               "data": train.name, "calib_limit": self.calib_limit, **method.calibration_identity()}
        if not self.dist.is_main:  # a reader: what it reads was searched by rank 0 just now
            train = functools.partial(_no_search, self.dist.rank, self.cache_root / method.cache_name)
        data = Calibration(train, self.settings.device, self.settings.dtype, key,
                           self.force and self.dist.is_main, self.cache_root / method.cache_name, self.run_id)
        data.cache_dir.mkdir(parents=True, exist_ok=True)
        return data


def _no_search(rank: int, cache_dir: Path) -> EvalSet:
    raise HarnessError(f"rank {rank} found no calibration from rank 0 in {cache_dir}: every rank must see "
                       f"the same results folder (only rank 0 searches)")


def _attempt(search: Callable[[], dict], data: Calibration) -> tuple[Optional[dict], Optional[Exception]]:
    try:
        return search(), None
    except Exception as exc:  # handed to the other ranks, then raised on every one
        return None, exc
    finally:
        data.release()


def _portable(err: Optional[Exception]) -> Optional[Exception]:
    """``err`` itself when it survives pickling (to be sent to other ranks), else a RuntimeError saying it."""
    if err is None:
        return None
    with contextlib.suppress(Exception):
        pickle.loads(pickle.dumps(err))
        return err
    return RuntimeError(f"{type(err).__name__}: {err}")
