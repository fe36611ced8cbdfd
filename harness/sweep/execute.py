"""Run one cell: prepare it, evaluate, time and count it, and return its record.

A failure at run time is the record's ``status`` and ``error``, never an exception out of
:meth:`Executor.run_cell`: failures are data, and the sweep goes on.
"""
from __future__ import annotations

import logging
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from harness.sweep import budget as budgets
from harness.sweep import distributed
from harness.measurement import measure
from harness import progress
from harness.sweep.calibration import Calibrator
from harness.sweep.cell import CellSettings, PreparedCell, prepare_cell
from harness.sweep.config import RunConfig
from harness.loading.data import EvalSet
from harness.errors import UnsupportedModel
from harness.loading.inputs import Inputs
from harness.loading.models import ModelSpec
from harness.training.recipes import Protocol
from harness.registry import Method

log = logging.getLogger(__name__)


def attention_ran(model, asked: str) -> dict:
    """The record's ``attention_kernel`` (what every block's attention ran) and ``fused_attn``.

    Raises:
        UnsupportedModel: the blocks do not all run the kernel asked for (``--attention``).
    """
    ran = measure.attention_kernel(model)
    if ran is not None and ran != asked:
        raise UnsupportedModel(f"--attention {asked} asked for, but this model's blocks run {ran} attention")
    return {"attention_kernel": ran, "fused_attn": ran == "fused"}


