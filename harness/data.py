"""Eval data: the CIFAR-10 archive, an ImageNet-style folder, and synthetic inputs for speed-only runs.

An eval set is decoded once and kept in memory; a sweep reuses it across every cell that shares it.
"""
from __future__ import annotations

import io
import logging
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.models import ModelSpec, Transform
from harness.paths import require_file

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_ARCHIVE = "datasets/cifar10-jpeg.tar.gz"
IMAGENET_SAMPLE = "datasets/imagenet-sample/val"
SYNTHETIC_IMAGES = 256


@dataclass
class EvalSet:
    """Decoded images with labels, ready to batch.

    ``images`` is uint8 (N, 3, H, W) at source resolution (resized and normalised per batch) or
    float (N, 3, S, S) already through the model's eval transform; None for synthetic data.
    """

    name: str
    images: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    transform: Transform
    num_synthetic: int = 0

    def __len__(self) -> int:
        return self.num_synthetic if self.images is None else len(self.images)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    def shard(self, rank: int, world: int) -> "EvalSet":
        """Every ``world``-th image from ``rank``: disjoint shards that together cover the set once."""
        if self.images is None or world == 1:
            return self
        return EvalSet(self.name, self.images[rank::world], self.labels[rank::world], self.transform)

    def batch(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images [start, stop) as the model's normalised input on ``device``, and their labels."""
        if self.images is None:
            g = torch.Generator().manual_seed(start)
            x = torch.randn(stop - start, 3, self.transform.img_size, self.transform.img_size, generator=g)
            return x.to(device), None
        x = self.images[start:stop].to(device)
        if x.dtype == torch.uint8:
            x = stretch_and_normalize(x, self.transform)
        return x, self.labels[start:stop].to(device)


    def take(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images at ``index`` (any order) as one batch on ``device``: one copy, one transform.

        The same tensors as concatenating ``batch(i, i + 1)`` for each index.
        """
        if self.images is None:
            parts = [self.batch(int(i), int(i) + 1, device)[0] for i in index]
            return torch.cat(parts), None
        x = self.images[index].to(device)
        if x.dtype == torch.uint8:
            x = stretch_and_normalize(x, self.transform)
        return x, self.labels[index].to(device)


def stretch_and_normalize(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """uint8 (B, 3, h, w) -> float, resized to img_size (no crop, bilinear), normalised."""
    x = x.float().div_(255)
    if x.shape[-1] != t.img_size or x.shape[-2] != t.img_size:
        down = x.shape[-1] > t.img_size
        x = F.interpolate(x, size=(t.img_size, t.img_size), mode="bilinear", align_corners=False, antialias=down)
    mean = torch.tensor(t.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(t.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def balanced_subset(labels: list[int], limit: int) -> list[int]:
    """Indices of the first ``limit`` images taken class by class in turn (the first k of each class)."""
    if limit <= 0 or limit >= len(labels):
        return list(range(len(labels)))
    rank, seen = [], {}
    for i, y in enumerate(labels):
        rank.append((seen.get(y, 0), y, i))
        seen[y] = seen.get(y, 0) + 1
    return sorted(i for _, _, i in sorted(rank)[:limit])


def _decode(data: bytes, where: str):
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exc:
        raise HarnessError(f"unreadable image {where}: {type(exc).__name__}: {exc}") from None


def load_cifar10(root: Path, split: str, transform: Transform, limit: int = 0) -> EvalSet:
    """CIFAR-10 ``split`` (test or train) from the JPEG archive, class-balanced when limited."""
    import numpy as np

    archive = require_file(root / CIFAR10_ARCHIVE, "CIFAR-10 archive")
    prefix = f"cifar10/{split}/"
    found: list[tuple[str, int, bytes]] = []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name.startswith(prefix):
                    cls = member.name[len(prefix):].split("/")[0]
                    if cls not in CIFAR10_CLASSES:
                        raise HarnessError(f"{archive}: unexpected class folder {cls!r}")
                    found.append((member.name, CIFAR10_CLASSES.index(cls), tar.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise HarnessError(f"CIFAR-10 archive {archive} is unreadable or truncated: {exc}") from None
    if not found:
        raise HarnessError(f"CIFAR-10 archive {archive} has no {split!r} split")
    found.sort()
    keep = balanced_subset([y for _, y, _ in found], limit)
    arrays = [np.asarray(_decode(found[i][2], found[i][0])) for i in keep]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([found[i][1] for i in keep])
    return EvalSet(f"cifar10-{split}", images, labels, transform)


def _imagenet_transform(img, t: Transform) -> torch.Tensor:
    from PIL import Image
    import numpy as np

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(t.interpolation, Image.BICUBIC)
    short = math.floor(t.img_size / (t.crop_pct or 1.0))
    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(short, round(w * scale)), max(short, round(h * scale))), resample)
    w, h = img.size
    left, top = round((w - t.img_size) / 2), round((h - t.img_size) / 2)
    img = img.crop((left, top, left + t.img_size, top + t.img_size))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(t.mean).view(3, 1, 1)) / torch.tensor(t.std).view(3, 1, 1)


def load_imagenet_folder(folder: Path, transform: Transform, limit: int = 0) -> EvalSet:
    """An ImageNet-style ``val/<synset>/*`` folder; labels are the 1000-class indices of the synsets."""
    from timm.data import ImageNetInfo

    if not folder.is_dir():
        raise HarnessError(f"ImageNet folder not found: looked for {folder}")
    synsets = {s: i for i, s in enumerate(ImageNetInfo().label_names())}
    files = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        if d.name not in synsets:
            raise HarnessError(f"{d}: folder name {d.name!r} is not an ImageNet synset (like n01440764)")
        files += [(f, synsets[d.name]) for f in sorted(d.iterdir()) if f.is_file()]
    if not files:
        raise HarnessError(f"ImageNet folder {folder} holds no images in <synset>/ subfolders")
    keep = balanced_subset([y for _, y in files], limit)
    images = [_imagenet_transform(_decode(files[i][0].read_bytes(), str(files[i][0])), transform) for i in keep]
    labels = torch.tensor([files[i][1] for i in keep])
    return EvalSet(f"imagenet:{folder}", torch.stack(images), labels, transform)


def load_eval_set(spec: ModelSpec, transform: Transform, root: Path, limit: int = 0) -> EvalSet:
    """The eval split a model is measured on (its spec's data source), limited to ``limit`` images."""
    if spec.data == "cifar10":
        return load_cifar10(root, "test", transform, limit)
    if spec.data == "imagenet":
        folder = Path(spec.data_path).expanduser() if spec.data_path else root / IMAGENET_SAMPLE
        return load_imagenet_folder(folder, transform, limit)
    if spec.data == "synthetic":
        return EvalSet("synthetic", None, None, transform, num_synthetic=limit or SYNTHETIC_IMAGES)
    raise HarnessError(f"unknown data source {spec.data!r}; choices: cifar10, imagenet, synthetic")


def load_calibration_set(spec: ModelSpec, transform: Transform, root: Path, limit: int = 0) -> EvalSet:
    """Training images for a method's search: never the test split.

    CIFAR-10 models use the train split; an ImageNet folder ``.../val`` uses its sibling ``train``;
    synthetic data gives synthetic inputs (a speed-only search, no labels).
    """
    if spec.data == "cifar10":
        return load_cifar10(root, "train", transform, limit)
    if spec.data == "imagenet":
        val = Path(spec.data_path).expanduser() if spec.data_path else root / IMAGENET_SAMPLE
        train = val.parent / "train"
        if not train.is_dir():
            raise HarnessError(f"calibration needs a train split: looked for {train} beside {val}")
        return load_imagenet_folder(train, transform, limit)
    return EvalSet("synthetic", None, None, transform, num_synthetic=limit or SYNTHETIC_IMAGES)
