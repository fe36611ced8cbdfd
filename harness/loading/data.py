"""Eval data: the CIFAR-10 archive, an ImageNet-style folder, and synthetic inputs for speed-only runs.

Each (data set, eval transform) pair is decoded once, by worker processes, into an on-disk uint8
cache of the transformed crops (:mod:`harness.loading.datacache`); every cell then streams batches from it:
read into (pinned) host memory, copied to the device without blocking, normalised there. Memory does
not grow with the number of images, and a second sweep over the same data decodes nothing.

The cache lives under ``<cache dir>/data`` (:func:`harness.paths.cache_dir`: $HARNESS_CACHE_DIR,
else ``~/.cache/vit-token-harness``); deleting it only costs the next sweep a decode.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tarfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from harness.loading import datacache
from harness.errors import HarnessError
from harness.loading.models import ModelSpec, Transform
from harness.paths import cache_dir, require_file

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_ARCHIVE = "datasets/cifar10-jpeg.tar.gz"
IMAGENET_SAMPLE = "datasets/imagenet-sample/val"
SYNTHETIC_IMAGES = 256


class EvalSet:
    """Images with labels, ready to batch: streamed from a crop cache, held in memory, or synthetic.

    Args:
        name: the data set (``cifar10-test``, ``imagenet:<folder>``, ``synthetic``).
        images: in-memory images, uint8 (N, 3, H, W) (resized if needed and normalised per batch) or
            float (N, 3, S, S) model input; None for a cached or synthetic set.
        labels: (N,) class indices; None for synthetic data.
        transform: the model's eval transform (``img_size``, mean, std, crop).
        num_synthetic: the size of a synthetic set.
        cache: the :class:`~harness.loading.datacache.CropCache` the images stream from, ``rows`` its rows
            in this set's order (all of them by default).
        identity: see :attr:`identity`; derived from the content when not given.
    """

    def __init__(self, name: str, images: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                 transform: Optional[Transform] = None, num_synthetic: int = 0, *,
                 cache: Optional[datacache.CropCache] = None, rows: Optional[Sequence[int]] = None,
                 identity: Optional[str] = None):
        self.name, self.labels, self.transform, self.num_synthetic = name, labels, transform, num_synthetic
        self.cache = cache
        self.rows = (range(len(cache)) if rows is None else rows) if cache is not None else None
        self._images = images
        self._identity = identity
        self._ahead: Optional[_ReadAhead] = None
        self._buffers: list[torch.Tensor] = []

    def __len__(self) -> int:
        if self.cache is not None:
            return len(self.rows)
        return self.num_synthetic if self._images is None else len(self._images)

    def __repr__(self) -> str:
        where = (f"cache {self.cache.folder}" if self.cache is not None
                 else "memory" if self._images is not None else "synthetic")
        return f"EvalSet({self.name!r}, {len(self)} images, {where}, identity {self.identity})"

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def images(self) -> Optional[torch.Tensor]:
        """All images as one uint8 (N, 3, H, W) tensor: for a cached set a memory-mapped view (only
        the rows touched are read), a copy only when the rows are not evenly spaced. None when synthetic."""
        if self.cache is None:
            return self._images
        whole, rows = torch.from_numpy(self.cache.array()), self.rows
        if isinstance(rows, range) and rows.step > 0:
            return whole[rows.start:rows.stop:rows.step]
        return whole[torch.as_tensor(list(rows))]

    @property
    def identity(self) -> str:
        """16 hex digits naming the exact images (names and labels in order, limit) and the transform.

        Two records with the same identity were measured on the same images in the same order: the
        pairing a McNemar test needs. It does not depend on where the data set lives.
        """
        if self._identity is None:
            if self._images is not None:
                content = hashlib.sha256(self._images.contiguous().numpy().tobytes())
                if self.labels is not None:
                    content.update(self.labels.numpy().tobytes())
                self._identity = _short_sha({"memory": content.hexdigest(), "transform": _asdict(self.transform)})
            else:
                self._identity = _short_sha({"synthetic": len(self), "transform": _asdict(self.transform)})
        return self._identity

    def shard(self, rank: int, world: int) -> "EvalSet":
        """Every ``world``-th image from ``rank``: disjoint shards that together cover the set once."""
        if world == 1 or (self.cache is None and self._images is None):
            return self
        identity = _short_sha({"of": self.identity, "rank": rank, "world": world})
        if self.cache is not None:
            return EvalSet(self.name, None, self.labels[rank::world], self.transform, cache=self.cache,
                           rows=self.rows[rank::world], identity=identity)
        return EvalSet(self.name, self._images[rank::world], self.labels[rank::world], self.transform,
                       identity=identity)

    def batch(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images [start, stop) as the model's normalised input on ``device``, and their labels."""
        if self.cache is not None:
            x = self.host_batch(start, stop, pin=_pinned(device))
            return self._to_input(x, device), self.labels[start:stop].to(device)
        if self._images is None:
            g = torch.Generator().manual_seed(start)
            x = torch.randn(stop - start, 3, self.transform.img_size, self.transform.img_size, generator=g)
            return x.to(device), None
        x = self._images[start:stop].to(device)
        if x.dtype == torch.uint8:
            x = stretch_and_normalize(x, self.transform)
        return x, self.labels[start:stop].to(device)

    def take(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Images at ``index`` (any order) as one batch on ``device``: one copy, one transform.

        The same tensors as concatenating ``batch(i, i + 1)`` for each index.
        """
        if self.cache is not None:
            x = self.cache.read([self.rows[int(i)] for i in index], pin=_pinned(device))
            return self._to_input(x, device), self.labels[index].to(device)
        if self._images is None:
            parts = [self.batch(int(i), int(i) + 1, device)[0] for i in index]
            return torch.cat(parts), None
        x = self._images[index].to(device)
        if x.dtype == torch.uint8:
            x = stretch_and_normalize(x, self.transform)
        return x, self.labels[index].to(device)

    def host_take(self, index: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stored uint8 images at ``index`` in host memory (before :meth:`take`'s resize and
        normalisation: what an augmentation starts from), and their labels."""
        if self.cache is not None:
            return self.cache.read([self.rows[int(i)] for i in index]), self.labels[index]
        if self._images is None or self._images.dtype != torch.uint8:
            raise HarnessError(f"{self.name}: augmentation needs stored uint8 images, this set has none")
        return self._images[index], self.labels[index]

    def host_batch(self, start: int, stop: int, pin: bool = False) -> torch.Tensor:
        """uint8 images [start, stop) of a cached set in host memory (pinned with ``pin``): what
        :meth:`batch` copies to the device.

        The next as many are read ahead in a thread, so a sequential pass reads while the device
        computes. Unpinned, the tensor is a buffer that later calls read into again: it is valid
        until the next call (copy it to keep it).
        """
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.span == (start, stop, pin):
            x = ahead.result()
        else:
            if ahead is not None:
                ahead.join()  # unused, but its buffer comes round again
            x = self.cache.read(self.rows[start:stop], pin, out=self._buffer(stop - start, pin))
        nxt = min(stop + (stop - start), len(self))
        if stop < nxt:
            self._ahead = _ReadAhead(self.cache, self.rows, (stop, nxt, pin), self._buffer(nxt - stop, pin))
        return x

    def _buffer(self, n: int, pin: bool) -> Optional[torch.Tensor]:
        """A host buffer for the next read, two in turn, on the CPU: :meth:`batch` normalises each
        read into a new tensor at once, so a buffer is free again by the next call. Large tensors
        freshly allocated cost a page fault per 4 KB (a third of the time of a CPU pass); for a GPU,
        pinned memory comes from torch's caching host allocator instead, which keeps a block
        until its copy has finished."""
        if pin:
            return None
        if not self._buffers or len(self._buffers[0]) < n:
            self._buffers = [torch.empty((n, *self.cache.shape), dtype=torch.uint8) for _ in range(2)]
        self._buffers.reverse()
        return self._buffers[0]

    def _to_input(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        return stretch_and_normalize(x.to(device, non_blocking=x.is_pinned()), self.transform)


class _ReadAhead:
    """One batch of rows read by a background thread (``preadv`` releases the GIL)."""

    def __init__(self, cache: datacache.CropCache, rows: Sequence[int], span: tuple[int, int, bool],
                 out: Optional[torch.Tensor]):
        self.span, self._out, self._error = span, None, None
        start, stop, pin = span
        self._thread = threading.Thread(target=self._run, args=(cache, rows[start:stop], pin, out), daemon=True)
        self._thread.start()

    def _run(self, cache, rows, pin, out) -> None:
        try:
            self._out = cache.read(rows, pin, out=out)
        except BaseException as exc:  # handed to the caller, which raises it
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def result(self) -> torch.Tensor:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


def _pinned(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def stretch_and_normalize(x: torch.Tensor, t: Transform) -> torch.Tensor:
    """uint8 (B, 3, h, w) -> float, resized to img_size when it is not (no crop, bilinear), normalised.

    The arithmetic of timm's ``ToTensor`` + ``Normalize`` (divide by 255, subtract the mean, divide
    by the std), run on ``x``'s device; ``x`` itself is left as it is.
    """
    x = x.to(torch.float32, copy=True).div_(255)
    if x.shape[-1] != t.img_size or x.shape[-2] != t.img_size:
        down = x.shape[-1] > t.img_size
        x = F.interpolate(x, size=(t.img_size, t.img_size), mode="bilinear", align_corners=False, antialias=down)
    mean = torch.tensor(t.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(t.std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def balanced_subset(labels: list[int], limit: int) -> list[int]:
    """Indices of the first ``limit`` images taken class by class in turn (the first k of each class)."""
    if limit <= 0 or limit >= len(labels):
        return list(range(len(labels)))
    rank, seen = [], {}
    for i, y in enumerate(labels):
        rank.append((seen.get(y, 0), y, i))
        seen[y] = seen.get(y, 0) + 1
    return sorted(i for _, _, i in sorted(rank)[:limit])


def data_cache_dir(explicit: Optional[Path] = None) -> Path:
    """Where crop caches go: ``explicit``, else ``<cache dir>/data``."""
    return Path(explicit) if explicit else cache_dir() / "data"


def load_cifar10(root: Path, split: str, transform: Transform, limit: int = 0,
                 cache: Optional[Path] = None) -> EvalSet:
    """CIFAR-10 ``split`` (test or train) from the JPEG archive, class-balanced when limited.

    The cache is keyed by the archive's path, size and mtime, the split and the limit: a hit does
    not open the archive.
    """
    archive = require_file(root / CIFAR10_ARCHIVE, "CIFAR-10 archive")
    st = archive.stat()
    source = {"cifar10": str(archive.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "split": split,
              "limit": limit}
    items = functools.partial(_cifar10_items, archive, split, limit)  # the archive is read only to build
    return _cached_set(f"cifar10-{split}", source, items, transform, limit, cache)


def _cifar10_items(archive: Path, split: str, limit: int) -> list[datacache.Item]:
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
    return [datacache.Item(found[i][0], found[i][1], data=found[i][2]) for i in keep]


def load_imagenet_folder(folder: Path, transform: Transform, limit: int = 0,
                         cache: Optional[Path] = None) -> EvalSet:
    """An ImageNet-style ``val/<synset>/*`` folder; labels are the 1000-class indices of the synsets.

    The cache is keyed by the folder, the chosen files' names, sizes and mtimes, and the transform.
    """
    items = _folder_items(Path(folder), limit)
    files = hashlib.sha256()
    for item in items:
        st = os.stat(item.path)
        files.update(f"{item.name}\t{item.label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    source = {"folder": str(Path(folder).resolve()), "files_sha256": files.hexdigest()}
    return _cached_set(f"imagenet:{folder}", source, lambda: items, transform, limit, cache)


def _folder_items(folder: Path, limit: int) -> list[datacache.Item]:
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
    return [datacache.Item(f"{files[i][0].parent.name}/{files[i][0].name}", files[i][1], path=str(files[i][0]))
            for i in keep]


def _cached_set(name: str, source: dict, items, transform: Transform, limit: int, cache: Optional[Path]) -> EvalSet:
    crop = datacache.Crop(transform)
    store = datacache.open_or_build(data_cache_dir(cache), datacache.cache_key(source, crop), items, crop, name)
    identity = _short_sha({"images": store.header["names_sha256"], "limit": limit, "transform": _asdict(transform)})
    return EvalSet(name, None, store.labels, transform, cache=store, identity=identity)


def _short_sha(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _asdict(t: Optional[Transform]) -> Optional[dict]:
    return dataclasses.asdict(t) if t is not None else None


def imagenet_folder(spec: ModelSpec, root: Path) -> Path:
    """The ImageNet ``val`` folder of a spec: its ``data_path``, else the shared sample."""
    return Path(spec.data_path).expanduser() if spec.data_path else root / IMAGENET_SAMPLE


def load_eval_set(spec: ModelSpec, transform: Transform, root: Path, limit: int = 0,
                  cache: Optional[Path] = None) -> EvalSet:
    """The eval split a model is measured on (its spec's data source), limited to ``limit`` images.

    ``cache`` is the crop cache folder (default ``<cache dir>/data``).
    """
    if spec.data == "cifar10":
        return load_cifar10(root, "test", transform, limit, cache)
    if spec.data == "imagenet":
        return load_imagenet_folder(imagenet_folder(spec, root), transform, limit, cache)
    if spec.data == "synthetic":
        return EvalSet("synthetic", None, None, transform, num_synthetic=limit or SYNTHETIC_IMAGES)
    raise HarnessError(f"unknown data source {spec.data!r}; choices: cifar10, imagenet, synthetic")


def load_calibration_set(spec: ModelSpec, transform: Transform, root: Path, limit: int = 0,
                         cache: Optional[Path] = None) -> EvalSet:
    """Training images for a method's search: never the test split.

    CIFAR-10 models use the train split; an ImageNet folder ``.../val`` uses its sibling ``train``;
    synthetic data gives synthetic inputs (a speed-only search, no labels).
    """
    if spec.data == "cifar10":
        return load_cifar10(root, "train", transform, limit, cache)
    if spec.data == "imagenet":
        val = imagenet_folder(spec, root)
        train = val.parent / "train"
        if not train.is_dir():
            raise HarnessError(f"calibration needs a train split: looked for {train} beside {val}")
        return load_imagenet_folder(train, transform, limit, cache)
    return EvalSet("synthetic", None, None, transform, num_synthetic=limit or SYNTHETIC_IMAGES)
