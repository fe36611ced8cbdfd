"""DiffRate: differentiable compression rates for pruning and merging.

Chen et al., "DiffRate: Differentiable Compression Rate for Efficient Vision Transformers",
ICCV 2023, arXiv 2305.17997, https://github.com/OpenGVLab/DiffRate (``DiffRate/patch/deit.py``,
``DiffRate/ddp.py``, ``DiffRate/merge.py``, ``DiffRate/utils.py``, ``engine.py``, ``main.py``).

The package: this file registers the method (its schedule and patch); :mod:`.merge` is the
inference step (pure tensor functions and the seam reducer), :mod:`.search` the search and
:mod:`.published` the published schedules.

Modifications (inference, :meth:`DiffRate.patch`):
 - between attention and MLP of every block whose schedule shrinks, sorts the non-prefix tokens by
   the class token's attention (softmax row of the block's attention with its size bias, averaged
   over heads), keeps the first ``prune_kept`` tokens, then merges the tokens ranked between
   ``merge_kept`` and ``prune_kept`` into their most similar kept token: cosine similarity of the
   block's features ``x`` (the residual stream after attention, as the official code; not keys);
 - the merge is an unweighted mean of a kept token and its sources (official ``mode="mean"``); the
   kept token's size grows by each source's size times its similarity (official "proportional
   attention considering similarity"); a negative similarity adds nothing (clamped at 0; the
   official code lets it subtract, which can make a size non-positive);
 - proportional attention (log size) is always on; average-pooling heads weight tokens by size;
 - prefix tokens (class, distillation, registers) stay first and never receive a merge; the
   official code protects the class token only (a distillation token would be sorted and pruned);
 - the schedule is two lists of kept counts per block, prefix included, one entry per block with
   the first block's entry the full count (``compression_rate.json``, official ``set_kept_num``);
   tokens leaving block i are ``min(entering, prune_kept[i], merge_kept[i])``, which is what the
   official forward does when a list is not decreasing;
 - blocks that shrink nothing run unpatched (the official sorts there too; order is invisible).

Schedules come from the search (default, ``schedules = "search"``: the harness calls
:meth:`DiffRate.calibrate` first, with its calibration service) or from published lists (``schedules = "published"`` reads
``<data_root>/diffrate/compression_rate.json``, any other value is a JSON file of that format).
Published entries are picked by model key (``model_key`` option, else inferred from the
architecture) and by the FLOPs key closest to the knob's target GMACs.

The search (:func:`.search.search_rates`) is the official training with frozen weights, as
:mod:`.search` describes it (candidates, masked tokens, loss, optimiser); where it departs from it:
 - deviations: no mixup / cutmix / RandAugment and no drop-path (the harness hands over the model's
   eval transform and an eval-mode model); unlabelled (synthetic) data uses the unpatched model's
   predictions as labels (the runner refuses a search on synthetic data as ``unsupported``; this
   path is for tests); sorting puts masked tokens last even if a kept token's attention is lower;
 - deviation, the start (``init = "budget"``, default): both distributions of each searched block
   start as a discretised Gaussian (width 3 candidates) around the uniform-rate schedule that meets
   the target (:func:`uniform_rate_start`: every searched block removes the same number of tokens).
   The official start, uniform over the candidates (about 100 kept tokens per block on DeiT), lies
   below a 0.9 budget; with three ImageNet epochs it climbs back, with a CPU-scale search (hundreds
   of steps) it does not (deit_small at 0.9 ended at 2.73 for a 4.14 GMACs target).
   ``init = "uniform"`` is the official start;
 - deviation, landing (``land = true``, default): the learned counts are shifted, all searched blocks
   by the same whole number of tokens, to the schedule whose analytic GMACs are closest to the target
   (:func:`land_on_target`); the record keeps ``search_gmacs_learned`` (before) and ``landing_shift``.
   The official code has no such step: it relies on the FLOPs term, which leaves a few percent.

Options (``[methods.diffrate]``): ``schedules`` ("search" | "published" | a JSON path), ``model_key``
(the file's model key, needed for ViT-B whose DeiT and MAE entries share a shape; models of another
shape ignore a published key, so one suite can mix them), and the search's
``epochs`` (3, the paper's), ``lr`` (0.01), ``min_lr`` (0.001), ``batch_size`` (64; the paper's 256
per GPU is more than a CPU search can afford, and fewer images need more, smaller steps),
``granularity`` (4), ``flops_weight`` (5), ``smoothing`` (0.1), ``seed`` (0), ``init`` ("budget" |
"uniform"), ``land`` (true). A search is cached in
the harness's calibration cache under the hash of the data key, the target and these options.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Optional

from harness.errors import HarnessError
from harness.registry import Calibrated, Knob, Method, Premises, register_method
from harness.schedule import ArchSpec, Schedule, analytic_gmacs

from .merge import (attentive_order, diffrate_reducer, match_similar, merge_mean, merge_size,  # noqa: F401
                    prune_and_merge, tokens_after)
from .published import (PUBLISHED_KEYS, PublishedSchedules, closest_entry, model_key_for,  # noqa: F401
                        parse_counts, schedules_path)
from .search import (INITS, MASK_FLOOR, SEARCH_DEFAULTS, Rates, floored, kept_probability,  # noqa: F401
                     land_on_target, masked_softmax, search_rates, searched_blocks, soft_gmacs, ste_ceil,
                     step_mask, uniform_rate_start)

log = logging.getLogger(__name__)

# the fields of a search a cell's record carries
SEARCH_FIELDS = ("search_s", "search_images", "search_epochs", "search_steps", "search_gmacs_target", "prune_kept",
                 "merge_kept", "search_key", "search_gmacs_learned", "landing_shift")


@register_method
class DiffRate(Method):
    """DiffRate: searched per-block prune and merge rates (Chen et al., ICCV 2023)."""

    name = "diffrate"
    premises = Premises(needs_class_token=True, merges=True)
    prop_attn = True
    version = "2"  # 2: the search starts at the budget and lands on it
    knob = Knob("gmacs_ratio", float, 0.05, 1.0, identity=1.0)
    needs_calibration = True
    # fine-tunes as the paper's rows with training: the rates are searched first (on the weights as given,
    # before training: prepare_cell calibrates) and stay fixed while the weights train through the
    # inference step (prune + similarity merge, gradients through the kept and merged tokens)
    cannot_train = None

    @dataclass(frozen=True)
    class Options:
        schedules: str = "search"  # "search" on data, or a published schedules file ("published")
        model_key: Optional[str] = None  # the published schedules' model (default: from the model's shape)
        epochs: int = SEARCH_DEFAULTS["epochs"]
        lr: float = SEARCH_DEFAULTS["lr"]
        min_lr: float = SEARCH_DEFAULTS["min_lr"]
        batch_size: int = SEARCH_DEFAULTS["batch_size"]
        granularity: int = SEARCH_DEFAULTS["granularity"]
        flops_weight: float = SEARCH_DEFAULTS["flops_weight"]
        smoothing: float = SEARCH_DEFAULTS["smoothing"]
        seed: int = SEARCH_DEFAULTS["seed"]
        init: str = SEARCH_DEFAULTS["init"]
        land: bool = SEARCH_DEFAULTS["land"]

        def __post_init__(self):
            if self.init not in INITS:
                raise HarnessError(f"diffrate: init must be one of {', '.join(INITS)}, got {self.init!r}")

    implicit_defaults = {"model_key": None}  # left out of ids unless given since DiffRate's first version

    def __init__(self, **options):
        super().__init__(**options)
        self.source = self.options.schedules
        self.needs_calibration = self.source == "search"
        self.search_options = {k: getattr(self.options, k) for k in SEARCH_DEFAULTS}
        self.published = None if self.needs_calibration else PublishedSchedules(
            schedules_path(self.source), self.options.model_key)

    def resolved_options(self) -> dict:
        out = {"schedules": self.source, "model_key": self.options.model_key}
        return {**out, **self.search_options} if self.needs_calibration else out

    def counts(self, arch: ArchSpec, value: float) -> Optional[tuple[list[int], list[int]]]:
        """Prune and merge kept counts per block at knob ``value`` (None: the unpatched model)."""
        if value is None or value >= self.knob.identity:
            return None
        if self.published is not None:
            return self.published.entry(arch, value)[2:]
        found = self.calibration
        if found is None or found["key"] != self._found_key(arch, value):
            raise HarnessError(f"diffrate has no searched schedule at gmacs_ratio={value}: bind the search first "
                               f"(method.with_calibration(method.calibrate(...).state); the runner does), or set "
                               f"[methods.diffrate] schedules = \"published\"")
        return found["prune_kept"], found["merge_kept"]

    def schedule(self, arch: ArchSpec, value: float) -> Schedule:
        counts = self.counts(arch, value)
        if counts is None:
            return Schedule.full(arch)
        return Schedule(arch.tokens_in, tokens_after(arch.tokens_in, *counts))

    def reducers(self, model, arch: ArchSpec, value: float) -> dict:
        counts = self.counts(arch, value)
        if counts is None:
            return {}
        if self.published is not None:
            key, flops = self.published.entry(arch, value)[:2]
            log.info("diffrate: published schedule %s at %s GFLOPs from %s", key, flops, self.published.path)
        entering = (arch.tokens_in,) + tokens_after(arch.tokens_in, *counts)
        return {i: diffrate_reducer(p, m) for i, (p, m) in enumerate(zip(*counts)) if min(p, m) < entering[i]}

    def describe(self, arch: ArchSpec, value: float) -> dict:
        """Record fields saying where the schedule at ``value`` came from."""
        if self.published is None or value is None or value >= 1.0:
            return {"schedule_source": self.source}
        key, flops = self.published.entry(arch, value)[:2]
        return {"schedule_source": self.source, "published_model": key, "published_gflops": flops}

    @staticmethod
    def _found_key(arch: ArchSpec, value: float) -> list:
        return [arch.depth, arch.tokens_in, round(float(value), 6)]

    def cache_key(self, data_key: dict, value: float) -> str:
        """Hash of what determines a search's result."""
        key = {"data": data_key, "gmacs_ratio": round(float(value), 6), "search": self.search_options,
               "method_version": self.version}
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def calibrate(self, model, value, arch, calibration) -> Calibrated:
        """Search the kept counts for ``value`` x baseline GMACs, or reuse the cached search.

        Returns the kept counts as the state (bound by the harness, :meth:`with_calibration`) and the
        search's record fields; this instance is left as it was.
        """
        if not self.needs_calibration or value >= self.knob.identity:
            return Calibrated()
        name = self.cache_key(calibration.key, value)
        found = calibration.cached(name)
        cached = found is not None
        if not cached:
            found = self._search(model, value, arch, calibration, name)
        state = {"key": self._found_key(arch, value), "prune_kept": found["prune_kept"], "merge_kept": found["merge_kept"]}
        gmacs = analytic_gmacs(arch, self.with_calibration(state).schedule(arch, value))
        fields = {**{k: found.get(k) for k in SEARCH_FIELDS}, "search_cached": cached, "search_gmacs": round(gmacs, 4)}
        return Calibrated(state, fields)

    def _search(self, model, value, arch, calibration, name: str) -> dict:
        target = value * analytic_gmacs(arch, Schedule.full(arch))
        start = time.perf_counter()
        found = search_rates(model, arch, target, calibration.train, calibration.device, calibration.dtype,
                             self.search_options, report=calibration.report)
        found.update(search_s=round(time.perf_counter() - start, 3), search_gmacs_target=round(target, 4),
                     search_key=name)
        calibration.store(name, found)
        return found
