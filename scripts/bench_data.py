"""Throughput and memory of the data path: building the crop cache, and streaming from it.

    python scripts/bench_data.py                               # 5,000 images in a temp dir, all cores
    python scripts/bench_data.py --images 5000 --workers 2 --keep /tmp/bench-val

1. Generates an ImageNet-layout folder (``<synset>/<name>.JPEG``, 50 per synset like ImageNet val)
   of JPEGs at real-photo sizes (500x375, 375x500, 500x333, 500x400, 640x480, ...), quality 90:
   crops of the shared sample's real photos (``<data root>/datasets/imagenet-sample``), or smooth
   synthetic photos where there is no data root.
2. Builds the crop cache of DeiT-S's eval transform (timm's: bicubic resize to 248, centre crop 224)
   into an empty cache folder: images/s over all workers, and per worker (images over the workers'
   summed busy time). Loads the set again to show that a hit decodes nothing.
3. Streams it in a fresh process (its peak memory is the pass's own), as ``measure.evaluate`` does:
   ``EvalSet.batch`` over the whole set (read from the cache, normalise on the CPU "device"), a
   first pass to warm the page cache, then a timed one; and ``EvalSet.host_batch`` alone (cache ->
   uint8 host batches with read-ahead: the CPU's share of a GPU pass, where normalising runs on the
   GPU). The same over the first tenth of the cache's rows shows whether peak memory grows with
   the number of images.

Peak resident memory is VmHWM from /proc/self/status (the kernel's high-water mark of the process's
RSS); the build workers' is ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the largest of them).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = [(500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (640, 480), (500, 500), (400, 300)]
DEIT_S = dict(img_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.9,
              interpolation="bicubic", crop_mode="center")


def peak_rss_mb() -> float:
    """VmHWM of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------- the folder --

def _sources(root: Path | None) -> list[Path]:
    if root is None:
        return []
    return sorted((root / "datasets/imagenet-sample/val").glob("*/*"))


