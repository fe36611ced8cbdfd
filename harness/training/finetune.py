"""Fine-tuning a patched model with a recipe (the ``finetune:<recipe>`` protocol), resumably.

The method's reducers stay in place while the model trains (a method says whether it can:
:attr:`harness.registry.Method.cannot_train`). Every training part is timm's: the optimizer
(``create_optimizer_v2``), the schedule (``create_scheduler_v2``, stepped per update), ``Mixup`` /
CutMix and the losses; distillation from the unpatched model is DeiT's ``DistillationLoss`` (soft:
KL at a temperature, hard: the teacher's top-1). Under ``torchrun`` the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, NCCL on GPU) and each rank trains on its share of every
global batch, so the run follows the same curve as one process with the same global batch.

Long work is done so it can stop at any moment: the data order and flips of step ``s`` are drawn
from generators seeded by (seed, step), so the sampler's position is the step; every
``checkpoint_every`` steps the model, optimizer, scheduler, scaler, step and every RNG state go to
``<workdir>/checkpoint.pt`` (written whole, then renamed); a run killed at any point restarts from
its last checkpoint and ends with the same weights. Each step is a row of ``<workdir>/log.csv``. A
finished fine-tune leaves ``final.safetensors`` and ``done.json``, and is never trained again.
A loss that is not finite stops the run (:class:`Diverged`, naming the step).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from harness.training import augment
from harness.sweep import distributed
from harness.measurement import measure
from harness import progress
from harness.training.recipes import Recipe

log = logging.getLogger(__name__)

LOG_FIELDS = ("step", "epoch", "loss", "lr", "img_per_s", "knob", "elapsed_s")


class Diverged(RuntimeError):
    """The training loss stopped being a finite number."""


@dataclass
class Trainee:
    """What a fine-tune trains.

    Attributes:
        model: the patched model on its device.
        method: its method (the knob during training: :meth:`Method.train_knob`).
        knob_value: the knob the cell is measured at.
        teacher: the unpatched model, for distillation (None without).
    """

    model: torch.nn.Module
    method: object
    knob_value: Optional[float] = None
    teacher: Optional[torch.nn.Module] = None

    def __post_init__(self):
        self.in_force = self.knob_value  # the knob the model is patched at now


@dataclass
class Where:
    """Where a fine-tune runs and keeps its files.

    Attributes:
        workdir: the fine-tune's folder (checkpoint, log, final weights), in the results folder.
        device, dtype: the device and autocast dtype (``fp16`` adds a gradient scaler).
        dist: the torchrun group (one process by default).
        on_step: called after each step with (step, loss), for tests (None: nothing).
    """

    workdir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: str = "fp32"
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    on_step: Optional[Callable[[int, float], None]] = None


@dataclass
class TrainingStep:
    """What a method's :meth:`~harness.registry.Method.training_loss` sees of one update.

    Attributes:
        images: the batch (B, 3, H, W), as the model got it (flipped, mixed).
        logits: the model's output (B, classes).
        teacher_logits: the unpatched teacher's output, or None without a teacher.
        teacher_tokens: the teacher's final tokens (``forward_features``: after its last norm,
            prefix tokens included), or None without a teacher.
    """

    images: torch.Tensor
    logits: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    teacher_tokens: Optional[torch.Tensor] = None


@dataclass
class Parts:
    """timm's training parts for one run."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    mixup: Optional[object]
    criterion: torch.nn.Module
    steps_per_epoch: int
    total_steps: int
    augment: Optional[Callable] = None  # RandAugment / random erasing (harness.training.augment); None: eval crops


def finetune(trainee: Trainee, train_set, recipe: Recipe, where: Where) -> dict:
    """Train ``trainee.model`` in place with ``recipe`` on ``train_set``; the record's fields about it.

    A fine-tune already finished in ``where.workdir`` is read back (its final weights loaded), not
    trained again; one interrupted resumes from its last checkpoint.

    Raises:
        Diverged: the loss was NaN or infinite at some step (the message names it).
    """
    done = read_done(where.workdir, recipe)
    if done is not None:
        load_final(trainee.model, where.workdir)
        return {**done, "finetune_reused": True}
    where.workdir.mkdir(parents=True, exist_ok=True)
    with _drop_path(trainee.model, recipe.drop_path):
        fields = _train(trainee, train_set, recipe, where)
    fields.update(train_set=train_set.name, train_set_sha=train_set.identity, train_images=len(train_set))
    if where.dist.is_main:
        fields["finetuned_sha"] = save_final(trainee.model, where.workdir)
        write_done(where.workdir, recipe, fields)
    distributed.barrier(where.dist)
    _remove_checkpoints(where)  # done.json and the final weights say everything now
    fields["finetuned_sha"] = distributed.broadcast(fields.get("finetuned_sha"), where.dist)
    return {**fields, "finetune_reused": False}


