"""The plan: a sweep's cells and their ids, from the config alone.

A cell's id is the hash of its key, its configuration canonically resolved: model, weights and data,
the method, its version and every option with its default filled in (:meth:`Method.identity_options`),
the budget in one spelling (:func:`harness.sweep.budget.canonical_text`), dtype, device, the eval and
throughput batch sizes (kept from before, so stored ids stay) and kernel settings.
Stored records are found by it (resume, the reference results), so a key changes only when a result
would: a setting added later enters the key only when not at its default, and ``tests/test_house.py``
pins known ids. How a cell is timed and counted (:class:`Measurement`) is not in its id: it is
stored with the record, and a sweep asking for more than a stored record did measures it again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Optional

from harness.sweep import budget as budgets
from harness.sweep.config import Config, RunConfig
from harness.errors import HarnessError
from harness.loading.models import ModelSpec, resolve_model
from harness.training.recipes import OFF_THE_SHELF, Protocol, parse_protocol, with_partners
from harness.registry import Method, make_method, method_names


@dataclass(frozen=True)
class Cell:
    """One measurement: a model, a method and a budget (None for methods without a knob), off the shelf
    or fine-tuned (``protocol``)."""

    model: str
    method: str
    budget: Optional[budgets.Budget]
    protocol: str = OFF_THE_SHELF

    @property
    def budget_text(self) -> str:
        return self.budget.text if self.budget else "baseline"


@dataclass(frozen=True)
class Machine:
    """What of the machine enters a cell's identity."""

    dtype: str
    device_name: str
    throughput_batch_size: int


@dataclass(frozen=True)
class Measurement:
    """How a cell is timed and counted: stored with its record (``measurement``), not part of its id.

    Attributes:
        warmup, repeats: untimed and timed throughput calls, resolved for the device.
        latency: batch-1 latency asked. end_to_end, decode_threads: the end-to-end figure and its decoders.
        flops, flops_images: fvcore's count and the images it averages over.
    """

    warmup: int
    repeats: int
    latency: bool
    end_to_end: bool
    decode_threads: int
    flops: bool
    flops_images: int

    def as_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of_record(cls, rec: dict) -> "Measurement":
        """What a stored record measured: its ``measurement``, else read off the fields records had before it."""
        if isinstance(rec.get("measurement"), dict):
            return cls(**{f.name: rec["measurement"].get(f.name) for f in dataclasses.fields(cls)})
        return cls(warmup=rec.get("throughput_warmup") or 0, repeats=rec.get("throughput_repeats") or 0,
                   latency=rec.get("latency_ms") is not None, end_to_end=rec.get("e2e_img_per_s") is not None,
                   decode_threads=rec.get("e2e_decode_threads"), flops=rec.get("flops_images") is not None,
                   flops_images=rec.get("flops_images") or 0)


def remeasure_reasons(rec: dict, asked: Measurement) -> list[str]:
    """Why a finished record must be measured again for ``asked`` (empty: it already has what is asked).

    Fewer timing rounds or warm-up calls than asked, a figure asked but absent (latency, end-to-end,
    fvcore's count) or one taken otherwise (decode threads, FLOPs images) all count; a record that
    measured nothing (a skip) has nothing to measure again.
    """
    if rec.get("status") not in ("ok", "off_target"):
        return []
    had, why = Measurement.of_record(rec), []
    for name, what in (("repeats", "timing rounds"), ("warmup", "warm-up calls")):
        if (getattr(had, name) or 0) < getattr(asked, name):
            why.append(f"{getattr(had, name)} {what} stored, {getattr(asked, name)} asked")
    for name, what in (("latency", "latency"), ("end_to_end", "end-to-end throughput"), ("flops", "fvcore count")):
        if getattr(asked, name) and not getattr(had, name):
            why.append(f"no {what} stored")
    if asked.end_to_end and had.end_to_end and had.decode_threads != asked.decode_threads:
        why.append(f"end-to-end with {had.decode_threads} decode threads stored, {asked.decode_threads} asked")
    if asked.flops and had.flops and had.flops_images != asked.flops_images and not _all_images(rec, had, asked):
        why.append(f"fvcore count over {had.flops_images} images stored, {asked.flops_images} asked")
    return why


def _all_images(rec: dict, had: Measurement, asked: Measurement) -> bool:
    """A record from before ``measurement`` stores the FLOPs images it used, at most the eval set's size."""
    n = rec.get("n_images") or rec.get("limit")
    return "measurement" not in rec and bool(n) and had.flops_images == min(asked.flops_images, n)


def selected_methods(names: tuple[str, ...], options: dict) -> dict[str, Method]:
    """Expand ``all`` (every registered method) and build each method; unknown names and options raise."""
    if "all" in names:
        names = tuple(method_names()) + tuple(n for n in names if n != "all")
    return {n: make_method(n, options) for n in dict.fromkeys(names)}