def _make(task) -> int:
    """Write images [start, stop) of the folder (one worker's share)."""
    import numpy as np
    from PIL import Image

    folder, start, stop, sources, synsets = task
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        w, h = SIZES[i % len(SIZES)]
        if sources:
            img = Image.open(sources[i % len(sources)]).convert("RGB")
            img = _random_crop(img, w / h, rng).resize((w, h), Image.BICUBIC)
        else:
            low = rng.random((6, 6, 3)) * 255
            img = Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BICUBIC)
            noise = rng.normal(0, 8, (h, w, 3))
            img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        d = Path(folder) / synsets[i // 50 % len(synsets)]
        d.mkdir(exist_ok=True)
        img.save(d / f"ILSVRC2012_val_{i:08d}.JPEG", quality=90)
    return stop - start


def _random_crop(img, aspect: float, rng):
    w, h = img.size
    scale = rng.uniform(0.6, 1.0)
    cw = min(w, int(round((w * h * scale * aspect) ** 0.5)))
    ch = min(h, int(round(cw / aspect)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((x, y, x + cw, y + ch))


def generate(folder: Path, n: int, workers: int, root: Path | None) -> float:
    import multiprocessing as mp

    from timm.data import ImageNetInfo

    synsets = ImageNetInfo().label_names()[::10]
    sources = [str(p) for p in _sources(root)]
    folder.mkdir(parents=True, exist_ok=True)
    step = 250
    tasks = [(str(folder), a, min(a + step, n), sources, synsets) for a in range(0, n, step)]
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(workers) as pool:
        done = sum(pool.imap_unordered(_make, tasks))
    assert done == n
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------- stream --

def stream(folder: Path, cache: Path, batch: int, limit: int) -> dict:
    """In this process: load the cached set and pass over it as an evaluation does; img/s and peak RSS."""
    import torch

    from harness.loading.data import EvalSet, load_imagenet_folder
    from harness.loading.models import Transform

    t = Transform(**DEIT_S)
    t0 = time.perf_counter()
    s = load_imagenet_folder(folder, t, cache=cache)
    hit_s = time.perf_counter() - t0
    if limit:  # the first rows of the same cache (a --limit would be a cache of its own)
        s = EvalSet(s.name, None, s.labels[:limit], t, cache=s.cache, rows=range(limit))
    n, cpu = len(s), torch.device("cpu")
    rates = []
    for _ in range(2):  # the first pass warms the page cache
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            x, y = s.batch(i, min(i + batch, n), cpu)
        rates.append(n / (time.perf_counter() - t0))
    host = []
    for _ in range(2):
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            s.host_batch(i, min(i + batch, n))
        host.append(n / (time.perf_counter() - t0))
    return {"images": n, "cache_hit_s": round(hit_s, 3), "batch_img_per_s_first": round(rates[0]),
            "batch_img_per_s": round(rates[1]), "host_img_per_s": round(max(host)), "batch": batch,
            "torch_threads": torch.get_num_threads(), "peak_rss_mb": round(peak_rss_mb()),
            "identity": s.identity}


def _stream_in_child(folder: Path, cache: Path, batch: int, limit: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--stream-only", str(folder), "--cache", str(cache),
                          "--batch", str(batch), "--limit", str(limit)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------- main --

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="cache-building processes")
    p.add_argument("--batch", type=int, default=256, help="streaming batch (the GPU eval batch)")
    p.add_argument("--keep", type=Path, help="generate into (or reuse) this folder instead of a temp dir")
    p.add_argument("--stream-only", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stream_only:
        print(json.dumps(stream(args.stream_only, args.cache, args.batch, args.limit)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        run(args, Path(tmp))


def run(args, tmp: Path) -> None:
    import logging

    from harness import progress
    from harness.loading.data import load_imagenet_folder
    from harness.loading.models import Transform
    from harness.paths import data_root

    logging.basicConfig(level=logging.WARNING)
    progress.to_stdout(indent="  ")
    folder = args.keep or tmp / "val"
    try:
        root = data_root()
    except Exception:
        root = None
    if not any(folder.glob("*/*.JPEG")):
        seconds = generate(folder, args.images, args.workers, root)
        print(f"generated {args.images} JPEGs in {seconds:.1f} s: {folder} "
              f"({'crops of the shared real photos' if _sources(root) else 'synthetic photos'})")
    files = sorted(folder.glob("*/*.JPEG"))
    mb = sum(f.stat().st_size for f in files) / 1e6
    print(f"folder: {len(files)} JPEGs, {mb:.0f} MB, {mb * 1e3 / len(files):.0f} KB each on average")

    cache = tmp / "cache"
    os.environ["HARNESS_DATA_WORKERS"] = str(args.workers)
    t = Transform(**DEIT_S)
    t0 = time.perf_counter()
    s = load_imagenet_folder(folder, t, cache=cache)
    build_s = time.perf_counter() - t0
    b = s.cache.header["build"]
    print(f"build: {b['images']} images, {b['workers']} workers, {b['build_s']:.1f} s decoding "
          f"({build_s:.1f} s with listing and fsync): {b['img_per_s']:.0f} img/s, "
          f"{b['img_per_s_per_worker']:.0f} img/s per worker; cache {s.cache.path.stat().st_size / 1e9:.2f} GB")
    print(f"build peak RSS: main process {peak_rss_mb():.0f} MB, largest worker "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MB")
    t0 = time.perf_counter()
    again = load_imagenet_folder(folder, t, cache=cache)
    print(f"second load: {time.perf_counter() - t0:.2f} s, nothing decoded (same cache {again.cache.folder.name}, "
          f"identity {again.identity})")
    for limit in (max(1, len(files) // 10), 0):
        r = _stream_in_child(folder, cache, args.batch, limit)
        print(f"stream ({r['images']} images, batch {r['batch']}, {r['torch_threads']} torch threads, fresh process): "
              f"{r['host_img_per_s']} img/s from the cache to host batches (EvalSet.host_batch, what a GPU copy "
              f"takes), {r['batch_img_per_s']} img/s normalised on the CPU (EvalSet.batch; first pass "
              f"{r['batch_img_per_s_first']}); cache hit {r['cache_hit_s']:.2f} s; peak RSS {r['peak_rss_mb']} MB")


if __name__ == "__main__":
    main()
