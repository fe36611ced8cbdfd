"""A tiny fine-tune, shared by tests/test_finetune.py and run by it as a subprocess (kill -9, DDP).

``python tests/_finetune_job.py WORKDIR STEPS OUT DROP_PATH SLEEP_S [AUGMENT]`` trains the tiny model
for STEPS updates in WORKDIR (resuming from its checkpoint), sleeping SLEEP_S after each step (so a
test can kill it mid-run), and saves the final weights and loss curve to OUT; under torchrun every
rank trains its share of each global batch. AUGMENT ``1`` adds DeiT's RandAugment and random erasing.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Optional

import torch

from harness.sweep import distributed
from harness.training import finetune
from harness.sweep.calibration import Calibration
from harness.loading.data import EvalSet
from harness.loading.models import Transform
from harness.training.recipes import Recipe

# drop path 0: its draws come from each process's own RNG, so two ranks cannot match one process
RECIPE = Recipe(lr=1e-3, warmup_epochs=0.5, warmup_lr=1e-5, min_lr=1e-5, epochs=2, batch_size=8, train_limit=0,
                label_smoothing=0.1, hflip=0.5, drop_path=0.0, seed=3, checkpoint_every=2)


AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"  # DeiT's


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """A random-weight timm ViT small enough to train in milliseconds a step (32 px, 4 blocks)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=24,
                             depth=4, num_heads=2, num_classes=10).eval()


def toy_set(n: int = 48) -> EvalSet:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return EvalSet("toy", images, labels, Transform(32, (0.5,) * 3, (0.5,) * 3))


def knob_of(method) -> Optional[float]:
    """The knob a tiny fine-tune patches ``method`` at: 0.7 of its range (none: its identity)."""
    return None if method.knob is None else method.knob.identity if method.name == "none" else method.knob.high * 0.7


def calibrated(method):
    """``method`` ready to patch the tiny model: DiffRate's rates searched on the toy images with the
    weights as given (then fixed while training, as its paper's fine-tune), others as they are."""
    if not method.needs_calibration:
        return method
    from harness.schedule import arch_spec

    model, data = tiny_model(), Calibration(toy_set(), torch.device("cpu"), "fp32", {"model": "tiny"})
    return method.with_calibration(method.calibrate(model, knob_of(method), arch_spec(model), data).state)


def train(workdir: Path, steps: int, recipe: Recipe = RECIPE, method=None, dist=None, on_step=None):
    """Train the tiny model (patched by ``method``'s patch at its knob when given) for ``steps``; (model, fields, losses)."""
    from harness.registry import make_method
    from harness.schedule import arch_spec

    model, method = tiny_model(), method or make_method("none")
    knob = knob_of(method)
    if method.knob is not None:
        method.patch(model, knob, arch_spec(model))
    losses = []

    def record(step, loss):
        losses.append(loss)
        if on_step:
            on_step(step, loss)

    where = finetune.Where(Path(workdir), dist=dist or distributed.Dist(), on_step=record)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more, and a loaded CPU loses a lot
    try:
        fields = finetune.finetune(finetune.Trainee(model, method, knob), toy_set(),
                                   dataclasses.replace(recipe, steps=steps), where)
    finally:
        torch.set_num_threads(threads)
    return model, fields, losses


if __name__ == "__main__":
    import time

    workdir, steps, out, drop_path, sleep_s = sys.argv[1:6]
    dist = distributed.init_from_env(torch.device("cpu"))
    recipe = dataclasses.replace(RECIPE, drop_path=float(drop_path))
    if sys.argv[6:] == ["1"]:
        recipe = dataclasses.replace(recipe, auto_augment=AUTO_AUGMENT, reprob=0.25)
    model, fields, losses = train(Path(workdir), int(steps), recipe, dist=dist,
                                  on_step=lambda step, loss: time.sleep(float(sleep_s)))
    if dist.is_main:
        torch.save({"state": model.state_dict(), "losses": losses, "fields": fields}, out)
    distributed.finish(dist)
