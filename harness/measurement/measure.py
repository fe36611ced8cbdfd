"""Measurements of one patched model: accuracy, throughput, and the environment they ran in.

All timing lives here so that the "measurement done right" work has one place to change.
"""
from __future__ import annotations

import contextlib
import logging
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from harness.measurement import stats
from harness.errors import HarnessError
from harness.paths import checkout_root

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
    """``auto`` is bf16 autocast (what a deployment would use) on GPU and on CPUs with native bf16
    arithmetic (avx512_bf16 / AMX: 1.65x the fp32 img/s of DeiT-S measured on this project's 2-core
    EPYC), else fp32 (a CPU without it emulates bf16, slower than fp32)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if name not in DTYPES:
        raise HarnessError(f"unknown dtype {name!r}; choices: auto, {', '.join(DTYPES)}")
    return name


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Linux ``/proc/cpuinfo`` flags; elsewhere: no)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def timing_counts(device: torch.device, warmup: int, repeats: int) -> tuple[int, int]:
    """Warm-up and timed calls; -1 picks the device's default (GPU 10 and 30, CPU 2 and 5).

    A GPU call of a small model takes milliseconds: 30 of them give a stable median, and 10 untimed
    calls let cuBLAS / SDPA pick their kernels and the clocks settle first.
    """
    gpu = device.type == "cuda"
    return (warmup if warmup >= 0 else (10 if gpu else 2)), (repeats if repeats > 0 else (30 if gpu else 5))


def set_attention(model, attention: str) -> None:
    """``fused``: timm's ``scaled_dot_product_attention``; ``eager``: its explicit softmax(q k^T) v path."""
    for blk in getattr(model, "blocks", ()):
        if hasattr(getattr(blk, "attn", None), "fused_attn"):
            blk.attn.fused_attn = attention == "fused"


def attention_kernel(model) -> Optional[str]:
    """What the blocks' attention runs: ``fused`` or ``eager`` when all agree, ``mixed`` when they do
    not, None when no block says (no ``attn.fused_attn``)."""
    flags = {bool(blk.attn.fused_attn) for blk in getattr(model, "blocks", ())
             if hasattr(getattr(blk, "attn", None), "fused_attn")}
    if not flags:
        return None
    return "mixed" if len(flags) > 1 else ("fused" if flags.pop() else "eager")


