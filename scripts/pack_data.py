"""Pack what a GPU machine needs from the data root into one folder (default ``carry/``, git-ignored).

For a remote GPU box that has the project's checkout but neither the data root nor network access:

    python scripts/pack_data.py                 # carry/data (a data root) + carry/whl (fvcore's wheels)
    python scripts/pack_data.py --models deit_tiny_cifar10 --train-per-class 5000   # tiny, whole train split
    # on the GPU machine, with carry/ beside the checkout's files:
    HARNESS_DATA_ROOT=carry/data python -m harness run ...

What goes in ``carry/data`` (a data root of the same layout, so cell ids and results are unchanged):
  - ``models/<name>.safetensors`` + ``.json`` for each ``--models`` reference checkpoint;
  - ``diffrate/compression_rate.json`` (DiffRate's published schedules, for the speed suite);
  - ``datasets/cifar10-jpeg.tar.gz`` repacked: the whole test split, and the first
    ``--train-per-class`` train images of each class in file-name order. A calibration set of
    ``calib_limit <= 10 x train-per-class`` is then exactly the one the full archive gives (the
    harness takes the first images of each class in that order); beyond, the calibration set is smaller.

``carry/whl`` holds pure-Python wheels of fvcore and the dependencies a bare torch + timm install
lacks (built here with pip, which needs PyPI). Install them there with
``pip install --no-index --no-deps --target /tmp/site carry/whl/*.whl`` and ``PYTHONPATH=/tmp/site``.

The size of everything is printed; ``--max-mib`` (default 62) fails the packing when the folder
and the checkout's tracked files together are larger (a transfer of 64 MiB at most carries both).
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from harness.loading.data import CIFAR10_ARCHIVE  # noqa: E402
from harness.paths import data_root  # noqa: E402

WHEELS = ["fvcore==0.1.5.post20221221", "iopath==0.1.10", "yacs==0.1.8", "termcolor==3.3.0", "portalocker==4.4.2"]


def repack_cifar10(src: Path, dst: Path, train_per_class: int) -> dict:
    """Copy the test split and the first ``train_per_class`` train images of each class (by name)."""
    train_names: dict[str, list[str]] = defaultdict(list)
    with tarfile.open(src, "r:gz") as tar:
        names = [m.name for m in tar if m.isfile()]
    for name in sorted(names):
        parts = name.split("/")
        if len(parts) == 4 and parts[1] == "train":
            train_names[parts[2]].append(name)
    keep = {n for n in names if n.split("/")[1:2] == ["test"]}
    for cls_names in train_names.values():
        keep.update(cls_names[:train_per_class])
    counts = {"test": 0, "train": 0}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src, "r:gz") as tar, tarfile.open(dst, "w:gz") as out:
        for member in tar:
            if member.isfile() and member.name in keep:
                out.addfile(member, io.BytesIO(tar.extractfile(member).read()))
                counts[member.name.split("/")[1]] += 1
    return counts


def build_wheels(dest: Path, specs: list[str]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dest), *specs]
    subprocess.run(cmd, check=True)


def checkout_bytes() -> int:
    """Bytes of the project's tracked files (0 outside a git checkout)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return 0
    files = (PROJECT / n for n in names.decode().split("\0") if n)
    return sum(f.stat().st_size for f in files if f.is_file())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=PROJECT / "carry")
    p.add_argument("--data-root", default="", help="the data root to pack (default: the harness's lookup)")
    p.add_argument("--models", default="deit_tiny_cifar10,deit_small_cifar10",
                   help="reference checkpoints to include ('' for none)")
    p.add_argument("--train-per-class", type=int, default=900, help="CIFAR-10 train images per class (0: none)")
    p.add_argument("--no-data", action="store_true", help="only the DiffRate schedules, no dataset or checkpoint")
    p.add_argument("--no-wheels", action="store_true")
    p.add_argument("--max-mib", type=float, default=62.0,
                   help="fail when the packed folder plus the checkout's tracked files are larger (64 MiB travel at most)")
    args = p.parse_args(argv)

    root = data_root(args.data_root)
    out = args.out
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    (data / "diffrate").mkdir(parents=True)
    shutil.copy2(root / "diffrate" / "compression_rate.json", data / "diffrate")
    if not args.no_data:
        (data / "models").mkdir()
        for name in filter(None, (m.strip() for m in args.models.split(","))):
            for ext in (".safetensors", ".json"):
                shutil.copy2(root / "models" / f"{name}{ext}", data / "models")
        counts = repack_cifar10(root / CIFAR10_ARCHIVE, data / CIFAR10_ARCHIVE, args.train_per_class)
        print(f"cifar10: {counts['test']} test and {counts['train']} train images")
    if not args.no_wheels:
        build_wheels(out / "whl", WHEELS)
    size = folder_bytes(out) / 2**20
    tree = checkout_bytes() / 2**20
    print(f"packed {out}: {size:.1f} MiB; with the checkout's tracked files {size + tree:.1f} MiB")
    for sub in sorted(out.rglob("*")):
        if sub.is_file():
            print(f"  {sub.relative_to(out)}  {sub.stat().st_size / 2**20:.2f} MiB")
    if size + tree > args.max_mib:
        print(f"error: {size + tree:.1f} MiB is over --max-mib {args.max_mib}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
