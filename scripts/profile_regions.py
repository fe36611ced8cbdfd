"""Where a patched model's forward time goes: attention, SDPA within it, MLP, the reduction, the rest.

    python scripts/profile_regions.py --model deit_small_patch16_224 --methods none,tome --budget r=13

Random weights, a synthetic batch already on the device, the harness's dtype (autocast) and
attention settings. Each block's attention, MLP and reducer run under a ``record_function`` label;
torch.profiler then sums the time of what ran inside each label (GPU kernel time on CUDA, CPU time
on CPU) over ``--iters`` forwards after warm-up. "other" is the forward's total minus the labelled
regions (norms, residual adds, the proportional-attention mask, patch embedding, head). Use it when
a method's measured speed-up falls short of its GMACs ratio: the table says which part did not shrink.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

from harness.sweep import budget as budgets  # noqa: E402
from harness.measurement import measure
from harness import seam
from harness.sweep.cell import CellSettings, prepare_cell  # noqa: E402
from harness.sweep.config import ModelConfig  # noqa: E402
from harness.loading.models import load_checkpoint, resolve_model  # noqa: E402
from harness.registry import make_method  # noqa: E402

REGIONS = ("attention", "sdpa", "mlp", "reduce")
SDPA_OP = "aten::scaled_dot_product_attention"
# random weights learn nothing in a search: DiffRate runs the authors' published per-block counts
OPTIONS = {"diffrate": {"schedules": "published"}}


def _labelled(fn, name: str):
    def run(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return run


def label_regions(model) -> None:
    """Wrap each block's attention, MLP and seam reducer in a profiler label."""
    for blk in model.blocks:
        blk.attn.forward = _labelled(blk.attn.forward, "attention")
        blk.mlp.forward = _labelled(blk.mlp.forward, "mlp")
    seam.wrap_attention(model, lambda branch: _labelled(branch, "attention"))  # blocks the seam composes
    seam.wrap_reducers(model, lambda _, reducer: _labelled(reducer, "reduce"))


def _time_of(event, cuda: bool) -> float:
    if cuda:
        return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
    return event.cpu_time_total


def _self_time(event, cuda: bool) -> float:
    if cuda:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return event.self_cpu_time_total


@torch.inference_mode()
def profile_regions(model, x: torch.Tensor, device: torch.device, dtype: str, iters: int, warmup: int) -> dict:
    """Milliseconds per forward in each region (and ``total``) of ``model`` on batch ``x``."""
    cuda = device.type == "cuda"
    with measure.autocast(device, dtype):
        for _ in range(warmup):
            model(x)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(iters):
                with record_function("forward"):
                    model(x)
            if cuda:
                torch.cuda.synchronize()
    events = {e.key: e for e in prof.key_averages()}
    if cuda:  # every kernel's own time, once
        total = sum(_self_time(e, True) for e in events.values())
    else:
        total = _time_of(events["forward"], False)
    out = {name: _time_of(events[key], cuda) / 1000 / iters if key in events else 0.0
           for name, key in (("attention", "attention"), ("sdpa", SDPA_OP), ("mlp", "mlp"), ("reduce", "reduce"))}
    out["total"] = total / 1000 / iters
    out["other"] = out["total"] - out["attention"] - out["mlp"] - out["reduce"]
    return out


def markdown(results: dict, clock: str) -> str:
    names = list(results)
    lines = [f"| region ({clock}, ms per forward) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for region in ("attention", "sdpa", "mlp", "reduce", "other", "total"):
        cells = []
        for n in names:
            r = results[n]
            share = f" ({100 * r[region] / r['total']:.0f} %)" if r["total"] and region != "total" else ""
            cells.append(f"{r[region]:.3f}{share}")
        label = "  of which SDPA" if region == "sdpa" else region
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    gm = " | ".join(f"{results[n]['gmacs']:.3f}" for n in names)
    lines.append(f"| analytic GMACs | {gm} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="timm name (random weights)")
    p.add_argument("--methods", default="none,tome",
                   help="comma list; NAME:IMPL runs a method with proportional attention as mask, fold or flex "
                        "(tome:fold), all in this one process")
    p.add_argument("--budget", default="r=13", help="as the harness: 0.7, gmacs=2.9, r=13, keep_rate=0.7")
    p.add_argument("--batch", type=int, default=0, help="0: 256 on GPU, 8 on CPU")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--attention", choices=["fused", "eager"], default="fused")
    p.add_argument("--sdpa-backend", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = p.parse_args(argv)

    device = measure.resolve_device(args.device)
    dtype = measure.resolve_dtype(args.dtype, device)
    batch = args.batch or (256 if device.type == "cuda" else 8)
    spec = resolve_model(args.model, {args.model: ModelConfig(timm=args.model, weights="random", data="synthetic")}, None)
    state = load_checkpoint(spec)  # the seeded random weights, built once and copied per method
    budget = budgets.parse_budget(args.budget)
    results = {}
    for entry in [m.strip() for m in args.methods.split(",") if m.strip()]:
        name, _, impl = entry.partition(":")
        method = make_method(name, OPTIONS)
        settings = CellSettings(device, dtype, args.attention, impl or "mask", args.sdpa_backend)
        cell = prepare_cell(spec, method, budget, settings, state_dict=state)
        label_regions(cell.model)
        size = cell.transform.img_size
        x = torch.randn(batch, 3, size, size, device=device)
        with settings.kernels():
            r = profile_regions(cell.model, x, device, dtype, args.iters, args.warmup)
        r["gmacs"] = cell.gmacs
        value = cell.knob_value
        key = (name if value is None else f"{name} {method.knob.name}={value:g}") + (f" ({impl})" if impl else "")
        results[key] = r
    clock = "GPU kernel time" if device.type == "cuda" else "CPU time"
    title = (f"{args.model}, batch {batch}, {dtype}, {args.attention} attention, sdpa {args.sdpa_backend}, "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    text = f"{title}\n\n{markdown(results, clock)}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
