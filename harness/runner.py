"""The sweep: models x methods x budgets, one tidy record per cell, written the moment it ends.

A cell's run reads as its steps: build the model, solve the budget, patch, evaluate, time, record.
Bad input fails before any cell runs (HarnessError, exit 2); a cell that fails at run time is a
record with ``status`` and ``error`` and the sweep goes on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from harness import budget as budgets
from harness import progress
from harness import distributed
from harness import measure
from harness import seam
from harness.config import Config
from harness.data import EvalSet, load_calibration_set, load_eval_set
from harness.errors import HarnessError, UnsupportedModel
from harness.models import ModelSpec, build_model, checkpoint_sha, eval_transform, load_checkpoint, resolve_model
from harness.paths import DataRoot
from harness.registry import Method, make_method, method_names
from harness.schedule import Schedule, analytic_gmacs, arch_spec
from harness.store import ResultStore

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CalibrationData:
    """What a calibrating method (DiffRate's search) gets: the train split and the run's settings.

    Attributes:
        train: training images with labels (never the test split), class-balanced to ``calib_limit``.
        device, dtype: where and how the run evaluates.
        key: identifies model weights and data, for the method's cache key.
        force: search again even when a cached result exists (``--recalibrate``).
    """

    train: EvalSet
    device: torch.device
    dtype: str
    key: dict
    force: bool = False


@dataclass(frozen=True)
class Cell:
    """One measurement: a model, a method and a budget (None for methods without a knob)."""

    model: str
    method: str
    budget: Optional[budgets.Budget]

    @property
    def budget_text(self) -> str:
        return self.budget.text if self.budget else "baseline"


def selected_methods(names: tuple[str, ...], options: dict) -> dict[str, Method]:
    """Expand ``all`` (every registered method) and build each method; unknown names and options raise."""
    if "all" in names:
        names = tuple(method_names()) + tuple(n for n in names if n != "all")
    return {n: make_method(n, options) for n in dict.fromkeys(names)}


def expand(models: dict[str, list[budgets.Budget]], methods: dict[str, Method]) -> list[Cell]:
    """All cells of a sweep, for each model its own budgets.

    A knob budget applies to the methods with that knob, and must fit one of them.
    """
    knobs = {name: m.knob for name, m in methods.items()}
    for b in {b for bs in models.values() for b in bs}:
        if b.kind == "knob":
            fits = [m for m, k in knobs.items() if k and k.name == b.knob]
            if not fits:
                have = sorted({k.name for k in knobs.values() if k})
                raise HarnessError(f"budget {b.text!r}: no selected method has knob {b.knob!r} (knobs: {', '.join(have) or 'none'})")
            for m in fits:
                knobs[m].check(b.value)
    cells = []
    for model, budget_list in models.items():
        for m in methods:
            if knobs[m] is None:
                cells.append(Cell(model, m, None))
                continue
            cells += [Cell(model, m, b) for b in budget_list if b.kind != "knob" or b.knob == knobs[m].name]
    return cells


class Sweep:
    """A prepared sweep: inputs validated, checkpoints read, eval sets decoded once and shared."""

    def __init__(self, cfg: Config, progress: Progress = lambda s: None):
        self.cfg, self.run, self.progress = cfg, cfg.run, progress
        suite = cfg.suite
        self.root = DataRoot(self.run.data_root)
        self.device = measure.resolve_device(self.run.device)
        self.dist = distributed.init_from_env(self.device)
        if self.dist.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if not self.dist.is_main:
            self.progress = lambda s: None
        self.dtype = measure.resolve_dtype(self.run.dtype, self.device)
        if self.run.limit < 0 or self.run.batch_size <= 0:
            raise HarnessError("limit must be >= 0 and batch_size > 0")
        self.methods = selected_methods(suite.methods, cfg.suite_method_options)
        unknown = set(suite.budgets_by_model) - set(suite.models)
        if unknown:
            raise HarnessError(f"budgets_by_model names models not in the suite: {', '.join(sorted(unknown))}")
        self.specs = {name: resolve_model(name, cfg.models, self.root) for name in suite.models}
        self.cells = expand({name: [budgets.parse_budget(b) for b in suite.budgets_for(name)] for name in self.specs},
                            self.methods)
        self.store = ResultStore(Path(self.run.results_dir))
        self.store.ensure_writable()
        self._state_dicts: dict[str, Optional[dict]] = {}
        self._shas: dict[str, Optional[str]] = {}
        self._eval_sets: dict[tuple, EvalSet] = {}
        self._baselines: dict[str, torch.nn.Module] = {}
        self.env = measure.environment(self.device)

    def cell_key(self, cell: Cell) -> dict:
        """What determines a cell's result; its hash is the cell's id."""
        spec = self.specs[cell.model]
        method = self.methods[cell.method]
        # a searching method's result also depends on the training images it searched on
        calib = {"calib_limit": self.run.calib_limit} if method.needs_calibration else {}
        return {"model": cell.model, "arch": spec.arch, "weights": spec.weights, "checkpoint_sha": self.checkpoint_sha(spec),
                "method": cell.method, "method_version": method.version, "method_options": method.resolved_options(),
                "budget": cell.budget_text, "data": spec.data, "data_path": spec.data_path, "limit": self.run.limit,
                "dtype": self.dtype, "batch_size": self.run.batch_size, "device_name": self.env["device_name"],
                "throughput_batch_size": self.throughput_batch_size, **calib, **self.kernel_key}

    @property
    def kernel_key(self) -> dict:
        """Settings that change the kernels a cell runs, named in its key only when not the default
        (so cells stored before the setting existed keep their ids)."""
        run = self.run
        return {**({"compile": True} if run.compile else {}),
                **({"attention": run.attention} if run.attention != "fused" else {}),
                **({"sdpa_backend": run.sdpa_backend} if run.sdpa_backend != "auto" else {}),
                **({"prop_attn": run.prop_attn} if run.prop_attn != "mask" else {})}

    @property
    def throughput_batch_size(self) -> int:
        return self.run.throughput_batch_size or (256 if self.device.type == "cuda" else 8)

    def cell_id(self, cell: Cell) -> str:
        key = json.dumps(self.cell_key(cell), sort_keys=True, default=str)
        return hashlib.sha1(key.encode()).hexdigest()[:16]

    def checkpoint_sha(self, spec: ModelSpec) -> Optional[str]:
        """The checkpoint's hash, read once per sweep (every cell id needs it)."""
        if spec.name not in self._shas:
            self._shas[spec.name] = checkpoint_sha(spec)
        return self._shas[spec.name]

    def state_dict(self, spec: ModelSpec) -> Optional[dict]:
        if spec.name not in self._state_dicts:
            self._state_dicts[spec.name] = load_checkpoint(spec)
        return self._state_dicts[spec.name]

    def eval_set(self, spec: ModelSpec, model) -> EvalSet:
        transform = eval_transform(spec, model)
        key = (spec.data, spec.data_path, transform, self.run.limit)
        if key not in self._eval_sets:
            self.progress(f"decoding eval set {spec.data} (limit {self.run.limit or 'none'}) ...")
            self._eval_sets[key] = load_eval_set(spec, transform, self.root, self.run.limit)
        return self._eval_sets[key]

    def check_inputs(self) -> None:
        """Read every checkpoint and decode every eval set before the first cell.

        A corrupt checkpoint or a missing dataset is then one exit-2 error, not a failed record per cell.
        """
        for spec in self.specs.values():
            self.eval_set(spec, build_model(spec, self.state_dict(spec)))

    def execute(self) -> list[dict]:
        """Run every cell not already done; return the records written now."""
        written = []
        todo = distributed.broadcast(self.todo(), self.dist)
        self.progress(f"{len(self.cells)} cells, {len(self.cells) - len(todo)} already done, {len(todo)} to run")
        for n, cell in enumerate(todo, 1):
            self.progress(f"[{n}/{len(todo)}] {cell.model} | {cell.method} | {cell.budget_text}")
            record = self.run_claimed(cell)
            if record is None:
                self.progress("      -> skipped: another sweep holds or finished this cell")
                continue
            written.append(record)
            if self.dist.is_main:
                self.progress(f"      -> {summary_line(record)}")
        distributed.finish(self.dist)
        return written

    def todo(self) -> list[Cell]:
        """Cells without a finished record (all of them with ``overwrite``)."""
        return [c for c in self.cells if self.run.overwrite or not self.store.is_done(self.cell_id(c))]

    def run_claimed(self, cell: Cell) -> Optional[dict]:
        """Run ``cell`` under its lock and store its record; None when another sweep has it."""
        cid = self.cell_id(cell)
        claimed = self.dist.is_main and self.store.claim(cid)
        try:
            go = claimed and (self.run.overwrite or not self.store.is_done(cid))
            if not distributed.broadcast(go, self.dist):  # every rank runs the cell, or none
                return None
            record = self.run_cell(cell)
            predictions = record.pop("_predictions", None)
            if self.dist.is_main:
                if predictions is not None:  # first, so a record never names a missing file
                    record["predictions"] = self.store.write_predictions(cid, *predictions)
                self.store.write(record)
            return record
        finally:
            if claimed:
                self.store.release(cid)

    def run_cell(self, cell: Cell) -> dict:
        """Run one cell and return its record; failures become the record's status and error."""
        record = {"cell_id": self.cell_id(cell), **self.cell_key(cell), **self.env, "knob": None,
                  "knob_value": None, "attention": self.run.attention, "sdpa_backend": self.run.sdpa_backend,
                  "prop_attn": self.run.prop_attn, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        start = time.perf_counter()
        try:
            record.update(self._measure_cell(cell))
        except UnsupportedModel as exc:
            record.update(status="unsupported", error=str(exc))
        except torch.cuda.OutOfMemoryError as exc:
            record.update(status="error", error=f"out of memory: {str(exc).splitlines()[0]}")
        except Exception as exc:  # failures are data: the sweep goes on
            log.debug("cell failed", exc_info=True)
            record.update(status="error", error=f"{type(exc).__name__}: {exc}".splitlines()[0],
                          traceback=traceback.format_exc(limit=5))
        record["cell_s"] = round(time.perf_counter() - start, 3)
        return record

    def _measure_cell(self, cell: Cell) -> dict:
        spec = self.specs[cell.model]
        model = build_model(spec, self.state_dict(spec))
        arch = arch_spec(model)
        method = self.methods[cell.method]
        evalset = self.eval_set(spec, model)
        searched = {}
        if method.needs_calibration and cell.budget is not None:
            if not evalset.has_labels:
                raise UnsupportedModel(f"{cell.method} searches its schedule on labelled training images and "
                                       f"{spec.data} data has none (a search on noise learns nothing); give it fixed "
                                       f"schedules instead (e.g. [methods.diffrate] schedules = \"published\")")
            # the search meets the target itself: the knob is the GMACs ratio, no bisection
            value = calibration_knob(method, arch, cell.budget)
            searched = self._calibrate(method, spec, model, arch, value)
            model = build_model(spec, self.state_dict(spec))  # patch a fresh model after the search
            out = self._solve(method, arch, cell, fixed_value=value)
        else:
            out = self._solve(method, arch, cell)
        if out.get("status") == "skipped":
            return out
        measure.set_attention(model, self.run.attention)
        method.patch(model, out["knob_value"], arch)
        seam.set_prop_attn_impl(model, self.run.prop_attn)  # a no-op where the method tracks no sizes
        model.to(self.device)
        out.update(searched, **method.describe(arch, out["knob_value"]), data_name=evalset.name,
                   eval_set_sha=evalset.identity,  # which images, in which order: what pairs records
                   fused_attn=bool(getattr(model.blocks[0].attn, "fused_attn", False)))
        missed = budgets.off_target(out["gmacs"], out["gmacs_target"])
        out["gmacs_off_pct"] = budgets.off_pct(out["gmacs"], out["gmacs_target"])
        baseline = None if cell.method == "none" else self._baseline_model(spec)
        with measure.sdpa_kernel(self.run.sdpa_backend):
            out.update(self._evaluate_and_time(model, evalset, out["gmacs"], baseline))
        distributed.barrier(self.dist)
        # measured all the same (kept as data, drawn at its achieved GMACs), never ok under its budget
        return {**out, "status": "off_target" if missed else "ok", "error": missed}

    def _baseline_model(self, spec: ModelSpec):
        """The unpatched model on the device, timed in alternation with each method's (speed-ups);
        built once per model and sweep (nothing patches or trains it)."""
        if spec.name not in self._baselines:
            model = build_model(spec, self.state_dict(spec))
            measure.set_attention(model, self.run.attention)
            self._baselines[spec.name] = model.to(self.device).eval()
        return self._baselines[spec.name]

    def _evaluate_and_time(self, model, evalset: EvalSet, gmacs: float, baseline=None) -> dict:
        """Accuracy (sharded over ranks), then on the main rank alone timing and fvcore's count."""
        out = {}
        if evalset.has_labels:
            shard = evalset.shard(self.dist.rank, self.dist.world)
            due = progress.Throttle()

            def on_batch(done: int, total: int) -> None:
                if due():
                    progress.report("evaluated %d/%d images (%d %%)", done, total, 100 * done // total)

            acc = measure.evaluate(model, shard, self.run.batch_size, self.device, self.dtype, on_batch=on_batch)
            if self.dist.active:  # a rank holds its shard's predictions only: no paired tests across ranks
                acc.pop("_predictions")
                acc = distributed.combine_accuracy(acc, self.dist)
            out.update(acc)
        if self.dist.is_main:  # timed alone: the other ranks wait at the barrier
            out.update(self._time(model, evalset, baseline))
            if self.run.flops:
                from harness import flops

                images, _ = evalset.batch(0, max(1, min(self.run.flops_images, len(evalset))), self.device)
                out.update(flops.count_gmacs(model, images, batch_size=self.run.batch_size).record(gmacs))
        return out

    def _time(self, model, evalset: EvalSet, baseline=None) -> dict:
        """Model-only throughput (interleaved with ``baseline`` when given) and latency, and the
        end-to-end figure when asked."""
        run = self.run
        warmup, repeats = measure.timing_counts(self.device, run.throughput_warmup, run.throughput_repeats)
        out = measure.throughput(model, evalset.transform.img_size, self.throughput_batch_size, self.device,
                                 self.dtype, warmup, repeats, baseline=baseline,
                                 latency=run.throughput_latency, compile=run.compile,
                                 compile_backend=run.compile_backend)
        if run.end_to_end:
            jpegs = measure.sample_jpegs(evalset, out["throughput_batch_size"])
            out.update(measure.end_to_end(model, jpegs, evalset.transform, out["throughput_batch_size"], self.device,
                                          self.dtype, warmup, repeats,
                                          run.decode_threads))
        return out

    def _calibrate(self, method, spec: ModelSpec, model, arch, value) -> dict:
        transform = eval_transform(spec, model)
        tkey = ("calibration", spec.data, spec.data_path, transform, self.run.calib_limit)
        if tkey not in self._eval_sets:
            self.progress(f"decoding calibration set {spec.data} (limit {self.run.calib_limit or 'none'}) ...")
            self._eval_sets[tkey] = load_calibration_set(spec, transform, self.root, self.run.calib_limit)
        train = self._eval_sets[tkey]
        owner = getattr(method, "leader", method)  # random@diffrate reuses diffrate's own search
        key = {"model": spec.name, "arch": spec.arch, "checkpoint_sha": self.checkpoint_sha(spec), "data": train.name,
               "calib_limit": self.run.calib_limit, "method_version": owner.version, "options": owner.options}
        data = CalibrationData(train, self.device, self.dtype, key, self.run.recalibrate)
        cache_dir = Path(self.run.results_dir) / "cache" / method.cache_name
        cache_dir.mkdir(parents=True, exist_ok=True)
        # rank 0 searches first; the other ranks then find its result in the cache
        if not self.dist.is_main:
            distributed.barrier(self.dist)
        found = method.calibrate(model.to(self.device), value, arch, data, cache_dir)
        if self.dist.is_main:
            distributed.barrier(self.dist)
        return found

    def _solve(self, method, arch, cell: Cell, fixed_value=None) -> dict:
        baseline = analytic_gmacs(arch, Schedule.full(arch))
        if cell.budget is None:
            resolved = budgets.Resolved(None, method.schedule(arch, None), baseline, None)
        elif fixed_value is not None:
            schedule = method.schedule(arch, fixed_value)
            target = None if cell.budget.kind == "knob" else fixed_value * baseline
            resolved = budgets.Resolved(fixed_value, schedule, analytic_gmacs(arch, schedule), target)
        else:
            resolved = budgets.resolve(method, arch, cell.budget)
        out = {"knob": method.knob.name if method.knob else None, "knob_value": resolved.knob_value,
               "gmacs_target": resolved.gmacs_target, "gmacs": round(resolved.gmacs, 4),
               "gmacs_baseline": round(baseline, 4), "gmacs_ratio": round(resolved.gmacs / baseline, 4),
               "tokens_per_block": resolved.schedule.as_list()}
        if resolved.skip_reason:
            out.update(status="skipped", error=resolved.skip_reason)
        return out


def calibration_knob(method, arch, budget: budgets.Budget) -> float:
    """The knob of a calibrating method (its target as a fraction of the baseline GMACs) for ``budget``."""
    if budget.kind == "knob":
        if budget.knob != method.knob.name:
            raise HarnessError(f"budget {budget.text!r} does not apply to {method.name!r} (its knob: {method.knob.name})")
        return method.knob.check(budget.value)
    baseline = analytic_gmacs(arch, Schedule.full(arch))
    ratio = budget.value if budget.kind == "fraction" else budget.value / baseline
    return method.knob.check(round(ratio, 6))


def summary_line(r: dict) -> str:
    """One line for the terminal about a finished record."""
    if r.get("status") not in ("ok", "off_target"):
        return f"{r.get('status')}: {r.get('error')}"
    top1 = f"top1 {100 * r['top1']:.2f}% " if r.get("top1") is not None else ""
    speed = f" {r['img_per_s']:.1f} img/s" if r.get("img_per_s") is not None else ""
    if r.get("speedup_median") is not None:
        speed += f", {r['speedup_median']:.2f}x [{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}] vs none interleaved"
    off = f" OFF TARGET: {r['error']}" if r.get("status") == "off_target" else ""
    return f"{top1}{r['gmacs']:.3f} GMACs ({r['gmacs_ratio']:.2f}x){speed} [{r['cell_s']:.0f} s]{off}"


def override(cfg: Config, run: dict, suite: dict) -> Config:
    """Apply CLI overrides (None values are ignored) to the run and suite sections."""
    run = {k: v for k, v in run.items() if v is not None}
    suite = {k: tuple(v) for k, v in suite.items() if v is not None}
    new_run = dataclasses.replace(cfg.run, **run)
    cfg = dataclasses.replace(cfg, run=new_run)
    if suite:
        if "budgets" in suite:  # budgets on the command line replace the per-model ones too
            suite["budgets_by_model"] = {}
        elif "models" in suite:  # --models narrows the suite: the other models' budgets go with them
            suite["budgets_by_model"] = {m: b for m, b in cfg.suite.budgets_by_model.items() if m in suite["models"]}
        new_suite = dataclasses.replace(cfg.suite, **suite)
        cfg = dataclasses.replace(cfg, suites={**cfg.suites, new_run.suite: new_suite})
    return cfg


def run_cells_job(cfg: Config, cell_ids: list[str]) -> list[str]:
    """One submitit job: rebuild the sweep from its config, run the named cells, return their summaries."""
    logging.basicConfig(level=logging.INFO)
    sweep = Sweep(cfg, progress=log.info)
    summaries = []
    for cell in sweep.cells:
        if sweep.cell_id(cell) in cell_ids:
            record = sweep.run_claimed(cell)
            summaries.append(f"{cell.model} | {cell.method} | {cell.budget_text}: "
                             + (summary_line(record) if record else "held or finished by another sweep"))
    return summaries


def submit(cfg: Config, executor: str, cells_per_job: int, slurm: dict, progress: Progress) -> int:
    """Send the sweep's missing cells to submitit, ``cells_per_job`` cells a job; return the job count.

    ``executor`` is ``submitit-local`` (jobs run one after another on this machine, the same code path
    a cluster runs) or ``slurm`` (an array of jobs; ``slurm`` holds AutoExecutor parameters such as
    ``slurm_partition``, ``gpus_per_node``, ``timeout_min``). Each job writes its own records under
    the same resume and locking rules as the plain runner.
    """
    import submitit

    sweep = Sweep(cfg, progress)
    sweep.check_inputs()
    ids = [sweep.cell_id(c) for c in sweep.todo()]
    chunks = [ids[i:i + cells_per_job] for i in range(0, len(ids), max(1, cells_per_job))]
    folder = Path(cfg.run.results_dir) / "submitit"
    progress(f"{len(sweep.cells)} cells, {len(ids)} to run in {len(chunks)} jobs ({executor}); logs in {folder}")
    if executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=int(slurm.get("timeout_min", 24 * 60)))
        for n, chunk in enumerate(chunks, 1):  # one at a time: a laptop has one set of cores
            job = ex.submit(run_cells_job, cfg, chunk)
            for line in job.result():
                progress(f"[job {n}/{len(chunks)}] {line}")
        return len(chunks)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**slurm)
    jobs = ex.map_array(run_cells_job, [cfg] * len(chunks), chunks)
    progress(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs[:5])}{' ...' if len(jobs) > 5 else ''}")
    return len(jobs)
