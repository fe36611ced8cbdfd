"""An on-disk cache of eval crops: each (images, eval transform) pair is decoded once, then streamed.

A cache holds the uint8 crops that timm's eval transform makes before ``ToTensor`` / ``Normalize``
(timm's own ``create_transform``, its prefetcher output), so every later cell only reads bytes,
copies them to the device and normalises there. Layout under ``<cache dir>/data``::

    <key>/crops.u8      N x C x H x W uint8, image i at byte i * C*H*W (memory-mappable)
    <key>/header.json   the key, shape, labels, a hash of the image names, build statistics
    <key>/COMPLETE      {"key", "header_sha256", "bytes"}: written last, after fsync of the two above

``key`` hashes what the crops depend on: the source (folder and its files' names, sizes and mtimes,
or the archive's size and mtime with split and limit) and the host part of the transform (timm's
resize and crop, PIL's version). A changed transform or file list is a new cache.

Building happens in a private folder ``.build-<key>-<pid>``, by worker processes that ``pwrite``
their rows, under an exclusive ``flock`` on ``<key>.lock`` (two sweeps never build one cache
twice; the kernel drops the lock of a killed process). The folder is fsynced, marked complete and
renamed into place. A cache is trusted only when its marker matches its header and key and its
crops file has the marked size: a folder left by a killed build, a truncated file or a missing
marker is logged, removed and built again, never read.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from harness import progress
from harness.errors import HarnessError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ENV_WORKERS = "HARNESS_DATA_WORKERS"
CROPS, HEADER, MARKER = "crops.u8", "header.json", "COMPLETE"


@dataclass(frozen=True)
class Item:
    """One image to decode: its name within the data set (what identifies it), label, and bytes or file."""

    name: str
    label: int
    path: Optional[str] = None
    data: Optional[bytes] = None


class Crop:
    """PIL image -> uint8 (C, H, W): the host part of an eval transform.

    With a centre/squash/border crop (``crop_pct`` set) it is timm's own eval pipeline,
    ``create_transform(..., use_prefetcher=True)``: resize and crop, no scaling, no normalising.
    Without (``crop_pct`` None, the reference cards' 32 -> 224 bilinear stretch) the image is kept
    at its source size and the stretch runs on the device, as the cards' accuracy figures were made.
    """

    def __init__(self, transform):
        self.stretch = transform.crop_pct is None
        self.pipeline = None if self.stretch else _timm_pipeline(transform)
        self.shape = None if self.stretch else (3, transform.img_size, transform.img_size)

    def key(self) -> dict:
        import PIL

        return {"stretch": True} if self.stretch else {"timm_eval": repr(self.pipeline), "pil": PIL.__version__}

    def __call__(self, img) -> np.ndarray:
        if self.stretch:
            return np.asarray(img).transpose(2, 0, 1)
        return self.pipeline(img).numpy()


def _timm_pipeline(t):
    from timm.data import create_transform

    return create_transform(input_size=(3, t.img_size, t.img_size), is_training=False, interpolation=t.interpolation,
                            mean=t.mean, std=t.std, crop_pct=t.crop_pct, crop_mode=t.crop_mode, use_prefetcher=True)


def decode(data: bytes, where: str):
    """JPEG/PNG bytes -> RGB PIL image (grayscale and CMYK converted, as timm's dataset does)."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exc:
        raise HarnessError(f"unreadable image {where}: {type(exc).__name__}: {exc}") from None


def _crop_item(item: Item, crop: Crop) -> np.ndarray:
    if item.data is not None:
        return crop(decode(item.data, item.name))
    try:
        data = Path(item.path).read_bytes()
    except OSError as exc:
        raise HarnessError(f"unreadable image {item.path}: {exc}") from None
    return crop(decode(data, item.path))


def cache_key(source: dict, crop: Crop) -> str:
    """20 hex digits naming a cache: what the crops depend on, nothing else."""
    text = json.dumps({"version": CACHE_VERSION, "source": source, "crop": crop.key()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def names_sha(items: Sequence[Item]) -> str:
    """Hash of the images' names and labels in order: which images, wherever the data set lives."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.name}\t{item.label}\n".encode())
    return h.hexdigest()


def default_workers() -> int:
    """Worker processes for building: $HARNESS_DATA_WORKERS, else one per usable core (at most 32)."""
    if os.environ.get(ENV_WORKERS):
        return max(1, int(os.environ[ENV_WORKERS]))
    return max(1, min(32, len(os.sched_getaffinity(0))))


class CropCache:
    """A complete cache, opened for reading: rows as uint8 tensors, read with ``preadv``.

    Reads go through the page cache into a host buffer, never through a mapping, so a full pass
    leaves the process's resident memory where it was. Positional reads share one descriptor
    safely between threads (the read-ahead) and forked processes.
    """

    def __init__(self, folder: Path, header: dict):
        self.folder, self.header = folder, header
        self.shape = tuple(header["shape"])
        self.count = int(header["count"])
        self.row_bytes = math.prod(self.shape)
        self.labels = torch.tensor(header["labels"], dtype=torch.long) if header.get("labels") is not None else None
        self._fd = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def __len__(self) -> int:
        return self.count

    @property
    def path(self) -> Path:
        return self.folder / CROPS

    def read(self, rows: Sequence[int], pin: bool = False, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 (len(rows), C, H, W) of the given rows, in order; runs of consecutive rows are one read.

        Into a new tensor (pinned with ``pin``), or into the first rows of ``out``, a buffer to reuse.
        """
        if out is None:
            out = torch.empty((len(rows), *self.shape), dtype=torch.uint8, pin_memory=pin)
        else:
            out = out[:len(rows)]
        if len(rows) == 0:
            return out
        flat, rb = memoryview(out.numpy()).cast("B"), self.row_bytes
        for dst, src, n in _runs(rows):
            _pread_into(self._fd, flat[dst * rb:(dst + n) * rb], src * rb, self.path)
        return out

    def array(self) -> np.ndarray:
        """The whole cache as a (count, C, H, W) memory map (copy-on-write: the file is never changed)."""
        return np.memmap(self.path, dtype=np.uint8, mode="c", shape=(self.count, *self.shape))

    def __del__(self):
        with contextlib.suppress(Exception):
            os.close(self._fd)


def _runs(rows: Sequence[int]) -> Iterable[tuple[int, int, int]]:
    """(position in the output, first row, count) for each run of consecutive rows."""
    if isinstance(rows, range) and rows.step == 1:
        yield 0, rows.start, len(rows)
        return
    start, first, n = 0, int(rows[0]), 1
    for i in range(1, len(rows)):
        r = int(rows[i])
        if r == first + n:
            n += 1
            continue
        yield start, first, n
        start, first, n = i, r, 1
    yield start, first, n


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise HarnessError(f"data cache {path} ends early (changed after it was built?): delete {path.parent}")
        view, offset = view[n:], offset + n


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


# ------------------------------------------------------------------------------------ opening --

def open_or_build(root: Path, key: str, items: Callable[[], list[Item]], crop: Crop, name: str,
                  workers: Optional[int] = None) -> CropCache:
    """The complete cache ``key`` under ``root``, built from ``items()`` first if there is none.

    ``items`` is only called when building (a hit never lists or reads the source). A torn cache
    is removed and built again; another process building the same key is waited for.
    """
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HarnessError(f"data cache directory {root} cannot be made: {exc} (set HARNESS_CACHE_DIR)") from None
    final = root / key
    cache = open_cache(final, key)
    if cache is not None:
        return cache
    with _exclusive(root / f"{key}.lock", name):
        cache = open_cache(final, key)  # another process may have built it while we waited
        if cache is not None:
            return cache
        if final.exists():
            shutil.rmtree(final)
        for stale in root.glob(f".build-{key}-*"):  # left by a killed build: we hold the only lock
            shutil.rmtree(stale, ignore_errors=True)
        build(root, key, items(), crop, name, workers or default_workers())
    cache = open_cache(final, key)
    if cache is None:
        raise HarnessError(f"data cache {final} did not validate right after building it")
    return cache


def open_cache(folder: Path, key: str) -> Optional[CropCache]:
    """The cache in ``folder`` when it is complete and matches ``key``; None (logged when torn) otherwise."""
    if not folder.exists():
        return None
    why = _torn(folder, key)
    if why:
        log.warning("data cache %s is not trusted (%s): it will be built again", folder, why)
        return None
    return CropCache(folder, json.loads((folder / HEADER).read_bytes()))


def _torn(folder: Path, key: str) -> str:
    """Why ``folder`` is not a complete cache for ``key``; "" when it is."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return "no completion marker"
    try:
        raw = (folder / HEADER).read_bytes()
        header = json.loads(raw)
        size = (folder / CROPS).stat().st_size
        expected = int(header["count"]) * math.prod(header["shape"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable: {type(exc).__name__}: {exc}"
    if not isinstance(marker, dict) or marker.get("key") != key or header.get("key") != key:
        return "key mismatch"
    if marker.get("header_sha256") != hashlib.sha256(raw).hexdigest():
        return "header does not match its marker"
    if not size == marker.get("bytes") == expected:
        return f"crops file has {size} bytes, marker says {marker.get('bytes')}"
    return ""


@contextlib.contextmanager
def _exclusive(lock_path: Path, name: str):
    import fcntl

    try:
        f = open(lock_path, "a+")
    except OSError as exc:
        raise HarnessError(f"data cache directory {lock_path.parent} is not writable: {exc} "
                           "(set HARNESS_CACHE_DIR)") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.report("waiting for another process building the data cache of %s (%s)", name, lock_path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------- building --

def build(root: Path, key: str, items: list[Item], crop: Crop, name: str, workers: int) -> dict:
    """Decode and crop ``items`` into ``root/key`` (see the module docstring); return the build statistics."""
    if not items:
        raise HarnessError(f"{name}: no images to cache")
    tmp = root / f".build-{key}-{os.getpid()}"
    tmp.mkdir()
    try:
        shape = crop.shape or tuple(_crop_item(items[0], crop).shape)
        row_bytes = math.prod(shape)
        _check_space(root, len(items) * row_bytes, name)
        with open(tmp / CROPS, "wb") as f:
            f.truncate(len(items) * row_bytes)
        stats = _fill(tmp / CROPS, items, crop, shape, workers, name)
        _fsync(tmp / CROPS)
        header = {"key": key, "version": CACHE_VERSION, "name": name, "count": len(items), "shape": list(shape),
                  "dtype": "uint8", "names_sha256": names_sha(items), "labels": [i.label for i in items],
                  "crop": crop.key(), "build": stats}
        raw = json.dumps(header).encode()
        _write_synced(tmp / HEADER, raw)
        marker = {"key": key, "header_sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(items) * row_bytes}
        _write_synced(tmp / MARKER, json.dumps(marker).encode())  # last: its presence means the rest is on disk
        _fsync(tmp)
        os.rename(tmp, root / key)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


def _check_space(root: Path, need: int, name: str) -> None:
    free = shutil.disk_usage(root).free
    if need > free:
        raise HarnessError(f"the data cache of {name} needs {need / 1e9:.1f} GB, {root} has {free / 1e9:.1f} GB free "
                           "(set HARNESS_CACHE_DIR to another disk)")


def _chunks(n: int, workers: int, size: int = 64) -> list[tuple[int, int]]:
    # several chunks per worker so that the pool stays busy to the end and progress moves
    step = max(1, min(size, math.ceil(n / (workers * 4))))
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _fill(path: Path, items: list[Item], crop: Crop, shape: tuple, workers: int, name: str) -> dict:
    """Write every item's crop at its row, ``workers`` processes at a time, reporting progress."""
    spans = _chunks(len(items), workers)
    tasks = [(str(path), a, items[a:b], crop, shape) for a, b in spans]
    workers = max(1, min(workers, len(tasks)))
    progress.report("building the data cache of %s: %d images, %d worker%s -> %s", name, len(items), workers,
                    "s" if workers > 1 else "", path.parent.parent)
    start, done, busy = time.perf_counter(), 0, {}
    due = progress.Throttle(5.0)
    with _pool(workers) as pool:
        results = pool.imap_unordered(_fill_chunk, tasks) if pool is not None else map(_fill_chunk, tasks)
        for n, seconds, pid in results:
            done += n
            busy[pid] = busy.get(pid, 0.0) + seconds
            if due(last=done == len(items)):
                rate = done / max(time.perf_counter() - start, 1e-9)
                progress.report("  %s %d/%d images (%d %%), %.0f img/s, %.0f s left", _bar(done, len(items)), done,
                                len(items), 100 * done // len(items), rate, (len(items) - done) / max(rate, 1e-9))
    seconds = time.perf_counter() - start
    stats = {"images": len(items), "workers": workers, "build_s": round(seconds, 3),
             "img_per_s": round(len(items) / seconds, 1),
             "img_per_s_per_worker": round(len(items) / max(sum(busy.values()), 1e-9), 1)}
    progress.report("built the data cache of %s: %d images in %.1f s, %.0f img/s (%.0f img/s per worker)", name,
                    len(items), seconds, stats["img_per_s"], stats["img_per_s_per_worker"])
    return stats


def _bar(done: int, total: int, width: int = 24) -> str:
    full = width * done // total
    return "[" + "#" * full + "." * (width - full) + "]"


@contextlib.contextmanager
def _pool(workers: int):
    """A fork pool of ``workers`` processes, or None (work in this process) for one worker."""
    if workers <= 1:
        yield None
        return
    import multiprocessing as mp

    # fork: the workers inherit the imported modules (no re-import of torch/timm per worker)
    ctx = mp.get_context("fork")
    pool = ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(1,))
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _fill_chunk(task) -> tuple[int, float, int]:
    """Crop one chunk of items into a buffer and write it at its rows; (images, busy seconds, pid)."""
    path, start, items, crop, shape = task
    t0 = time.perf_counter()
    buf = np.empty((len(items), *shape), dtype=np.uint8)
    for j, item in enumerate(items):
        x = _crop_item(item, crop)
        if x.shape != shape:
            raise HarnessError(f"image {item.path or item.name} is {x.shape[2]}x{x.shape[1]}, the others "
                               f"{shape[2]}x{shape[1]}: a stretch transform needs images of one size")
        buf[j] = x
    fd = os.open(path, os.O_WRONLY)
    try:
        _pwrite_all(fd, memoryview(buf).cast("B"), start * buf[0].nbytes)
    finally:
        os.close(fd)
    return len(items), time.perf_counter() - t0, os.getpid()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: a rename inside it is then on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
