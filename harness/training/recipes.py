"""Fine-tuning recipes (``[recipes.<name>]`` in benchmark.toml) and a cell's protocol.

A cell is measured ``off-the-shelf`` (the default: the method patched into the given weights) or
``finetune:<recipe>`` (the patched model trained by :mod:`harness.training.finetune` with the recipe, then
measured like any cell). A recipe is data: every field below, resolved, enters the cell's id, so
two recipes never share a record. No torch here: the plan reads recipes without it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from harness.errors import HarnessError, did_you_mean

OFF_THE_SHELF = "off-the-shelf"
FINETUNE = "finetune"
DISTILL = ("none", "soft", "hard")
TRAIN_PARAMS = ("all", "head")
ADDED = {"auto_augment": "", "reprob": 0.0}  # fields added later, with the default that does nothing


@dataclass(frozen=True)
class Recipe:
    """How a fine-tune trains (DeiT's names; timm builds each part).

    Attributes:
        opt, lr, weight_decay, momentum: ``timm.optim.create_optimizer_v2``'s optimizer.
        sched, min_lr, warmup_lr, warmup_epochs: ``timm.scheduler.create_scheduler_v2``'s schedule,
            stepped every update (fractional epochs allowed for warm-up).
        epochs: passes over the training images; ``steps`` (> 0) stops earlier, at that many updates.
        batch_size: the global batch (split evenly over torchrun ranks).
        train_limit: training images, class-balanced from the train split (0: all of it).
        label_smoothing, mixup, cutmix, mixup_prob: ``timm.data.Mixup`` (0 turns each off).
        hflip: probability of a horizontal flip of each image.
        auto_augment: timm's RandAugment string (DeiT's ``rand-m9-mstd0.5-inc1``; "" none), on each
            training image (:mod:`harness.training.augment`).
        reprob: probability of timm's random erasing (``pixel`` mode) of each training image (DeiT: 0.25).
        drop_path: stochastic depth rate set on the model's blocks while it trains.
        distill: ``none``, ``soft`` (KL at ``distill_tau``) or ``hard`` (the teacher's top-1), from the
            unpatched model, mixed into the loss with weight ``distill_alpha`` (DeiT's DistillationLoss).
        seed: data order, augmentation and drop-path randomness.
        train_params: ``all`` or ``head`` (the classifier alone).
        clip_grad: gradient norm clip (0: none).
        checkpoint_every: steps between checkpoints (not in the id: it does not change the weights).
        where: a note on where the recipe runs (not in the id).
    """

    opt: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    min_lr: float = 1e-6
    warmup_lr: float = 1e-6
    warmup_epochs: float = 0.0
    epochs: int = 1
    steps: int = 0
    batch_size: int = 16
    train_limit: int = 2000
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    hflip: float = 0.5
    auto_augment: str = ""
    reprob: float = 0.0
    drop_path: float = 0.0
    distill: str = "none"
    distill_alpha: float = 0.5
    distill_tau: float = 1.0
    seed: int = 0
    train_params: str = "all"
    clip_grad: float = 0.0
    checkpoint_every: int = 50
    where: str = ""

    def __post_init__(self):
        if self.distill not in DISTILL:
            raise HarnessError(f"distill {self.distill!r}: choices {', '.join(DISTILL)}")
        if self.train_params not in TRAIN_PARAMS:
            raise HarnessError(f"train_params {self.train_params!r}: choices {', '.join(TRAIN_PARAMS)}")
        if self.batch_size <= 0 or self.epochs <= 0 or self.steps < 0 or self.train_limit < 0:
            raise HarnessError("batch_size and epochs must be > 0, steps and train_limit >= 0")
        if self.checkpoint_every <= 0:
            raise HarnessError("checkpoint_every must be > 0")
        if self.auto_augment and not self.auto_augment.startswith("rand"):
            raise HarnessError(f"auto_augment {self.auto_augment!r}: a timm RandAugment string, e.g. rand-m9-mstd0.5-inc1")
        if not 0 <= self.reprob <= 1:
            raise HarnessError(f"reprob {self.reprob}: a probability in [0, 1]")

    def identity(self) -> dict:
        """Every field that changes the trained weights (what a cell's id hashes); a field added after
        the first recipes is left out while it has its default, so their cells keep their ids."""
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("checkpoint_every", "where") and not (k in ADDED and v == ADDED[k])}


@dataclass(frozen=True)
class Protocol:
    """``off-the-shelf``, or ``finetune`` with its recipe's name and the recipe."""

    name: str = OFF_THE_SHELF
    recipe_name: str = ""
    recipe: Optional[Recipe] = None

    @property
    def trains(self) -> bool:
        return self.recipe is not None


def parse_protocol(text: str, recipes: dict) -> Protocol:
    """``off-the-shelf`` or ``finetune:<recipe>`` (a recipe of ``recipes``); anything else raises."""
    text = text.strip()
    if text == OFF_THE_SHELF:
        return Protocol()
    kind, sep, name = text.partition(":")
    if kind != FINETUNE or not sep or not name:
        raise HarnessError(f"protocol {text!r}: write {OFF_THE_SHELF} or {FINETUNE}:<recipe> "
                           f"(recipes: {', '.join(recipes) or 'none'})")
    if name not in recipes:
        raise did_you_mean("recipe", name, list(recipes))
    return Protocol(text, name, recipes[name])


def with_partners(protocols: tuple[str, ...]) -> tuple[str, ...]:
    """``protocols`` with ``off-the-shelf`` first: a fine-tuned cell is always reported beside the
    same model, method and budget off the shelf (its paired partner), so a fine-tune sweep plans both."""
    return tuple(dict.fromkeys((OFF_THE_SHELF, *protocols)))
