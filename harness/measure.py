"""Measurements of one patched model: accuracy, throughput, and the environment they ran in.

All timing lives here so that the "measurement done right" work has one place to change.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import subprocess
import time
from typing import Callable, Optional

import torch

from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an unavailable device is a HarnessError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HarnessError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device {name!r} asked for but CUDA is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on GPU (what a deployment would use) and fp32 on CPU."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise HarnessError(f"unknown dtype {name!r}; choices: auto, {', '.join(DTYPES)}")
    return name


def autocast(device: torch.device, dtype: str):
    """Autocast for fp16/bf16; fp32 runs as is."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


@torch.inference_mode()
def evaluate(model, evalset, batch_size: int, device: torch.device, dtype: str,
             on_batch: Optional[Callable[[int, int], None]] = None) -> dict:
    """Top-1 / top-5 accuracy (fractions) over ``evalset``; ``on_batch(done, total)`` reports progress."""
    correct1 = correct5 = 0
    total = len(evalset)
    start = time.perf_counter()
    for i in range(0, total, batch_size):
        x, y = evalset.batch(i, min(i + batch_size, total), device)
        with autocast(device, dtype):
            logits = model(x)
        top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(-1).sum().item()
        if on_batch:
            on_batch(min(i + batch_size, total), total)
    return {"top1": correct1 / total, "top5": correct5 / total, "n_images": total,
            "eval_s": round(time.perf_counter() - start, 3)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def throughput(model, img_size: int, batch_size: int, device: torch.device, dtype: str,
               warmup: int, repeats: int) -> dict:
    """Model-only images/s on a synthetic batch already on the device: median of ``repeats`` timed runs.

    On CUDA each run is bracketed by synchronisations, so the wall clock spans the kernels.
    """
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    times = []
    with autocast(device, dtype):
        for i in range(warmup + repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    rates = [batch_size / t for t in times]
    return {"img_per_s": round(statistics.median(rates), 2), "img_per_s_min": round(min(rates), 2),
            "img_per_s_max": round(max(rates), 2), "throughput_batch_size": batch_size,
            "throughput_repeats": repeats}


def git_sha() -> Optional[str]:
    """The project's commit, with ``+dirty`` when the tree has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def environment(device: torch.device) -> dict:
    """Provenance carried by every record: versions, device, kernels."""
    import platform

    import timm

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "timm": timm.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None, "git_sha": git_sha()}
