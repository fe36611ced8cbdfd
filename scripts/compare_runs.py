"""Repeatability: the same cells stored by separate runs, their medians side by side.

    python scripts/compare_runs.py results/gpu-repeat/run1 results/gpu-repeat/run2 ...

Prints a Markdown table: for each cell (by id) stored in two or more of the folders, each run's
median img/s, its interleaved speed-up over `none` and realised (speed-up over the ideal GMACs ratio)
when stored, and batch-1 latency; the spread of each, (max - min) / median of the runs' medians,
in percent.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.sweep.store import ResultStore  # noqa: E402


def spread_pct(values: list[float]) -> float:
    return 100 * (max(values) - min(values)) / statistics.median(values)


def compare(folders: list[Path]) -> str:
    runs = [{r["cell_id"]: r for r in ResultStore(f).load_all() if r.get("status") == "ok"} for f in folders]
    ids = sorted({cid for run in runs for cid in run if sum(cid in r for r in runs) > 1})
    lines = ["| model | method | budget | device | img/s per run | spread | speed-up per run | realised per run "
             "(median) | spread | latency ms per run | spread |", "|---" * 11 + "|"]
    for cid in ids:
        recs = [run[cid] for run in runs if cid in run]
        first = recs[0]
        speeds = [r["img_per_s"] for r in recs]
        lat = [r["latency_ms"] for r in recs if r.get("latency_ms") is not None]
        ups = [r["speedup_median"] for r in recs if r.get("speedup_median") is not None]
        ideal = [r["gmacs_baseline"] / r["gmacs"] for r in recs if r.get("speedup_median") is not None]
        real = [u / i for u, i in zip(ups, ideal)]
        up_text = (f"{', '.join(f'{v:.2f}x' for v in ups)} | {', '.join(f'{v:.2f}' for v in real)} "
                   f"({statistics.median(real):.2f}) | {spread_pct(ups):.1f} %") if ups else "- | - | -"
        lines.append(f"| {first['model']} | {first['method']} | {first['budget']} | {first['device_name']} | "
                     f"{', '.join(f'{v:.1f}' for v in speeds)} | {spread_pct(speeds):.1f} % | {up_text} | "
                     f"{', '.join(f'{v:.3f}' for v in lat) or '-'} | {f'{spread_pct(lat):.1f} %' if len(lat) > 1 else '-'} |")
    if not ids:
        return "no cell is stored in more than one of the folders"
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python scripts/compare_runs.py RESULTS_DIR RESULTS_DIR [...]")
    print(compare([Path(a) for a in sys.argv[1:]]))