class Executor:
    """Runs cells on one device with one run's settings, sharing ``inputs`` between them."""

    def __init__(self, run: RunConfig, settings: CellSettings, inputs: Inputs, dist: distributed.Dist, env: dict,
                 calibration_run: Optional[str] = None):
        self.run, self.settings, self.inputs, self.dist, self.env = run, settings, inputs, dist, env
        self.calibrate = Calibrator(inputs, settings, Path(run.results_dir) / "cache", run.calib_limit,
                                    run.recalibrate, dist, calibration_run)

    @property
    def throughput_batch_size(self) -> int:
        return self.run.throughput_batch_size or (256 if self.settings.device.type == "cuda" else 8)

    def run_cell(self, spec: ModelSpec, method: Method, budget, key: dict, cell_id: str,
                 protocol: Protocol = Protocol()) -> dict:
        """Run one cell (fine-tuned first under a ``finetune`` protocol) and return its record; failures
        become the record's status and error."""
        record = {"cell_id": cell_id, **key, **self.env, "protocol": protocol.name, "knob": None, "knob_value": None,
                  "attention": self.run.attention, "sdpa_backend": self.run.sdpa_backend,
                  "prop_attn": self.run.prop_attn, "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        start = time.perf_counter()
        try:
            record.update(self.measure_cell(spec, method, budget, protocol, cell_id))
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

    def measure_cell(self, spec: ModelSpec, method: Method, budget, protocol: Protocol = Protocol(),
                     cell_id: str = "") -> dict:
        """Prepare (and fine-tune), evaluate and time one cell: the record's measured fields."""
        if protocol.trains and method.cannot_train:
            raise UnsupportedModel(f"{method.name} cannot be fine-tuned: {method.cannot_train}")
        if not protocol.trains and method.needs_training:
            raise UnsupportedModel(f"{method.name} needs training: {method.needs_training}")
        cell = prepare_cell(spec, method, budget, self.settings, state_dict=self.inputs.state_dict(spec),
                            calibrate=self.calibrate)
        out = cell.budget_fields()
        if cell.skip_reason:
            return out
        if protocol.trains:
            out.update(self.finetune(spec, cell, protocol, cell_id))
        evalset = self.inputs.eval_set(spec, cell.transform)
        out.update(cell.searched, **cell.described, data_name=evalset.name,
                   eval_set_sha=evalset.identity,  # which images, in which order: what pairs records
                   **attention_ran(cell.model, self.run.attention))
        missed = budgets.off_target(out["gmacs"], out["gmacs_target"])
        out["gmacs_off_pct"] = budgets.off_pct(out["gmacs"], out["gmacs_target"])
        baseline = None if method.name == "none" else self.inputs.baseline(spec, self.settings)
        with self.settings.kernels():
            out.update(self.evaluate(cell, evalset), **self.time_and_count(cell, evalset, out["gmacs"], baseline))
        distributed.barrier(self.dist)
        # measured all the same (kept as data, drawn at its achieved GMACs), never ok under its budget
        return {**out, "status": "off_target" if missed else "ok", "error": missed}

    def finetune(self, spec: ModelSpec, cell: PreparedCell, protocol: Protocol, cell_id: str) -> dict:
        """Train the cell's patched model in place with the protocol's recipe; the record's fields about it.

        Its checkpoints and log live in ``<results>/finetune/<cell id>``; a finished one is read back.
        """
        from harness.training import finetune

        recipe = protocol.recipe
        train = self.inputs.calibration_set(spec, cell.transform, recipe.train_limit)
        if not train.has_labels:
            raise UnsupportedModel(f"fine-tuning needs labelled training images; {spec.data} data has none")
        teacher = self.inputs.baseline(spec, self.settings) if recipe.distill != "none" else None
        where = finetune.Where(Path(self.run.results_dir) / "finetune" / cell_id, self.settings.device,
                               self.settings.dtype, self.dist)
        fields = finetune.finetune(finetune.Trainee(cell.model, cell.method, cell.knob_value, teacher), train,
                                   recipe, where)
        return {"recipe_name": protocol.recipe_name, "recipe_resolved": recipe.identity(), "train_seed": recipe.seed,
                "finetune_dir": str(Path("finetune") / cell_id), **fields}

    def evaluate(self, cell: PreparedCell, evalset: EvalSet) -> dict:
        """Accuracy, sharded over ranks (none without labels)."""
        if not evalset.has_labels:
            return {}
        due = progress.Throttle()

        def on_batch(done: int, total: int) -> None:
            if due():
                progress.report("evaluated %d/%d images (%d %%)", done, total, 100 * done // total)

        shard = evalset.shard(self.dist.rank, self.dist.world)
        acc = measure.evaluate(cell.model, shard, self.run.batch_size, self.settings.device, self.settings.dtype,
                               on_batch=on_batch)
        if self.dist.active:  # a rank holds its shard's predictions only: no paired tests across ranks
            acc.pop("_predictions")
            acc = distributed.combine_accuracy(acc, self.dist)
        return acc

    def time_and_count(self, cell: PreparedCell, evalset: EvalSet, gmacs: float, baseline=None) -> dict:
        """On the main rank alone (the others wait at the barrier): timing, then fvcore's count."""
        if not self.dist.is_main:
            return {}
        out = self.time(cell.model, evalset, baseline)
        if self.run.flops:
            from harness.measurement import flops

            n = max(1, min(self.run.flops_images, len(evalset)))
            images, _ = evalset.batch(0, n, self.settings.device)
            out.update(flops.count_gmacs(cell.model, images, batch_size=self.run.batch_size).record(gmacs))
        return out

    def time(self, model, evalset: EvalSet, baseline=None) -> dict:
        """Model-only throughput (interleaved with ``baseline`` when given) and latency, and the
        end-to-end figure when asked."""
        run, device, dtype = self.run, self.settings.device, self.settings.dtype
        warmup, repeats = measure.timing_counts(device, run.throughput_warmup, run.throughput_repeats)
        out = measure.throughput(model, evalset.transform.img_size, self.throughput_batch_size, device, dtype,
                                 warmup, repeats, baseline=baseline, latency=run.throughput_latency,
                                 compile=run.compile, compile_backend=run.compile_backend)
        if run.end_to_end:
            jpegs = measure.sample_jpegs(evalset, out["throughput_batch_size"])
            out.update(measure.end_to_end(model, jpegs, evalset.transform, out["throughput_batch_size"], device,
                                          dtype, warmup, repeats, run.decode_threads))
        return out