def _train(trainee: Trainee, train_set, recipe: Recipe, where: Where) -> dict:
    model = trainee.model
    _select_params(model, recipe.train_params)
    parts = build_parts(model, recipe, len(train_set), where)
    first, before_s = resume(model, parts, recipe, where)
    net = _wrap(model, where)
    model.train()
    loss, meter = float("nan"), _Meter(first, parts.total_steps, before_s)
    # rank 0 logs the global batch's loss; the others' rows would repeat it
    with open(where.workdir / "log.csv" if where.dist.is_main else os.devnull, "a", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_FIELDS)
        for step in range(first, parts.total_steps):
            knob = _set_train_knob(trainee, step / parts.total_steps)
            loss = train_step(net, trainee, train_set, recipe, parts, step, where)
            writer.writerow(meter.row(step, parts, loss, knob, recipe.batch_size))
            fh.flush()
            if where.on_step:
                where.on_step(step, loss)
            if (step + 1) % recipe.checkpoint_every == 0 and step + 1 < parts.total_steps:
                save_checkpoint(model, parts, step + 1, recipe, where, meter.elapsed_s())
    _set_train_knob(trainee, None)
    model.eval()
    # train_s: the training's wall time over every run that had a part in it (resumed runs add up)
    return {"train_steps": parts.total_steps, "train_epochs": parts.total_steps / parts.steps_per_epoch,
            "train_loss_final": loss, "train_resumed_at": first or None, "train_log": "log.csv",
            "train_s": round(meter.elapsed_s(), 3)}


def build_parts(model: torch.nn.Module, recipe: Recipe, n_images: int, where: Where) -> Parts:
    """Optimizer, per-update schedule, scaler, Mixup and loss, all from timm, for ``recipe``."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    spe = n_images // recipe.batch_size  # the last, partial batch is dropped (DDP needs equal shares)
    if spe == 0:
        raise ValueError(f"{n_images} training images make no batch of {recipe.batch_size}")
    if recipe.batch_size % where.dist.world:
        raise ValueError(f"batch_size {recipe.batch_size} does not split over {where.dist.world} ranks")
    total = min(recipe.steps or recipe.epochs * spe, recipe.epochs * spe)
    opt = create_optimizer_v2(model, recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay,
                              momentum=recipe.momentum)
    # in units of updates: the warm-up and the cosine span steps, whatever the epoch length
    sched, _ = create_scheduler_v2(opt, recipe.sched, num_epochs=total, min_lr=recipe.min_lr,
                                   warmup_lr=recipe.warmup_lr, warmup_epochs=round(recipe.warmup_epochs * spe))
    mixing = recipe.mixup > 0 or recipe.cutmix > 0
    mixup = Mixup(recipe.mixup, recipe.cutmix, prob=recipe.mixup_prob, label_smoothing=recipe.label_smoothing,
                  num_classes=model.num_classes) if mixing else None
    criterion = (SoftTargetCrossEntropy() if mixing else LabelSmoothingCrossEntropy(recipe.label_smoothing)
                 if recipe.label_smoothing > 0 else torch.nn.CrossEntropyLoss())
    scaler = torch.amp.GradScaler(where.device.type, enabled=where.dtype == "fp16")
    return Parts(opt, sched, scaler, mixup, criterion, spe, total, augment.augmenter(recipe))


def batch_indices(n_images: int, recipe: Recipe, steps_per_epoch: int, step: int, dist: distributed.Dist) -> torch.Tensor:
    """This rank's images of global step ``step``: a seeded permutation per epoch, then every
    ``world``-th image of the step's global batch (the sampler's position is the step itself)."""
    epoch, i = divmod(step, steps_per_epoch)
    order = torch.randperm(n_images, generator=torch.Generator().manual_seed(recipe.seed * 100_003 + epoch))
    return order[i * recipe.batch_size:(i + 1) * recipe.batch_size][dist.rank::dist.world]


def _flips(recipe: Recipe, step: int, dist: distributed.Dist) -> torch.Tensor:
    """Which of this rank's images flip at ``step``: drawn for the global batch (the same whatever the world)."""
    g = torch.Generator().manual_seed(recipe.seed * 7_919 + step + 1)
    return (torch.rand(recipe.batch_size, generator=g) < recipe.hflip)[dist.rank::dist.world]


