"""DeiT's training augmentation for the fine-tune recipes: RandAugment and random erasing, timm's own.

A recipe with ``auto_augment`` (a timm RandAugment string, DeiT's ``rand-m9-mstd0.5-inc1``) or
``reprob`` (DeiT's 0.25) trains on augmented copies of its training images: each image goes through
``timm.data.auto_augment.rand_augment_transform`` (on the stored uint8 image, as PIL), the model's
resize and normalisation, then ``timm.data.random_erasing.RandomErasing`` (``pixel`` mode, as DeiT).
Only the augmentation is timm's: the images stay the harness's eval crops (no random resized crop).

timm draws from the global Python, NumPy and torch generators. Here each image draws inside its own
seeded scopes, keyed by (recipe seed, step, image index, stage), and the global states are put back after:
an image's augmentation at a step is the same whatever ran before, whatever the number of ranks,
and after a resume from a checkpoint (whose step is the sampler's position); drop path and Mixup
draw from the global generators exactly as without augmentation.
"""
from __future__ import annotations

import contextlib
import random
from typing import Optional

import numpy as np
import torch

from harness.loading.data import stretch_and_normalize
from harness.training.recipes import Recipe

ERASE_MODE = "pixel"  # DeiT's --remode default: erased pixels are normal noise in the normalised space
RAND_AUGMENT, ERASE = 0, 1  # the stages, each its own seed


class Augmenter:
    """A recipe's RandAugment and random erasing, applied image by image with seeded draws."""

    def __init__(self, recipe: Recipe):
        from timm.data.random_erasing import RandomErasing

        self.config, self.seed = recipe.auto_augment, recipe.seed
        self.erase = RandomErasing(recipe.reprob, mode=ERASE_MODE, device="cpu") if recipe.reprob > 0 else None
        self._rand: dict[tuple, object] = {}  # one RandAugment per stored image size and mean

    def __call__(self, train_set, index: torch.Tensor, step: int, device: torch.device):
        """The images at ``index`` augmented for ``step``: the model's input on ``device``, and the labels."""
        images, labels = train_set.host_take(index)
        keys = index.tolist()
        if self.config:
            images = torch.stack([self._augment(image, train_set.transform, step, i) for image, i in zip(images, keys)])
        x = stretch_and_normalize(images, train_set.transform)  # the whole batch at once: per image it is slow
        if self.erase is not None:
            for row, i in zip(x, keys):
                with seeded(image_seed(self.seed, step, i, ERASE)):
                    self.erase(row)  # in place
        return x.to(device), labels.to(device)

    def _augment(self, image: torch.Tensor, transform, step: int, index: int) -> torch.Tensor:
        from PIL import Image

        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        with seeded(image_seed(self.seed, step, index, RAND_AUGMENT)):
            out = self._rand_augment(pil.size, transform.mean)(pil)
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)

    def _rand_augment(self, size: tuple[int, int], mean: tuple) -> object:
        """timm's RandAugment with the hyper-parameters ``create_transform`` gives it for this image size."""
        from timm.data.auto_augment import rand_augment_transform

        key = (min(size), tuple(mean))
        if key not in self._rand:
            hparams = dict(translate_const=int(min(size) * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in mean))
            self._rand[key] = rand_augment_transform(self.config, hparams)
        return self._rand[key]


def augmenter(recipe: Recipe) -> Optional[Augmenter]:
    """The recipe's augmenter; None when it augments nothing (the images are the eval crops, flipped)."""
    return Augmenter(recipe) if recipe.auto_augment or recipe.reprob > 0 else None


def image_seed(seed: int, step: int, index: int, stage: int) -> int:
    """A well-mixed 32-bit seed for one stage of one image at one step (NumPy's SeedSequence of the four):
    RandAugment and erasing draw from unrelated streams."""
    return int(np.random.SeedSequence([seed, step, index, stage]).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int):
    """Python's, NumPy's and torch's CPU generators seeded with ``seed`` inside, as they were after
    (saved by hand: ``torch.random.fork_rng`` costs more than a RandAugment of the image)."""
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)
