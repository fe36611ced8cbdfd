"""Speed-up of every method against the unpatched model by CPU time and wall time, for a shared CPU.

    OMP_NUM_THREADS=1 python scripts/cpu_time_speed.py --dtype fp32,bf16 --processes 2 --rounds 5
    OMP_NUM_THREADS=1 python scripts/cpu_time_speed.py --dtype fp32 --compile --rounds 5
    OMP_NUM_THREADS=1 python scripts/cpu_time_speed.py --batch 1 --rounds 20

The harness's speed path (``python -m harness run --suite cpu-speed``) times wall clock with every
core; on a machine that other jobs load, wall time measures them. This script runs one thread and
reads both the process's own CPU time (``time.process_time``) and wall time around each forward,
each method interleaved with the unpatched model in one process (order alternating by round),
random weights, a synthetic batch. ``--processes N`` repeats the whole measurement in N fresh
processes per dtype (each its own model build, warm-up and allocator state) and reports each
process apart, so the spread between processes is visible. ``--compile`` times every model under
``torch.compile(fullgraph=True)`` against the compiled unpatched model; ``--batch 1`` gives the
batch-1 latency (the ms columns).

It prints one Markdown table per dtype: GMACs, ideal speed-up (GMACs ratio), the unpatched and the
method's forward (median CPU ms), the measured speed-up by CPU time and by wall time (median of the
per-round ratios, interquartile range) and realised = measured / ideal, per process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
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
CLOCKS = ("cpu", "wall")


def _seconds(model, x: torch.Tensor) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    model(x)
    return {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}


def interleaved(base, models: dict, x: torch.Tensor, rounds: int) -> list[dict]:
    """One row per round and method: the unpatched and the method's forward seconds by each clock."""
    rows = []
    for r in range(rounds):
        for name, model in models.items():
            if r % 2:
                t_method, t_base = _seconds(model, x), _seconds(base, x)
            else:
                t_base, t_method = _seconds(base, x), _seconds(model, x)
            rows.append({"method": name, "round": r, **{f"base_{c}_s": t_base[c] for c in CLOCKS},
                         **{f"method_{c}_s": t_method[c] for c in CLOCKS}})
    return rows


def _compiled(model, name: str, x: torch.Tensor, log: dict):
    """``model`` under ``torch.compile(fullgraph=True)``, compiled now (its first call), compile seconds in ``log``.

    ``dynamic=False``: the models of one process share timm's forward code, so dynamo would turn a
    knob that differs between them (PiToMe's ratio) into a symbolic float on a recompile; each
    model gets its own static graph, as it would alone.
    """
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    compiled(x)
    log[name] = round(time.perf_counter() - start, 1)
    return compiled


def measure_once(args) -> dict:
    """Build, warm up and time every method against the unpatched model in this process."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    torch._dynamo.config.cache_size_limit = 256  # every patched model is its own graph: no eager fallback
    torch._dynamo.config.accumulated_cache_size_limit = 4096
    spec = resolve_model(args.model, {args.model: ModelConfig(timm=args.model, weights="random", data="synthetic")}, None)
    state = load_checkpoint(spec)
    settings = CellSettings(torch.device("cpu"), args.dtype, "fused", "mask", "auto")
    budget = budgets.parse_budget(args.budget)
    base = prepare_cell(spec, make_method("none"), None, settings, state_dict=state)
    cells = {n: prepare_cell(spec, make_method(n, OPTIONS), budget, settings, state_dict=state) for n in _names(args)}
    skipped = {n: c.resolved.skip_reason for n, c in cells.items() if c.model is None}  # an unreachable budget
    cells = {n: c for n, c in cells.items() if c.model is not None}
    x, compile_s = torch.randn(args.batch, 3, 224, 224), {}
    with measure.autocast(torch.device("cpu"), args.dtype):
        models = {n: c.model for n, c in cells.items()}
        base_model = base.model
        if args.compile:
            base_model = _compiled(base_model, "none", x, compile_s)
            models = {n: _compiled(m, n, x, compile_s) for n, m in models.items()}
        interleaved(base_model, models, x, 1)  # warm-up
        rows = interleaved(base_model, models, x, args.rounds)
    return {"dtype": args.dtype, "batch": args.batch, "compile": args.compile, "rounds": args.rounds,
            "torch": torch.__version__, "base_gmacs": base.gmacs, "compile_s": compile_s,
            "gmacs": {n: c.gmacs for n, c in cells.items()}, "skipped": skipped, "rows": rows}


def _names(args) -> list[str]:
    return [n for n in method_names() if n != "none"] if args.methods == "all" else args.methods.split(",")


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q1, statistics.median(values), q3


def _speedup(rows: list[dict], clock: str) -> tuple[float, float, float]:
    return _quartiles([r[f"base_{clock}_s"] / r[f"method_{clock}_s"] for r in rows])


def _cell(runs: list[dict], name: str) -> list[str]:
    """The table cells of method ``name`` over every process's run (one value per process, `` / ``)."""
    ideal = runs[0]["base_gmacs"] / runs[0]["gmacs"][name]
    per_run = [[r for r in run["rows"] if r["method"] == name] for run in runs]

    def joined(fmt) -> str:
        return " / ".join(fmt(rows) for rows in per_run)

    def ms(key):
        return lambda rows: f"{1000 * statistics.median(r[key] for r in rows):.1f}"

    def speed(clock):
        return lambda rows: "{1:.2f}x ({0:.2f}-{2:.2f})".format(*_speedup(rows, clock))

    def realised(clock):
        return lambda rows: f"{_speedup(rows, clock)[1] / ideal:.2f}"

    return [name, f"{runs[0]['gmacs'][name]:.3f}", f"{ideal:.2f}x", joined(ms("base_cpu_s")), joined(ms("method_cpu_s")),
            joined(speed("cpu")), joined(realised("cpu")), joined(speed("wall")), joined(realised("wall"))]