def train_step(net, trainee: Trainee, train_set, recipe: Recipe, parts: Parts, step: int, where: Where) -> float:
    """One update; the global batch's mean loss (averaged over ranks)."""
    idx = batch_indices(len(train_set), recipe, parts.steps_per_epoch, step, where.dist)
    x, y = train_set.take(idx, where.device) if parts.augment is None else parts.augment(train_set, idx, step, where.device)
    flip = _flips(recipe, step, where.dist).to(where.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    target = y
    if parts.mixup is not None:
        x, target = parts.mixup(x, y)
    parts.scheduler.step(step)
    with measure.autocast(where.device, where.dtype):
        loss = _loss(net, trainee, x, target, parts, recipe)
    mean = distributed.all_sum([loss.item()], where.dist)[0] / where.dist.world
    if not math.isfinite(mean):
        raise Diverged(f"training loss is {mean} at step {step + 1} of {parts.total_steps}")
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if recipe.clip_grad > 0:
        parts.scaler.unscale_(parts.optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), recipe.clip_grad)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    return mean


def _loss(net, trainee: Trainee, x, target, parts: Parts, recipe: Recipe) -> torch.Tensor:
    """The recipe's loss (with the teacher's distillation, if any) plus the method's own training loss."""
    out = net(x)
    seen = TrainingStep(x, out)
    if trainee.teacher is not None:
        with torch.no_grad():  # timm's forward is forward_head(forward_features(x)): its tokens come free
            seen.teacher_tokens = trainee.teacher.forward_features(x)
            seen.teacher_logits = trainee.teacher.forward_head(seen.teacher_tokens)
    loss = parts.criterion(out, target) if trainee.teacher is None else _distilled(out, seen.teacher_logits, target,
                                                                                   parts, recipe)
    extra = trainee.method.training_loss(trainee.model, seen)
    return loss if extra is None else loss + extra


def _distilled(out, t_out, target, parts: Parts, recipe: Recipe) -> torch.Tensor:
    """DeiT's DistillationLoss: the base loss mixed with the teacher's soft (KL) or hard (top-1) labels."""
    base = parts.criterion(out, target)
    if recipe.distill == "soft":
        tau = recipe.distill_tau
        kd = F.kl_div(F.log_softmax(out / tau, 1), F.log_softmax(t_out / tau, 1), reduction="sum",
                      log_target=True) * tau * tau / out.numel()
    else:
        kd = F.cross_entropy(out, t_out.argmax(1))
    return base * (1 - recipe.distill_alpha) + kd * recipe.distill_alpha


