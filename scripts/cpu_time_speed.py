"""Speed-up of every method against the unpatched model by CPU time, for a CPU shared with other jobs.

    python scripts/cpu_time_speed.py --model deit_small_patch16_224 --budget gmacs=2.3 --dtype fp32 --rounds 5

The harness's speed path (``python -m harness run --suite cpu-speed``) times wall clock with every
core; on a machine that other jobs load, wall time measures them. This script runs one thread and
reads the process's own CPU time (``time.process_time``) around each forward, each method
interleaved with the unpatched model in one process (order alternating by round), random weights,
a synthetic batch. It prints a Markdown table: GMACs, ideal speed-up (GMACs ratio), measured
speed-up (median of the per-round ratios, interquartile range) and realised = measured / ideal.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.sweep import budget as budgets  # noqa: E402
from harness.measurement import measure
from harness.sweep.cell import CellSettings, prepare_cell  # noqa: E402
from harness.sweep.config import ModelConfig  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.loading.models import load_checkpoint, resolve_model  # noqa: E402
from harness.registry import make_method, method_names  # noqa: E402

# random weights learn nothing in a search: DiffRate runs the authors' published per-block counts
OPTIONS = {"diffrate": {"schedules": "published"}}


def _seconds(model, x: torch.Tensor) -> float:
    start = time.process_time()
    model(x)
    return time.process_time() - start


def interleaved(base, cells: dict, x: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    """Per method, unpatched seconds / method seconds of each round."""
    ratios: dict[str, list[float]] = {name: [] for name in cells}
    for r in range(rounds):
        for name, cell in cells.items():
            if r % 2:
                t_method, t_base = _seconds(cell.model, x), _seconds(base.model, x)
            else:
                t_base, t_method = _seconds(base.model, x), _seconds(cell.model, x)
            ratios[name].append(t_base / t_method)
    return ratios


def table(base, cells: dict, ratios: dict) -> str:
    lines = ["| method | GMACs | ideal | speed-up (median, IQR) | realised |", "|---|---|---|---|---|"]
    for name, cell in cells.items():
        q1, median, q3 = statistics.quantiles(ratios[name], n=4) if len(ratios[name]) > 1 else ratios[name] * 3
        median, ideal = statistics.median(ratios[name]), base.gmacs / cell.gmacs
        lines.append(f"| {name} | {cell.gmacs:.3f} | {ideal:.2f}x | {median:.2f}x ({q1:.2f}-{q3:.2f}) | {median / ideal:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="timm name (random weights)")
    p.add_argument("--methods", default="all", help="comma list, or all (every registered method but none)")
    p.add_argument("--budget", default="gmacs=2.3", help="as the harness: 0.5, gmacs=2.3, r=16")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    try:
        return run(args)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    spec = resolve_model(args.model, {args.model: ModelConfig(timm=args.model, weights="random", data="synthetic")}, None)
    state = load_checkpoint(spec)
    settings = CellSettings(torch.device("cpu"), args.dtype, "fused", "mask", "auto")
    names = [n for n in method_names() if n != "none"] if args.methods == "all" else args.methods.split(",")
    budget = budgets.parse_budget(args.budget)
    base = prepare_cell(spec, make_method("none"), None, settings, state_dict=state)
    cells = {n: prepare_cell(spec, make_method(n, OPTIONS), budget, settings, state_dict=state) for n in names}
    x = torch.randn(args.batch, 3, 224, 224)
    with measure.autocast(torch.device("cpu"), args.dtype):
        interleaved(base, cells, x, 1)  # warm-up
        ratios = interleaved(base, cells, x, args.rounds)
    print(f"{args.model}, random weights, batch {args.batch}, {args.dtype}, {args.budget}, 1 thread, CPU time, "
          f"{args.rounds} interleaved rounds, torch {torch.__version__}\n")
    print(table(base, cells, ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