def sdpa_kernel(backend: str):
    """A context pinning ``scaled_dot_product_attention`` to one kernel; ``auto`` lets PyTorch choose.

    A pinned kernel that cannot run a call (flash with an additive mask, say) makes that call fail,
    and the cell records the error.
    """
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel as _pin

    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return _pin(kinds[backend])


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
    preds, labels = [], []
    start = time.perf_counter()
    for i in range(0, total, batch_size):
        x, y = evalset.batch(i, min(i + batch_size, total), device)
        with autocast(device, dtype):
            logits = model(x)
        top5 = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += (top5[:, 0] == y).sum().item()
        correct5 += (top5 == y[:, None]).any(-1).sum().item()
        preds.append(top5[:, 0].cpu())
        labels.append(y.cpu())
        if on_batch:
            on_batch(min(i + batch_size, total), total)
    return {"top1": correct1 / total, "top5": correct5 / total, "n_images": total,
            "eval_s": round(time.perf_counter() - start, 3),
            # per-image top-1 and label, in eval-set order: what paired tests (McNemar) read
            "_predictions": (torch.cat(preds).numpy(), torch.cat(labels).numpy())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` for ``repeats`` calls after ``warmup`` untimed ones.

    On CUDA each call is timed by CUDA events on the GPU's own stream (one synchronisation at the
    end, so launches overlap as in deployment); on CPU by ``perf_counter``.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, stop in events:
        start.record()
        fn()
        stop.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(stop) / 1000 for start, stop in events]


def time_interleaved(fn: Callable[[], object], base_fn: Callable[[], object], device: torch.device, warmup: int,
                     rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per call of ``fn`` and ``base_fn``, timed in alternation: ``rounds`` rounds of one call each.

    Rounds alternate the order (AB, BA, AB, ...) so that a drift in the machine's speed (another
    process starting, clocks settling) falls on both alike; the ratio of a round is then a fair
    speed-up even when the absolute figures move between rounds.
    """
    for _ in range(warmup):
        fn()
        base_fn()
    _sync(device)
    pairs = [(fn, base_fn) if i % 2 == 0 else (base_fn, fn) for i in range(rounds)]
    if device.type != "cuda":
        seconds = {id(fn): [], id(base_fn): []}
        for pair in pairs:
            for f in pair:
                t0 = time.perf_counter()
                f()
                seconds[id(f)].append(time.perf_counter() - t0)
        return seconds[id(fn)], seconds[id(base_fn)]
    events = {id(fn): [], id(base_fn): []}
    for pair in pairs:
        for f in pair:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            stop.record()
            events[id(f)].append((start, stop))
    torch.cuda.synchronize(device)
    return ([a.elapsed_time(b) / 1000 for a, b in events[id(fn)]],
            [a.elapsed_time(b) / 1000 for a, b in events[id(base_fn)]])


def speedup_stats(times: list[float], base_times: list[float], batch_size: int) -> dict:
    """Per-round speed-up (the baseline's seconds over the method's) with its median and quartiles.

    From fewer than ``stats.MIN_ROUNDS`` interleaved rounds there is no speed-up: median and
    quartiles are None and ``speedup_na`` says why (the rounds themselves are kept).
    """
    ratios = [b / t for t, b in zip(times, base_times)]
    out = {"speedup_rounds": [round(r, 4) for r in ratios], "timing_rounds": len(ratios),
           "baseline_img_per_s": round(statistics.median(batch_size / t for t in base_times), 2),
           "speedup_na": stats.too_few_rounds(len(ratios), "a speed-up")}
    if out["speedup_na"] is not None:
        return {**out, "speedup_median": None, "speedup_q1": None, "speedup_q3": None}
    q1, q3 = _quartiles(sorted(ratios))
    return {**out, "speedup_median": round(statistics.median(ratios), 4), "speedup_q1": round(q1, 4),
            "speedup_q3": round(q3, 4)}


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def rate_stats(times: list[float], batch_size: int, prefix: str = "img_per_s") -> dict:
    """Median, min, max and inter-quartile range of images/s over timed runs.

    From fewer than ``stats.MIN_ROUNDS`` runs the IQR is None and ``<prefix>_iqr_na`` says why.
    """
    rates = sorted(batch_size / t for t in times)
    out = {prefix: round(statistics.median(rates), 2), f"{prefix}_min": round(rates[0], 2),
           f"{prefix}_max": round(rates[-1], 2), f"{prefix}_iqr": None,
           f"{prefix}_iqr_na": stats.too_few_rounds(len(rates), "an IQR")}
    if out[f"{prefix}_iqr_na"] is None:
        q1, q3 = _quartiles(rates)
        out[f"{prefix}_iqr"] = round(q3 - q1, 2)
    return out


def latency_stats(times: list[float]) -> dict:
    """Batch-1 latency in ms: median, min, max."""
    ms = sorted(1000 * t for t in times)
    return {"latency_ms": round(statistics.median(ms), 3), "latency_ms_min": round(ms[0], 3), "latency_ms_max": round(ms[-1], 3)}


def with_oom_fallback(run: Callable[[int], dict], batch_size: int, device: torch.device, min_batch_size: int = 1) -> dict:
    """``run(batch)``, halving the batch on CUDA out-of-memory until it fits or drops below ``min_batch_size``.

    Returns run's dict plus the batch actually used (``throughput_batch_size``), the one asked for,
    and how many halvings it took (``oom_retries``). The last OOM propagates.
    """
    batch, retries = batch_size, 0
    while True:
        try:
            out = run(batch)
            return {**out, "throughput_batch_size": batch, "throughput_batch_size_requested": batch_size,
                    "oom_retries": retries}
        except torch.cuda.OutOfMemoryError:
            if batch // 2 < max(1, min_batch_size):
                raise
            log.warning("out of memory at batch %d; trying %d", batch, batch // 2)
            batch, retries = batch // 2, retries + 1
            if device.type == "cuda":
                torch.cuda.empty_cache()


def compile_model(model, backend: str = "inductor"):
    """``torch.compile`` on a fresh dynamo cache, so one cell's graphs never count against another's."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(model, backend=backend)


def graph_breaks() -> int:
    """Graph breaks dynamo counted since the last :func:`compile_model`."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def _first_call(model, compiled, x: torch.Tensor, backend: str) -> tuple[object, dict]:
    # Compilation happens at the first call: a failure is recorded and timing goes on eagerly.
    info = {"compiled": compiled is not None, "compile_backend": backend if compiled is not None else None,
            "compile_error": None, "graph_breaks": None}
    if compiled is None:
        return model, info
    try:
        compiled(x)
        info["graph_breaks"] = graph_breaks()
        return compiled, info
    except Exception as exc:  # a method that cannot compile is data, not a crash
        log.warning("torch.compile failed, timing eagerly: %s", exc)
        lines = [ln for ln in f"{type(exc).__name__}: {exc}".splitlines() if ln.strip()]
        info.update(compiled=False, compile_error=" | ".join(lines[:2])[:500])  # dynamo puts the cause on line 2
        return model, info


@torch.inference_mode()
def throughput(model, img_size: int, batch_size: int, device: torch.device, dtype: str, warmup: int, repeats: int,
               *, baseline=None, latency: bool = True, compile: bool = False, compile_backend: str = "inductor",
               min_batch_size: int = 1, memory: Optional["MemoryCounter"] = None) -> dict:
    """Model-only images/s on a synthetic batch already on the device, and batch-1 latency.

    Timed after ``warmup`` calls, over ``repeats`` calls: median and spread (min, max, IQR). With a
    ``baseline`` model (the unpatched one), the two are timed in alternation, ``repeats`` rounds of
    one call each (:func:`time_interleaved`), and the per-round speed-ups are recorded
    (:func:`speedup_stats`): a speed-up is never a ratio of figures taken minutes apart. On CUDA
    out-of-memory the batch is halved and the batch used recorded; ``peak_mem_mb`` is the method
    model's alone, nothing else resident counted (:class:`PeakMemory` over ``memory``). With ``compile``, ``torch.compile`` is tried (the baseline
    compiled too) and whether it worked (``compiled``, ``compile_error``, ``graph_breaks``) recorded.
    """
    model.eval()
    compiled = compile_model(model, compile_backend) if compile else None
    memory, info = (memory if memory is not None else cuda_memory(device)), {}

    def run(batch: int) -> dict:
        nonlocal info
        peak_mem = PeakMemory(model, memory)  # before the input: the batch is the cell's too
        x = torch.randn(batch, 3, img_size, img_size, device=device)
        with autocast(device, dtype):
            fn, info = _first_call(model, compiled, x, compile_backend)
            if baseline is None:
                times, extra = time_runs(lambda: fn(x), device, warmup, repeats), {}
                peak = peak_mem.mb()
            else:
                fn(x)  # the method's own peak memory, before the baseline's runs share the device
                peak = peak_mem.mb()
                base_fn = _prepared_baseline(baseline.eval(), compile and info["compiled"], compile_backend)
                times, base_times = time_interleaved(lambda: fn(x), lambda: base_fn(x), device, warmup, repeats)
                extra = speedup_stats(times, base_times, batch)
        return {**rate_stats(times, batch), **extra, "peak_mem_mb": peak, "_fn": fn}

    out = with_oom_fallback(run, batch_size, device, min_batch_size)
    fn = out.pop("_fn")
    if latency:
        out.update(_batch1_latency(fn, img_size, device, dtype, warmup, repeats))
    return {**out, **info, **_timing_settings(device, dtype, warmup, repeats)}


def _timing_settings(device: torch.device, dtype: str, warmup: int, repeats: int) -> dict:
    return {"dtype": dtype, "throughput_repeats": repeats, "throughput_warmup": warmup,
            "timing_clock": "cuda_event" if device.type == "cuda" else "cpu_perf_counter"}


def _batch1_latency(fn, img_size: int, device: torch.device, dtype: str, warmup: int, repeats: int) -> dict:
    x1 = torch.randn(1, 3, img_size, img_size, device=device)
    with autocast(device, dtype):
        return latency_stats(time_runs(lambda: fn(x1), device, warmup, repeats))


def _prepared_baseline(baseline, compile: bool, backend: str):
    # compiled only when the method's model compiled: both sides of a ratio run the same way
    return torch.compile(baseline, backend=backend) if compile else baseline


class MemoryCounter:
    """Bytes a device's allocator holds for tensors: now, and at most since the last reset."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def cuda_memory(device: torch.device) -> Optional[MemoryCounter]:
    """CUDA's allocator counter on a GPU; None elsewhere (no peak memory is recorded on CPU)."""
    return MemoryCounter(device) if device.type == "cuda" else None


class PeakMemory:
    """Peak device memory of one model's runs from now on, as if nothing else were resident.

    The allocator's peak counts every tensor on the device: other models (the unpatched baseline
    timed beside this one), eval data, caches. Whatever was allocated when this starts is taken
    out and the model's own weights (parameters and buffers) put back, so the figure is this
    model's weights plus its input, activations and workspace, whatever else shares the device.
    """

    def __init__(self, model: torch.nn.Module, counter: Optional[MemoryCounter]):
        self.model, self.counter = model, counter
        if counter is not None:
            counter.reset_peak()
            self.resident = counter.allocated()

    def mb(self) -> Optional[float]:
        """The peak so far in MiB (None without a counter)."""
        if self.counter is None:
            return None
        return round((self.counter.peak() - self.resident + model_bytes(self.model)) / 2**20, 1)


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (each tensor once, however often it is shared)."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def sample_jpegs(evalset, n: int, quality: int = 90, src_size: Optional[int] = None) -> list[bytes]:
    """``n`` JPEG files in memory for the end-to-end figure.

    From the eval set's uint8 images when it has them; otherwise smooth synthetic photos (low-frequency
    colour fields plus grain, which compress like natural images) at ``src_size`` (default 8/7 of the
    model's input side, the usual resize-then-crop source).
    """
    import io

    import numpy as np
    from PIL import Image

    images = evalset.images if evalset.images is not None and evalset.images.dtype == torch.uint8 else None
    if images is None:
        images = _synthetic_photos(n, src_size or round(evalset.transform.img_size * 8 / 7))
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(images[i % len(images)].permute(1, 2, 0).numpy())).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _synthetic_photos(n: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 6, 6, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.03 * torch.randn(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def decode_batch(jpegs: list[bytes], pool=None) -> torch.Tensor:
    """JPEG bytes (all the same size) -> uint8 (B, 3, H, W) on the host, decoded by ``pool`` threads if given."""
    import io

    import numpy as np
    from PIL import Image

    def decode(data: bytes):
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    arrays = list(pool.map(decode, jpegs)) if pool is not None else [decode(d) for d in jpegs]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.inference_mode()
def end_to_end(model, jpegs: list[bytes], transform, batch_size: int, device: torch.device, dtype: str,
               warmup: int, repeats: int, decode_threads: int = 0) -> dict:
    """Images/s from JPEG bytes on the host to logits: decode + host->device copy + transform + model.

    The transform is the EvalSet batch path (uint8 on the device, resized and normalised there).
    The wall clock spans each batch with a synchronisation at its end, so a data pipeline slower
    than the model shows as ``e2e_img_per_s`` well below ``img_per_s``.
    """
    from concurrent.futures import ThreadPoolExecutor

    from harness.loading.data import stretch_and_normalize

    batch = jpegs[:batch_size] if len(jpegs) >= batch_size else (jpegs * (batch_size // len(jpegs) + 1))[:batch_size]
    pool = ThreadPoolExecutor(decode_threads) if decode_threads > 0 else None

    def step():
        x = decode_batch(batch, pool)
        x = (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)
        with autocast(device, dtype):
            model(stretch_and_normalize(x, transform))
        _sync(device)

    try:
        times = [_wall(step) for _ in range(warmup + repeats)][warmup:]
    finally:
        if pool is not None:
            pool.shutdown()
    return {**rate_stats(times, len(batch), prefix="e2e_img_per_s"), "e2e_batch_size": len(batch),
            "e2e_decode_threads": decode_threads}


def _wall(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0

def git_sha() -> Optional[str]:
    """The project's commit, with ``+dirty`` when the tree has uncommitted changes.

    A copy of the tree without its ``.git`` (a remote GPU machine) names it in ``HARNESS_GIT_SHA``.
    """
    import os

    if os.environ.get("HARNESS_GIT_SHA"):
        return os.environ["HARNESS_GIT_SHA"]
    checkout = checkout_root()
    if checkout is None:  # an installed copy: its version says what it is, not a repository it may sit in
        return None
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=checkout, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def environment(device: torch.device) -> dict:
    """Provenance carried by every record: versions, device, driver, kernels.

    CPU rows say so in ``device`` and ``device_name`` ("cpu (...)"); GPU rows carry the GPU's name,
    capability and memory, the driver, the CUDA runtime and cuDNN, and which SDPA kernels are enabled.
    """
    import platform

    import timm
    from timm.layers import use_fused_attn

    env = {"device": device.type, "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
           "git_sha": git_sha(), "timm_fused_attn": bool(use_fused_attn()), "cpu_threads": torch.get_num_threads()}
    if device.type != "cuda":
        return {**env, "device_name": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                "cuda": None, "driver": None}
    props = torch.cuda.get_device_properties(device)
    return {**env, "device_name": torch.cuda.get_device_name(device), "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_mem_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda, "driver": _driver_version(),
            "cudnn": torch.backends.cudnn.version(), "sdpa_backends": _sdpa_backends()}


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def _sdpa_backends() -> str:
    b = torch.backends.cuda
    on = {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled(),
          "cudnn": getattr(b, "cudnn_sdp_enabled", lambda: False)()}
    return ",".join(k for k, v in on.items() if v)
