"""The sweep: models x methods x budgets, one tidy record per cell, written the moment it ends.

The loop: for each planned cell (:mod:`harness.sweep.plan`), claim it, run it (:mod:`harness.sweep.execute`,
which prepares it with :func:`harness.sweep.cell.prepare_cell` from inputs read once,
:mod:`harness.loading.inputs`) and store its record (:mod:`harness.sweep.store`).
Bad input fails before any cell runs (HarnessError, exit 2); a cell that fails at run time is a
record with ``status`` and ``error`` and the sweep goes on.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from harness.sweep import distributed
from harness.measurement import measure
from harness.sweep.cell import CellSettings
from harness.sweep.config import Config
from harness.errors import HarnessError
from harness.sweep.execute import Executor
from harness.loading.inputs import Inputs
from harness.paths import DataRoot
from harness.sweep.plan import Cell, Machine, Measurement, Plan, cell_id, remeasure_reasons
from harness.progress import eta_text
from harness.training.recipes import OFF_THE_SHELF
from harness.sweep.store import DONE, ResultStore

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
# why a cell runs when its record is finished but measured less than the sweep asks
REMEASURE = "measured again"


class Sweep:
    """A prepared sweep: the plan, its shared inputs, an executor and the store, walked cell by cell."""

    def __init__(self, cfg: Config, progress: Progress = lambda s: None, calibration_run: Optional[str] = None):
        self.cfg, self.run = cfg, cfg.run
        device = measure.resolve_device(self.run.device)
        self.dist = distributed.init_from_env(device)
        if self.dist.active and device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
        self.progress = progress if self.dist.is_main else (lambda s: None)
        self.settings = CellSettings(device, measure.resolve_dtype(self.run.dtype, device), self.run.attention,
                                     self.run.prop_attn, self.run.sdpa_backend)
        self.plan = Plan(cfg, DataRoot(self.run.data_root))
        self.cells = self.plan.cells
        self.store = ResultStore(Path(self.run.results_dir))
        self.store.ensure_writable()
        self.inputs = Inputs(DataRoot(self.run.data_root), self.run.limit, self.progress)
        self.executor = Executor(self.run, self.settings, self.inputs, self.dist, measure.environment(device),
                                 calibration_run)
        self.machine = Machine(self.settings.dtype, self.executor.env["device_name"],
                               self.executor.throughput_batch_size)
        self.measurement = asked_measurement(self.run, device)

    def cell_key(self, cell: Cell) -> dict:
        """What determines a cell's result; its hash is the cell's id."""
        return self.plan.cell_key(cell, self.inputs.checkpoint_sha(self.plan.specs[cell.model]), self.machine)

    def cell_id(self, cell: Cell) -> str:
        return cell_id(self.cell_key(cell))

    def check_inputs(self) -> None:
        """Read every checkpoint and decode every eval set before the first cell (one exit-2 error)."""
        for spec in self.plan.specs.values():
            self.inputs.check(spec)

    def due(self, cid: str) -> str:
        """Why cell ``cid`` runs now, "" when its stored record is finished and measured as asked.

        A finished record measured less than :attr:`measurement` asks (fewer timing rounds, no
        latency, ...) is measured again, under the same id, and the reason says so.
        """
        if self.run.overwrite:
            return "overwrite"
        rec = self.store.get(cid)
        if rec is None or rec.get("status") not in DONE:
            return "not done"
        why = remeasure_reasons(rec, self.measurement)
        return f"{REMEASURE}: {'; '.join(why)}" if why else ""

    def todo(self) -> list[Cell]:
        """Cells without a finished record measured as asked (all of them with ``overwrite``)."""
        return [c for c in self.cells if self.due(self.cell_id(c))]

    def execute(self) -> list[dict]:
        """Run every cell not already done; return the records written now."""
        written = []
        todo = distributed.broadcast(self.todo(), self.dist)
        again = sum(self.due(self.cell_id(c)).startswith(REMEASURE) for c in todo) if self.dist.is_main else 0
        self.progress(f"{len(self.cells)} cells, {len(self.cells) - len(todo)} already done, {len(todo)} to run"
                      + (f" ({again} of them stored with less measurement than asked: measured again)" if again else ""))
        cell_s: list[float] = []  # the wall time of each cell run here: the ETA's mean
        for n, cell in enumerate(todo, 1):
            self.progress(f"[{n}/{len(todo)}] {cell.model} | {cell.method} | {cell.budget_text}{protocol_text(cell)}"
                          f"  ({eta_text(cell_s, len(todo) - n + 1)})")
            start = time.perf_counter()
            record = self.run_claimed(cell)
            if record is None:  # instant: kept out of the ETA's mean
                self.progress("      -> skipped: another sweep holds or finished this cell")
                continue
            cell_s.append(time.perf_counter() - start)
            written.append(record)
            if self.dist.is_main:
                self.progress(f"      -> {summary_line(record)}")
        distributed.finish(self.dist)
        return written

    def run_claimed(self, cell: Cell) -> Optional[dict]:
        """Run ``cell`` under its lock and store its record; None when another sweep has it."""
        cid = self.cell_id(cell)
        claimed = self.dist.is_main and self.store.claim(cid)
        try:
            why = self.due(cid) if claimed else ""
            if not distributed.broadcast(bool(why), self.dist):  # every rank runs the cell, or none
                return None
            if why.startswith(REMEASURE):
                log.info("cell %s: %s", cid, why)
                self.progress(f"      {why}")
            method = self.plan.methods[cell.method]
            record = self.executor.run_cell(self.plan.specs[cell.model], method, cell.budget, self.cell_key(cell), cid,
                                            self.plan.protocols[cell.protocol])
            record.update(measurement=self.measurement.as_record(), method_options_resolved=method.resolved_options())
            if self.dist.is_main:
                self.store.write_cell(record)
            return record
        finally:
            if claimed:
                self.store.release(cid)


def protocol_text(cell: Cell) -> str:
    """`` | finetune:<recipe>`` for a fine-tune cell; nothing off the shelf (the default)."""
    return "" if cell.protocol == OFF_THE_SHELF else f" | {cell.protocol}"


def asked_measurement(run, device: torch.device) -> Measurement:
    """The measurement ``run`` asks of every cell, its device defaults resolved."""
    warmup, repeats = measure.timing_counts(device, run.throughput_warmup, run.throughput_repeats)
    return Measurement(warmup, repeats, run.throughput_latency, run.end_to_end, run.decode_threads, run.flops,
                       run.flops_images)


def summary_line(r: dict) -> str:
    """One line for the terminal about a finished record."""
    if r.get("status") not in ("ok", "off_target"):
        return f"{r.get('status')}: {r.get('error')}"
    top1 = f"top1 {100 * r['top1']:.2f}% " if r.get("top1") is not None else ""
    speed = f" {r['img_per_s']:.1f} img/s" if r.get("img_per_s") is not None else ""
    if r.get("speedup_median") is not None:
        speed += f", {r['speedup_median']:.2f}x [{r['speedup_q1']:.2f}, {r['speedup_q3']:.2f}] vs none interleaved"
    elif r.get("speedup_na"):
        speed += f", speed-up n/a ({r['speedup_na']})"
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


def run_cells_job(cfg: Config, cell_ids: list[str], calibration_run: Optional[str] = None) -> list[str]:
    """One submitit job: rebuild the sweep from its config, run the named cells, return their summaries.

    ``calibration_run`` names the sweep the job belongs to: with ``--recalibrate`` a search another
    job of it stored is read, not run again.
    """
    logging.basicConfig(level=logging.INFO)
    sweep = Sweep(cfg, progress=log.info, calibration_run=calibration_run)
    summaries = []
    for cell in sweep.cells:
        if sweep.cell_id(cell) in cell_ids:
            record = sweep.run_claimed(cell)
            summaries.append(f"{cell.model} | {cell.method} | {cell.budget_text}{protocol_text(cell)}: "
                             + (summary_line(record) if record else "held or finished by another sweep"))
    return summaries


def submit(cfg: Config, executor: str, cells_per_job: int, slurm: dict, progress: Progress) -> int:
    """Send the sweep's missing cells to submitit, ``cells_per_job`` cells a job; return the job count.

    ``executor`` is ``submitit-local`` (jobs run one after another on this machine, the same code path
    a cluster runs) or ``slurm`` (an array of jobs; ``slurm`` holds AutoExecutor parameters such as
    ``slurm_partition``, ``gpus_per_node``, ``timeout_min``). Each job writes its own records under
    the same resume and locking rules as the plain runner.
    """
    try:
        import submitit
    except ImportError:
        raise HarnessError(f"--executor {executor} needs submitit: pip install 'vit-token-harness[slurm]'") from None

    sweep = Sweep(cfg, progress)
    sweep.check_inputs()
    ids = [sweep.cell_id(c) for c in sweep.todo()]
    chunks = [ids[i:i + cells_per_job] for i in range(0, len(ids), max(1, cells_per_job))]
    folder = Path(cfg.run.results_dir) / "submitit"
    run_id = sweep.executor.calibrate.run_id  # one run for every job: --recalibrate searches once
    progress(f"{len(sweep.cells)} cells, {len(ids)} to run in {len(chunks)} jobs ({executor}); logs in {folder}")
    if executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=int(slurm.get("timeout_min", 24 * 60)))
        for n, chunk in enumerate(chunks, 1):  # one at a time: a laptop has one set of cores
            job = ex.submit(run_cells_job, cfg, chunk, run_id)
            for line in job.result():
                progress(f"[job {n}/{len(chunks)}] {line}")
        return len(chunks)
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(**slurm)
    jobs = ex.map_array(run_cells_job, [cfg] * len(chunks), chunks, [run_id] * len(chunks))
    progress(f"submitted {len(jobs)} jobs: {', '.join(j.job_id for j in jobs[:5])}{' ...' if len(jobs) > 5 else ''}")
    return len(jobs)
