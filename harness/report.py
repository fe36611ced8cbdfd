"""Tables from stored records only: Markdown (tabulate) and CSV under ``reports/``. No model runs here."""
from __future__ import annotations

import logging
from pathlib import Path

from harness.errors import HarnessError
from harness.store import ResultStore

log = logging.getLogger(__name__)

# Records are compared only within one environment: same model, data, device, dtype and limit.
GROUP = ["model", "data", "limit", "device_name", "dtype"]


def load_frame(results_dir: Path):
    """All stored records as a pandas DataFrame (one row per cell)."""
    import pandas as pd

    store = ResultStore(results_dir)
    if not store.records_dir.is_dir():
        raise HarnessError(f"no results found: {store.records_dir} does not exist (run `python -m harness run` first)")
    records = store.load_all()
    if not records:
        raise HarnessError(f"no results found in {store.records_dir}")
    return pd.DataFrame.from_records(records)


def _knob_text(row) -> str:
    if row.get("knob") is None or row.get("knob_value") is None or row["knob_value"] != row["knob_value"]:
        return "-"
    v = row["knob_value"]
    return f"{row['knob']}={int(v) if float(v).is_integer() else round(float(v), 4)}"


def model_table(group):
    """One model's ok cells: accuracy and speed against the baseline (the ``none`` method)."""
    ok = group[group["status"] == "ok"].copy()
    base = ok[ok["method"] == "none"]
    base_top1 = base["top1"].iloc[0] if len(base) and "top1" in base else None
    base_speed = base["img_per_s"].iloc[0] if len(base) else None
    ok["order"] = (ok["method"] != "none").astype(int)
    ok = ok.sort_values(["order", "method", "gmacs"], ascending=[True, True, False])
    rows = []
    for _, r in ok.iterrows():
        top1 = r.get("top1")
        has_top1 = top1 is not None and top1 == top1
        delta = 100 * (top1 - base_top1) if has_top1 and base_top1 is not None and base_top1 == base_top1 else None
        rows.append({
            "method": r["method"], "budget": r["budget"], "knob": _knob_text(r),
            "gmacs": round(r["gmacs"], 3), "gmacs_ratio": round(r["gmacs_ratio"], 3),
            "top1_%": round(100 * top1, 2) if has_top1 else None,
            "d_top1_pts": None if delta is None else round(delta, 2),
            "top5_%": round(100 * r["top5"], 2) if has_top1 else None,
            "img_per_s": round(r["img_per_s"], 1),
            "speedup": round(r["img_per_s"] / base_speed, 2) if base_speed else None,
        })
    return rows


FORMATS = {"gmacs": "{:.3f}", "gmacs_ratio": "{:.3f}", "top1_%": "{:.2f}", "d_top1_pts": "{:+.2f}", "top5_%": "{:.2f}",
           "img_per_s": "{:.1f}", "speedup": "{:.2f}"}


def _markdown(rows: list[dict]) -> str:
    from tabulate import tabulate

    text = [{k: ("-" if v is None else FORMATS[k].format(v) if k in FORMATS else v) for k, v in r.items()} for r in rows]
    return tabulate(text, headers="keys", tablefmt="github", disable_numparse=True, colalign=None)


def _failures(group) -> list[str]:
    bad = group[group["status"] != "ok"]
    return [f"- {r['method']} @ {r['budget']}: {r['status']}: {r.get('error')}" for _, r in bad.iterrows()]


def build_report(results_dir: Path, reports_dir: Path) -> str:
    """Write ``results.md`` and ``results.csv`` under ``reports_dir``; return the Markdown."""
    df = load_frame(results_dir)
    for col in GROUP + ["top1", "top5", "img_per_s", "gmacs", "gmacs_ratio", "n_images", "throughput_batch_size"]:
        if col not in df:
            df[col] = None
    parts = ["# Results", "", f"From {len(df)} stored records in `{results_dir}`. "
             "GMACs: analytic, multiply-accumulates (papers' convention). "
             "d_top1_pts: change in top-1 against `none`, in points. speedup: img/s over `none`'s, same environment.", ""]
    for key, group in df.groupby(GROUP, dropna=False, sort=True):
        model, data, limit, device_name, dtype = key
        n = group["n_images"].dropna().max() if "n_images" in group else None
        parts += [f"## {model}", "", f"data `{data}`, {int(n) if n == n and n else 'no'} images, "
                  f"{device_name}, {dtype}, throughput batch {int(group['throughput_batch_size'].dropna().max()) if group['throughput_batch_size'].notna().any() else '-'}", ""]
        rows = model_table(group)
        parts += [_markdown(rows) if rows else "(no successful cells)", ""]
        parts += _failures(group) + [""]
    text = "\n".join(parts)
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "results.md").write_text(text)
    df.drop(columns=[c for c in ("traceback",) if c in df]).to_csv(reports_dir / "results.csv", index=False)
    return text