def table(runs: list[dict]) -> str:
    """A Markdown table of one dtype's runs (one process each)."""
    head = ["method", "GMACs", "ideal", "unpatched ms (CPU)", "method ms (CPU)", "CPU-time speed-up (IQR)",
            "realised (CPU)", "wall speed-up (IQR)", "realised (wall)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(runs, name)) + " |" for name in runs[0]["gmacs"]]
    return "\n".join(lines)


def header(args, runs: list[dict]) -> str:
    how = "torch.compile(fullgraph=True), both models" if args.compile else "eager"
    text = (f"{args.model}, random weights, batch {args.batch}, {runs[0]['dtype']}, {args.budget}, {how}, 1 thread, "
            f"{args.rounds} interleaved rounds, {len(runs)} fresh process(es) (values per process, ' / '), "
            f"torch {runs[0]['torch']}")
    if args.compile:
        text += "\ncompile seconds (wall, first call): " + "; ".join(
            ", ".join(f"{n} {s}" for n, s in run["compile_s"].items()) for run in runs)
    for name, why in runs[0]["skipped"].items():
        text += f"\nskipped {name}: {why}"
    return text


def in_fresh_processes(args, dtype: str) -> list[dict]:
    """``args.processes`` runs of this script for ``dtype``, each in its own Python process."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            out = Path(tmp) / f"run{k}.json"
            cmd = [sys.executable, __file__, "--model", args.model, "--methods", args.methods, "--budget", args.budget,
                   "--dtype", dtype, "--batch", str(args.batch), "--rounds", str(args.rounds), "--json", str(out)]
            subprocess.run(cmd + (["--compile"] if args.compile else []), check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224", help="timm name (random weights)")
    p.add_argument("--methods", default="all", help="comma list, or all (every registered method but none)")
    p.add_argument("--budget", default="gmacs=2.3", help="as the harness: 0.5, gmacs=2.3, r=16")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or both (fp32,bf16)")
    p.add_argument("--batch", type=int, default=8, help="1: batch-1 latency")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="time both models under torch.compile(fullgraph=True)")
    p.add_argument("--processes", type=int, default=1, help="fresh processes per dtype")
    p.add_argument("--json", type=Path, help="(one dtype, one process) write the raw timings here, print nothing")
    args = p.parse_args(argv)
    try:
        return run(args)
    except (HarnessError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as exc:
        print(f"error: a measuring process failed (exit {exc.returncode}); its message is above", file=sys.stderr)
        return 1


def run(args) -> int:
    dtypes = args.dtype.split(",")
    bad = [d for d in dtypes if d not in ("fp32", "bf16")]
    if bad or args.processes < 1 or args.rounds < 1:
        raise ValueError(f"--dtype takes fp32 and bf16, --processes and --rounds at least 1 (got {args.dtype}, "
                         f"{args.processes}, {args.rounds})")
    if args.json:
        args.dtype = dtypes[0]
        args.json.write_text(json.dumps(measure_once(args)))
        return 0
    for dtype in dtypes:
        runs = in_fresh_processes(args, dtype) if args.processes > 1 else [measure_once(_with_dtype(args, dtype))]
        print(header(args, runs) + "\n\n" + table(runs) + "\n")
    return 0


def _with_dtype(args, dtype: str):
    return argparse.Namespace(**{**vars(args), "dtype": dtype})


if __name__ == "__main__":
    sys.exit(main())