def _check_knob_budgets(models: dict[str, list[budgets.Budget]], knobs: dict) -> None:
    """A knob budget must name the knob of a selected method, within its range."""
    for b in {b for bs in models.values() for b in bs}:
        if b.kind == "knob":
            fits = [m for m, k in knobs.items() if k and k.name == b.knob]
            if not fits:
                have = sorted({k.name for k in knobs.values() if k})
                raise HarnessError(f"budget {b.text!r}: no selected method has knob {b.knob!r} (knobs: {', '.join(have) or 'none'})")
            for m in fits:
                knobs[m].check(b.value)


def expand(models: dict[str, list[budgets.Budget]], methods: dict[str, Method],
           protocols: tuple[str, ...] = (OFF_THE_SHELF,)) -> list[Cell]:
    """All cells of a sweep, for each model its own budgets, each under every protocol.

    A knob budget applies to the methods with that knob, and must fit one of them.
    """
    knobs = {name: m.knob for name, m in methods.items()}
    _check_knob_budgets(models, knobs)
    cells = []
    for model, budget_list in models.items():
        for m in methods:
            mine = [None] if knobs[m] is None else [b for b in budget_list if b.kind != "knob" or b.knob == knobs[m].name]
            cells += [Cell(model, m, b, p) for b in mine for p in protocols]
    return cells


def protocol_key(protocol: Protocol, method: Method) -> dict:
    """A fine-tune cell's protocol, resolved recipe and the method's training, in its key; nothing for
    the default ``off-the-shelf`` (so every id stored before protocols existed stays)."""
    if not protocol.trains:
        return {}
    return {"protocol": protocol.name, "recipe": protocol.recipe.identity(),
            **({"method_training": method.training_identity()} if method.training_identity() else {})}


def kernel_key(run: RunConfig) -> dict:
    """Settings that change the kernels a cell runs, named in its key only when not the default
    (so cells stored before the setting existed keep their ids)."""
    return {**({"compile": True} if run.compile else {}),
            **({"compile_backend": run.compile_backend} if run.compile and run.compile_backend != "inductor" else {}),
            **({"attention": run.attention} if run.attention != "fused" else {}),
            **({"sdpa_backend": run.sdpa_backend} if run.sdpa_backend != "auto" else {}),
            **({"prop_attn": run.prop_attn} if run.prop_attn != "mask" else {})}


class Plan:
    """The cells of ``cfg``'s suite, their methods and model specs; bad input raises before any cell runs."""

    def __init__(self, cfg: Config, root):
        self.run, suite = cfg.run, cfg.suite
        if self.run.limit < 0 or self.run.batch_size <= 0:
            raise HarnessError("limit must be >= 0 and batch_size > 0")
        self.methods = selected_methods(suite.methods, cfg.suite_method_options)
        unknown = set(suite.budgets_by_model) - set(suite.models)
        if unknown:
            raise HarnessError(f"budgets_by_model names models not in the suite: {', '.join(sorted(unknown))}")
        self.specs: dict[str, ModelSpec] = {name: resolve_model(name, cfg.models, root) for name in suite.models}
        # one cell per budget however it is spelt: 0.7 and 0.70 parse to one canonical Budget
        budget_lists = {name: list(dict.fromkeys(budgets.parse_budget(b) for b in suite.budgets_for(name)))
                        for name in self.specs}
        names = with_partners(suite.protocols) if suite.protocols != (OFF_THE_SHELF,) else suite.protocols
        self.protocols: dict[str, Protocol] = {p.name: p for p in (parse_protocol(t, cfg.recipes) for t in names)}
        self.cells = expand(budget_lists, self.methods, tuple(self.protocols))

    def cell_key(self, cell: Cell, checkpoint_sha: Optional[str], machine: Machine) -> dict:
        """What determines a cell's result; its hash is the cell's id."""
        spec, method, run = self.specs[cell.model], self.methods[cell.method], self.run
        # a searching method's result also depends on the training images it searched on
        calib = {"calib_limit": run.calib_limit} if method.needs_calibration else {}
        return {"model": cell.model, "arch": spec.arch, "weights": spec.weights, "checkpoint_sha": checkpoint_sha,
                "method": cell.method, "method_version": method.version, "method_options": method.identity_options(),
                "budget": cell.budget_text, "data": spec.data, "data_path": spec.data_path, "limit": run.limit,
                "dtype": machine.dtype, "batch_size": run.batch_size, "device_name": machine.device_name,
                "throughput_batch_size": machine.throughput_batch_size, **calib, **kernel_key(run),
                **protocol_key(self.protocols[cell.protocol], method)}


def cell_id(key: dict) -> str:
    """The 16-hex-digit id of a cell key."""
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