class _Meter:
    """The log row and the throttled progress line of each step: loss, learning rate, img/s, ETA."""

    def __init__(self, first: int, total: int, before_s: float = 0.0):
        self.first, self.total, self.start, self.due = first, total, time.perf_counter(), progress.Throttle()
        self.last, self.before_s = self.start, before_s

    def elapsed_s(self) -> float:
        """Training time so far, the runs before a resume included."""
        return self.before_s + time.perf_counter() - self.start

    def row(self, step: int, parts: Parts, loss: float, knob, batch: int) -> dict:
        now = time.perf_counter()
        lr, img_per_s = parts.optimizer.param_groups[0]["lr"], batch / max(now - self.last, 1e-9)
        self.last = now
        if self.due(last=step + 1 == self.total):
            left = (now - self.start) / (step + 1 - self.first) * (self.total - step - 1)
            progress.report("fine-tune step %d/%d (%d %%) loss %.4f lr %.2e %.1f img/s, %s left", step + 1,
                            self.total, 100 * (step + 1) // self.total, loss, lr, img_per_s, progress.duration_text(left))
        return {"step": step + 1, "epoch": round((step + 1) / parts.steps_per_epoch, 4), "loss": loss, "lr": lr,
                "img_per_s": round(img_per_s, 2), "knob": knob, "elapsed_s": round(self.before_s + now - self.start, 3)}


def _set_train_knob(trainee: Trainee, done: Optional[float]):
    """The method's knob at the fraction ``done`` of training (EViT's keep-rate warm-up), set on the
    model when it changes; the cell's own knob again when ``done`` is None. Returns the knob in force."""
    value = trainee.knob_value
    knob = value if done is None else trainee.method.train_knob(value, done)
    if knob != trainee.in_force:
        trainee.method.set_train_knob(trainee.model, knob)
        trainee.in_force = knob
    return knob


def _select_params(model: torch.nn.Module, which: str) -> None:
    """``all`` parameters train, or the classifier (``head``) alone."""
    head = set(map(id, model.get_classifier().parameters()))
    for p in model.parameters():
        p.requires_grad_(which == "all" or id(p) in head)


def _wrap(model: torch.nn.Module, where: Where):
    if not where.dist.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [where.device.index] if where.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@contextlib.contextmanager
def _drop_path(model: torch.nn.Module, rate: float):
    """Stochastic depth at ``rate`` (rising linearly over the blocks, as timm builds it) while training."""
    from timm.layers import DropPath

    blocks = list(getattr(model, "blocks", [])) if rate > 0 else []
    saved = [(blk.drop_path1, blk.drop_path2) for blk in blocks]
    for i, blk in enumerate(blocks):
        p = rate * i / max(1, len(blocks) - 1)
        blk.drop_path1, blk.drop_path2 = DropPath(p), DropPath(p)
    try:
        yield
    finally:  # the measured model is the one that was patched, whatever happened in training
        for blk, (a, b) in zip(blocks, saved):
            blk.drop_path1, blk.drop_path2 = a, b


# ---- checkpoints, written whole then renamed: a kill leaves the previous one intact


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every RNG this process draws from (torch, CUDA, NumPy for Mixup, Python)."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(model: torch.nn.Module, parts: Parts, step: int, recipe: Recipe, where: Where,
                    elapsed_s: float = 0.0) -> None:
    """The state after ``step`` updates: the shared state by rank 0, each rank's RNG by itself."""
    _atomic_save(rng_state(), where.workdir / f"rng-{where.dist.rank}.pt")
    distributed.barrier(where.dist)  # every rank's RNG is down before the checkpoint names the step
    if where.dist.is_main:
        _atomic_save({"step": step, "recipe": recipe.identity(), "elapsed_s": elapsed_s, "model": model.state_dict(), "optimizer": parts.optimizer.state_dict(),
                      "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict()},
                     where.workdir / "checkpoint.pt")
    distributed.barrier(where.dist)


def resume(model: torch.nn.Module, parts: Parts, recipe: Recipe, where: Where) -> tuple[int, float]:
    """Load the last checkpoint of ``recipe``, if any; the step to start at and the training seconds
    before it. Log rows past it are dropped."""
    path = where.workdir / "checkpoint.pt"
    # our own file: RNG states are not tensors
    state = torch.load(path, map_location=where.device, weights_only=False) if path.is_file() else None
    if state is None or state.get("recipe") != recipe.identity():
        if state is not None:
            log.warning("%s is another recipe's checkpoint: training from the start", path)
        if where.dist.is_main:
            _trim_log(where.workdir / "log.csv", 0)
        return 0, 0.0
    model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    set_rng_state(torch.load(where.workdir / f"rng-{where.dist.rank}.pt", weights_only=False))
    if where.dist.is_main:
        _trim_log(where.workdir / "log.csv", state["step"])
    log.info("fine-tune resumed at step %d from %s", state["step"], path)
    progress.report("fine-tune resumed at step %d (checkpoint in %s)", state["step"], where.workdir)
    return state["step"], state.get("elapsed_s", 0.0)


def _remove_checkpoints(where: Where) -> None:
    (where.workdir / f"rng-{where.dist.rank}.pt").unlink(missing_ok=True)
    if where.dist.is_main:
        (where.workdir / "checkpoint.pt").unlink(missing_ok=True)


def _trim_log(path: Path, step: int) -> None:
    """Keep the header and the rows up to ``step`` (a resumed run writes the later ones again)."""
    rows = []
    if path.is_file():
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= step]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def save_final(model: torch.nn.Module, workdir: Path) -> str:
    """The trained weights as ``final.safetensors``; their sha256."""
    from safetensors.torch import save_file

    tmp = workdir / f".final.{uuid.uuid4().hex}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, workdir / "final.safetensors")
    return hashlib.sha256((workdir / "final.safetensors").read_bytes()).hexdigest()


def load_final(model: torch.nn.Module, workdir: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(workdir / "final.safetensors"), device=str(next(model.parameters()).device)))
    model.eval()


def write_done(workdir: Path, recipe: Recipe, fields: dict) -> None:
    tmp = workdir / f".done.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps({"recipe": recipe.identity(), **fields}, indent=1))
    os.replace(tmp, workdir / "done.json")


def read_done(workdir: Path, recipe: Recipe) -> Optional[dict]:
    """The stored fields of a finished fine-tune of ``recipe`` in ``workdir`` (None: not finished)."""
    try:
        done = json.loads((workdir / "done.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if done.pop("recipe", None) != recipe.identity() or not (workdir / "final.safetensors").is_file():
        return None
    return done
