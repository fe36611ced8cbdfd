"""Tables from stored records only: Markdown, CSV and LaTeX under ``reports/``. No model runs here.

Layout written by :func:`build_report` (``reports_dir``):

- ``results.md``: every table below, in Markdown (tabulate), with failures listed per model;
- ``results.csv``: the stored records themselves, one tidy row per cell;
- ``tables/<env>.csv`` / ``.tex``: per model (environment), budgets x methods with top-1, its
  change against ``none``, GMACs, ideal and measured speed-up; ``best`` marks the top top-1 of a budget;
- ``summary.csv`` / ``.tex``: top-1 (change) of every method across models at matched budgets;
- ``accuracy_at_gmacs.csv`` / ``.tex``: paper-style rows, each method's top-1 read off its
  accuracy-vs-GMACs curve at each budget's GMACs target (linear interpolation, no extrapolation).

Records are compared only within one environment (model, data, limit, device, dtype): throughput
from another GPU or dtype is never a baseline.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path
from typing import Optional

from harness.errors import HarnessError
from harness.store import ResultStore

log = logging.getLogger(__name__)

# Records are compared only within one environment: same model, data, device, dtype and limit, and
# the same attention kernel and compile setting (a speed-up is measured on one kernel for all methods).
GROUP = ["model", "data", "limit", "device_name", "dtype", "attention", "sdpa_backend", "compile"]
# the kernel settings of GROUP and the value records written before them had
KERNEL = {"attention": "fused", "sdpa_backend": "auto", "compile": False}
BASELINE = "none"
# how far (relative GMACs) beyond a method's measured range "accuracy at x GMACs" may extend
REACH = 0.02
COLUMNS = ["model", "data", "limit", "device_name", "dtype", "method", "budget", "knob", "knob_value", "status",
           "error", "top1", "top5", "img_per_s", "gmacs", "gmacs_ratio", "gmacs_baseline", "gmacs_target",
           "n_images", "throughput_batch_size", "tokens_per_block", "gmacs_measured", "gmacs_overhead", "img_per_s_iqr",
           "latency_ms", "peak_mem_mb", "e2e_img_per_s"]
# Table columns: (key, Markdown/CSV header, LaTeX header, format)
TABLE = [("budget", "budget", "Budget", None), ("method", "method", "Method", None), ("knob", "knob", "Knob", None),
         ("gmacs", "GMACs", "GMACs", "{:.3f}"), ("top1", "top-1 %", r"Top-1 (\%)", "{:.2f}"),
         ("d_top1", "Δ top-1", r"$\Delta$", "{:+.2f}"), ("img_per_s", "img/s", "img/s", "{:.1f}"),
         ("speedup", "speed-up", "Speed-up", "{:.2f}x"), ("ideal_speedup", "ideal", "Ideal", "{:.2f}x"),
         ("realised", "realised", "Realised", "{:.2f}"), ("gmacs_measured", "GMACs (fvcore)", "GMACs (fvcore)", "{:.3f}")]
# The table of an environment without accuracy (the speed suite): speed, its spread, latency and memory.
SPEED_TABLE = [TABLE[0], TABLE[1], TABLE[2], TABLE[3], TABLE[10],
               ("gmacs_overhead", "overhead GMACs", "Overhead", "{:.4f}"), TABLE[6],
               ("iqr_pct", "IQR %", r"IQR (\%)", "{:.1f}"), TABLE[7], TABLE[8], TABLE[9],
               ("latency_ms", "latency ms (b=1)", "Latency (ms)", "{:.2f}"), ("peak_mem_mb", "peak MiB", "Peak MiB", "{:.0f}"),
               ("e2e_img_per_s", "e2e img/s", "E2E img/s", "{:.1f}")]


def load_frame(results_dir: Path):
    """All stored records as a pandas DataFrame (one row per cell), with every column the report reads."""
    import pandas as pd

    store = ResultStore(results_dir)
    if not store.records_dir.is_dir():
        raise HarnessError(f"no results found: {store.records_dir} does not exist (run `python -m harness run` first)")
    records = store.load_all()
    if not records:
        raise HarnessError(f"no results found in {store.records_dir}")
    df = pd.DataFrame.from_records(records)
    for col in COLUMNS:
        if col not in df:
            df[col] = None
    for col, default in KERNEL.items():
        df[col] = df[col].map(lambda v, d=default: d if v is None or v != v else v) if col in df else default
    return df


def _num(v) -> Optional[float]:
    """A finite float, or None (NaN, None and text all count as missing)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def budget_order(text: str) -> tuple:
    """Sort key: baseline first, then fractions and GMACs targets from the largest, then knobs."""
    text = str(text)
    if text == "baseline":
        return (0, 0.0, "")
    key, sep, raw = text.partition("=")
    value = _num(raw if sep else text)
    kind = 1 if not sep else 2 if key == "gmacs" else 3
    return (kind, -(value or 0.0), key)


def _knob_text(row) -> str:
    v = _num(row.get("knob_value"))
    if row.get("knob") is None or v is None:
        return "-"
    return f"{row['knob']}={int(v) if v.is_integer() else round(v, 4)}"


def environments(df) -> list[tuple[dict, object]]:
    """(environment, its records) pairs, sorted; each environment is a dict of GROUP plus a ``label``.

    The label is the model's name, followed by what tells its environments apart when one model was
    run in several (``deit_tiny_cifar10 (cpu, fp32)``); ``slug`` is a file-name-safe form.
    """
    envs = [(dict(zip(GROUP, key)), group) for key, group in df.groupby(GROUP, dropna=False, sort=True)]
    for env, _ in envs:
        env["device_short"] = str(env["device_name"]).split(" (")[0].replace("NVIDIA ", "")
        env["slug"] = env["label"] = env["model"]
    for model in {e["model"] for e, _ in envs}:
        same = [e for e, _ in envs if e["model"] == model]
        if len(same) == 1:
            continue
        parts = [k for k in ("device_short", "dtype", "limit", "data", *KERNEL) if len({str(e[k]) for e in same}) > 1]
        for e in same:
            text = ", ".join(_label_part(k, e[k]) for k in parts)
            e["label"] = f"{model} ({text})"
            e["slug"] = f"{model}-{_env_hash(e)}"
    return envs


def _label_part(key: str, value) -> str:
    if key == "limit":
        return f"limit {value}"
    if key == "attention":
        return f"{value} attention"
    if key == "sdpa_backend":
        return f"sdpa {value}"
    if key == "compile":
        return "compiled" if value else "eager mode"
    return str(value)


def _env_hash(env: dict) -> str:
    return hashlib.sha1(repr([env[k] for k in GROUP]).encode()).hexdigest()[:6]


def baseline_of(group) -> Optional[dict]:
    """The environment's ``none`` record that ended ok, or None."""
    base = group[(group["method"] == BASELINE) & (group["status"] == "ok")]
    return None if base.empty else base.iloc[0].to_dict()


def model_rows(group) -> list[dict]:
    """One environment's ok cells as table rows (raw numbers), baseline first, then by budget and method.

    Each row: budget, method, knob, gmacs, top1 and d_top1 (points against ``none``), img_per_s,
    speedup (measured, img/s over ``none``'s), ideal_speedup (baseline GMACs / GMACs) and ``best``
    (the highest top-1 among the reducing methods of its budget; ties all count).
    """
    base = baseline_of(group) or {}
    base_top1, base_speed = _num(base.get("top1")), _num(base.get("img_per_s"))
    rows = []
    for _, r in group[group["status"] == "ok"].iterrows():
        top1, speed, gmacs = _num(r["top1"]), _num(r["img_per_s"]), _num(r["gmacs"])
        base_gmacs = _num(r["gmacs_baseline"]) or _num(base.get("gmacs"))
        rows.append({
            "budget": str(r["budget"]), "method": r["method"], "knob": _knob_text(r), "gmacs": gmacs,
            "top1": None if top1 is None else 100 * top1,
            "d_top1": None if top1 is None or base_top1 is None else 100 * (top1 - base_top1),
            "img_per_s": speed,
            "speedup": speed / base_speed if speed and base_speed else None,
            "ideal_speedup": base_gmacs / gmacs if base_gmacs and gmacs else None,
            "gmacs_measured": _num(r["gmacs_measured"]), "gmacs_overhead": _num(r["gmacs_overhead"]),
            "iqr_pct": 100 * _num(r["img_per_s_iqr"]) / speed if speed and _num(r["img_per_s_iqr"]) is not None else None,
            "latency_ms": _num(r["latency_ms"]), "peak_mem_mb": _num(r["peak_mem_mb"]),
            "e2e_img_per_s": _num(r["e2e_img_per_s"]),
        })
        # how much of the FLOP saving became measured speed
        last = rows[-1]
        last["realised"] = last["speedup"] / last["ideal_speedup"] if last["speedup"] and last["ideal_speedup"] else None
    rows.sort(key=lambda x: (budget_order(x["budget"]), x["method"] != BASELINE, x["method"]))
    _mark_best(rows)
    return rows


def _mark_best(rows: list[dict]) -> None:
    by_budget: dict[str, list[dict]] = {}
    for r in rows:
        r["best"] = False
        if r["method"] != BASELINE and r["top1"] is not None:
            by_budget.setdefault(r["budget"], []).append(r)
    for cands in by_budget.values():
        if len(cands) > 1:
            top = max(c["top1"] for c in cands)
            for c in cands:
                c["best"] = abs(c["top1"] - top) < 1e-9


def _arrow(delta: Optional[float], fmt: str) -> str:
    # the arrow follows the printed number: -0.001 prints as +0.00 / -0.00 and gets no arrow
    text = fmt.format(delta)
    if float(text) > 0:
        return text + " ↑"
    if float(text) < 0:
        return text.replace("-", "−") + " ↓"
    return text.replace("-", "")


def _cell_text(key: str, value, fmt: Optional[str], best: bool, latex: bool) -> str:
    if value is None:
        return "-" if not latex else "--"
    if key == "d_top1":
        text = _arrow(value, fmt)
        if latex:
            text = text.replace("−", "-").replace(" ↑", r"\,$\uparrow$").replace(" ↓", r"\,$\downarrow$")
            text = text.replace("-", "$-$", 1) if text.startswith("-") else text
        return text
    text = fmt.format(value) if fmt else str(value)
    if latex:
        text = tex_escape(text).replace("x", r"$\times$") if key in ("speedup", "ideal_speedup") else tex_escape(text)
    if key == "top1" and best:
        return rf"\textbf{{{text}}}" if latex else f"**{text}**"
    return text


def tex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    return re.sub(r"([&%$#_{}])", r"\\\1", str(text)).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def markdown_table(rows: list[dict], table: list = TABLE) -> str:
    """A model's rows as a GitHub Markdown table; the best top-1 of each budget in bold."""
    from tabulate import tabulate

    body = [[_cell_text(k, r[k], f, r["best"], False) for k, _, _, f in table] for r in rows]
    return tabulate(body, headers=[h for _, h, _, _ in table], tablefmt="github", disable_numparse=True)


def latex_table(rows: list[dict], caption_note: str = "", table: list = TABLE) -> str:
    """A model's rows as a booktabs ``tabular`` (``\\usepackage{booktabs}``), one rule between budgets."""
    align = "lll" + "r" * (len(table) - 3)
    lines = [f"% {caption_note}".rstrip(), r"% needs \usepackage{booktabs}; best top-1 of each budget in bold",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(t for _, _, t, _ in table) + r" \\", r"\midrule"]
    prev = None
    for r in rows:
        if prev is not None and r["budget"] != prev:
            lines.append(r"\midrule")
        cells = [_cell_text(k, r[k], f, r["best"], True) for k, _, _, f in table]
        if r["budget"] == prev:
            cells[0] = ""
        lines.append(" & ".join(cells) + r" \\")
        prev = r["budget"]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def csv_rows(rows: list[dict], env: dict) -> list[dict]:
    """Rows for CSV: the environment's fields, then the raw numbers rounded (no markers)."""
    digits = {"gmacs": 4, "top1": 2, "d_top1": 2, "img_per_s": 2, "speedup": 3, "ideal_speedup": 3, "realised": 3,
              "gmacs_measured": 4, "gmacs_overhead": 5, "iqr_pct": 2, "latency_ms": 3, "peak_mem_mb": 1, "e2e_img_per_s": 2}
    out = []
    for r in rows:
        row = {k: env[k] for k in GROUP}
        row.update({k: (round(v, digits[k]) if k in digits and v is not None else v) for k, v in r.items()})
        out.append(row)
    return out


def summary(envs: list[tuple[dict, object]]) -> tuple[list[str], list[dict]]:
    """Top-1 and its change for every method across models at matched budgets.

    Returns:
        The column labels (``<model label> @ <budget>``) and one row per method, the ``none`` row
        first with each column's reference top-1: ``{"method": m, "<col>": (top1, d_top1, best), ...}``.
    """
    cols, table = [], {BASELINE: {"method": BASELINE}}
    for env, group in envs:
        rows = model_rows(group)
        base = next((r for r in rows if r["method"] == BASELINE), None)
        for budget in sorted({r["budget"] for r in rows if r["method"] != BASELINE}, key=budget_order):
            col = f"{env['label']} @ {budget}"
            cols.append(col)
            if base is not None:
                table[BASELINE][col] = (base["top1"], None, False)
            for r in rows:
                if r["budget"] == budget:
                    table.setdefault(r["method"], {"method": r["method"]})[col] = (r["top1"], r["d_top1"], r["best"])
    order = sorted(table, key=lambda m: (m != BASELINE, m))
    return cols, [table[m] for m in order]


def _summary_cell(v, latex: bool) -> str:
    if v is None or v[0] is None:
        return "--" if latex else "-"
    top1, delta, best = v
    text = f"{top1:.2f}"
    if latex:
        text = rf"\textbf{{{text}}}" if best else text
        if delta is not None:
            d = _cell_text("d_top1", delta, "{:+.2f}", False, True)
            text += rf" {{\scriptsize({d})}}"
        return text
    text = f"**{text}**" if best else text
    return text if delta is None else f"{text} ({_arrow(delta, '{:+.2f}')})"


def summary_markdown(cols: list[str], rows: list[dict]) -> str:
    from tabulate import tabulate

    body = [[r["method"]] + [_summary_cell(r.get(c), False) for c in cols] for r in rows]
    return tabulate(body, headers=["method"] + cols, tablefmt="github", disable_numparse=True)


def summary_latex(cols: list[str], rows: list[dict]) -> str:
    """The summary as a booktabs tabular: one column group per model, one column per budget."""
    models = list(dict.fromkeys(c.rsplit(" @ ", 1)[0] for c in cols))
    head1, rules, start = ["Method"], [], 2
    for m in models:
        n = sum(1 for c in cols if c.rsplit(" @ ", 1)[0] == m)
        head1.append(rf"\multicolumn{{{n}}}{{c}}{{{tex_escape(m)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + n - 1}}}")
        start += n
    head2 = [""] + [tex_escape(c.rsplit(" @ ", 1)[1]) for c in cols]
    lines = [r"% needs \usepackage{booktabs}; top-1 (%) and its change against none, best of each budget in bold",
             rf"\begin{{tabular}}{{l{'r' * len(cols)}}}", r"\toprule", " & ".join(head1) + r" \\", "".join(rules),
             " & ".join(head2) + r" \\", r"\midrule"]
    for r in rows:
        lines.append(" & ".join([tex_escape(r["method"])] + [_summary_cell(r.get(c), True) for c in cols]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def method_curve(group, method: str) -> list[tuple[float, float]]:
    """(GMACs, top-1 %) points of ``method`` in one environment, anchored at the baseline, by GMACs."""
    ok = group[(group["status"] == "ok") & (group["method"] == method)]
    pts = {(_num(r["gmacs"]), 100 * _num(r["top1"])) for _, r in ok.iterrows()
           if _num(r["gmacs"]) is not None and _num(r["top1"]) is not None}
    base = baseline_of(group)
    if base and _num(base.get("top1")) is not None and method != BASELINE:
        # every method at its identity knob is the unpatched model (a contract test checks it)
        pts.add((_num(base["gmacs"]), 100 * _num(base["top1"])))
    return sorted(pts)


def accuracy_at(curve: list[tuple[float, float]], gmacs: float) -> Optional[float]:
    """Top-1 at ``gmacs`` by linear interpolation along ``curve``; None outside its range.

    A target up to ``REACH`` (relative) beyond an end extends the end segment: a solved knob lands
    near, not on, its target (integer knobs, rounding), and that small gap should not leave a hole.
    """
    if not curve or not curve[0][0] * (1 - REACH) <= gmacs <= curve[-1][0] * (1 + REACH):
        return None
    if len(curve) == 1:
        return curve[0][1]
    segments = list(zip(curve, curve[1:]))
    (x0, y0), (x1, y1) = next((s for s in segments if s[0][0] <= gmacs <= s[1][0]),
                              segments[0] if gmacs < curve[0][0] else segments[-1])
    return y0 if x1 == x0 else y0 + (y1 - y0) * (gmacs - x0) / (x1 - x0)


def accuracy_at_gmacs(envs: list[tuple[dict, object]]) -> tuple[list[str], list[dict]]:
    """Paper-style rows: per model and GMACs target (the budgets' targets), each method's top-1 there.

    Returns:
        The method columns and rows ``{"model", "gmacs", "baseline_top1", "baseline_gmacs", <method>: top1}``.
    """
    methods = sorted({m for _, g in envs for m in g.loc[g["status"] == "ok", "method"] if m != BASELINE})
    rows = []
    for env, group in envs:
        base = baseline_of(group) or {}
        targets = sorted({round(t, 3) for t in map(_num, group["gmacs_target"]) if t is not None}, reverse=True)
        curves = {m: method_curve(group, m) for m in methods}
        for t in targets:
            row = {"model": env["label"], "gmacs": t, "baseline_top1": None, "baseline_gmacs": _num(base.get("gmacs"))}
            if _num(base.get("top1")) is not None:
                row["baseline_top1"] = 100 * _num(base["top1"])
            row.update({m: accuracy_at(curves[m], t) for m in methods})
            rows.append(row)
    return methods, rows


def _best_of(row: dict, methods: list[str]) -> Optional[float]:
    vals = [row[m] for m in methods if row.get(m) is not None]
    return max(vals) if len(vals) > 1 else None


def at_gmacs_markdown(methods: list[str], rows: list[dict]) -> str:
    from tabulate import tabulate

    body = []
    for r in rows:
        top = _best_of(r, methods)
        cells = [("-" if r[m] is None else f"**{r[m]:.2f}**" if r[m] == top else f"{r[m]:.2f}") for m in methods]
        base = "-" if r["baseline_top1"] is None else f"{r['baseline_top1']:.2f} @ {r['baseline_gmacs']:.2f}"
        body.append([r["model"], f"{r['gmacs']:.2f}", base] + cells)
    return tabulate(body, headers=["model", "GMACs", "none (top-1 @ GMACs)"] + methods, tablefmt="github",
                    disable_numparse=True)


def at_gmacs_latex(methods: list[str], rows: list[dict]) -> str:
    lines = [r"% needs \usepackage{booktabs}; top-1 (%) interpolated at each GMACs target, best in bold",
             rf"\begin{{tabular}}{{lr{'r' * len(methods)}}}", r"\toprule",
             " & ".join(["Model", "GMACs"] + [tex_escape(m) for m in methods]) + r" \\", r"\midrule"]
    prev = None
    for r in rows:
        if prev is not None and r["model"] != prev:
            lines.append(r"\midrule")
        top = _best_of(r, methods)
        cells = [("--" if r[m] is None else rf"\textbf{{{r[m]:.2f}}}" if r[m] == top else f"{r[m]:.2f}") for m in methods]
        label = tex_escape(r["model"]) if r["model"] != prev else ""
        lines.append(" & ".join([label, f"{r['gmacs']:.2f}"] + cells) + r" \\")
        prev = r["model"]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def kernel_setting(row) -> str:
    """A record's kernel settings as one label: ``fused``, ``eager``, ``fused/sdpa=efficient``, ``fused+compile``."""
    text = str(row["attention"]) + (f"/sdpa={row['sdpa_backend']}" if row["sdpa_backend"] != "auto" else "")
    return text + ("+compile" if row["compile"] else "")


def kernel_comparison(df) -> tuple[list[str], list[dict]]:
    """img/s of the same cell under each attention kernel / compile setting stored.

    Returns the settings (the default ``fused`` first) and one row per model, device, dtype, method
    and budget that ran under more than one; each row maps a setting to its img/s, and ``vs_<s>`` to
    the ratio of the default's img/s over it (above 1: the default is faster).
    """
    ok = df[(df["status"] == "ok") & df["img_per_s"].map(_num).notna()].copy()
    if ok.empty:
        return [], []
    ok["setting"] = ok.apply(kernel_setting, axis=1)
    settings = sorted(ok["setting"].unique(), key=lambda t: (t != "fused", t))
    if len(settings) < 2:
        return settings, []
    rows = []
    keys = ["model", "data", "limit", "device_name", "dtype", "method", "budget"]
    for key, group in ok.groupby(keys, dropna=False, sort=True):
        speeds = {r["setting"]: _num(r["img_per_s"]) for _, r in group.iterrows()}
        if len(speeds) < 2:
            continue
        row = dict(zip(keys, key), **speeds)
        base = speeds.get(settings[0])
        for s in settings[1:]:
            row[f"vs_{s}"] = base / speeds[s] if base and speeds.get(s) else None
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], str(r["device_name"]), r["dtype"], budget_order(r["budget"]), r["method"] != BASELINE, r["method"]))
    return settings, rows


def kernel_markdown(settings: list[str], rows: list[dict]) -> str:
    from tabulate import tabulate

    head = ["model", "device", "dtype", "method", "budget"] + [f"{s} img/s" for s in settings] + \
        [f"{settings[0]} / {s}" for s in settings[1:]]
    body = [[r["model"], str(r["device_name"]).split(" (")[0], r["dtype"], r["method"], r["budget"]]
            + [_fmt(r.get(s), "{:.1f}") for s in settings] + [_fmt(r.get(f"vs_{s}"), "{:.2f}x") for s in settings[1:]]
            for r in rows]
    return tabulate(body, headers=head, tablefmt="github")


def _fmt(v, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def _failures(group) -> list[str]:
    bad = group[group["status"] != "ok"]
    return [f"- {r['method']} @ {r['budget']}: {r['status']}: {r.get('error')}" for _, r in bad.iterrows()]


def _env_line(env: dict, group) -> str:
    n = group["n_images"].map(_num).dropna()
    tb = group["throughput_batch_size"].map(_num).dropna()
    return (f"data `{env['data']}`, {int(n.max()) if len(n) else 'no'} images, {env['device_name']}, {env['dtype']}, "
            f"throughput batch {int(tb.max()) if len(tb) else '-'}")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build_report(results_dir: Path, reports_dir: Path) -> str:
    """Write every table (see the module docstring) under ``reports_dir``; return the Markdown."""
    import pandas as pd

    df = load_frame(results_dir)
    reports_dir = Path(reports_dir)
    envs = environments(df)
    parts = ["# Results", "", f"From {len(df)} stored records in `{results_dir}`. "
             "GMACs: analytic multiply-accumulates (the papers' convention). Δ top-1: change against `none`, in "
             "points (↑ better, ↓ worse). speed-up: measured img/s over `none`'s in the same environment; "
             "ideal: `none`'s GMACs over the method's. **Bold**: best top-1 of a budget.", ""]
    scored = {id(g) for _, g in scored_envs(envs)}
    for env, group in envs:
        rows = model_rows(group)
        table = TABLE if id(group) in scored else SPEED_TABLE
        parts += [f"## {env['label']}", "", _env_line(env, group), ""]
        parts += [markdown_table(rows, table) if rows else "(no successful cells)", ""]
        parts += _failures(group) + [""]
        _write(reports_dir / "tables" / f"{env['slug']}.csv", pd.DataFrame(csv_rows(rows, env)).to_csv(index=False))
        _write(reports_dir / "tables" / f"{env['slug']}.tex", latex_table(rows, f"{env['label']}: {_env_line(env, group)}", table))
    parts += _summary_parts(envs, reports_dir)
    settings, krows = kernel_comparison(df)
    if krows:
        parts += ["## Attention kernels", "", "Model-only img/s of the same cell under each attention kernel and "
                  "compile setting stored; the last columns: the default (fused SDPA) over the others.", "",
                  kernel_markdown(settings, krows), ""]
        pd.DataFrame(krows).round(3).to_csv(reports_dir / "kernels.csv", index=False)
    text = "\n".join(parts)
    _write(reports_dir / "results.md", text)
    df.drop(columns=[c for c in ("traceback",) if c in df]).to_csv(reports_dir / "results.csv", index=False)
    log.info("report written to %s", reports_dir)
    return text


def scored_envs(envs: list[tuple[dict, object]]) -> list[tuple[dict, object]]:
    """The environments with an accuracy figure (synthetic speed-only data has none)."""
    return [(e, g) for e, g in envs if g["top1"].map(_num).notna().any()]


def _summary_parts(envs, reports_dir: Path) -> list[str]:
    import pandas as pd

    envs = scored_envs(envs)

    cols, rows = summary(envs)
    tidy = [{"column": c, "method": r["method"], "top1": v[0], "d_top1": v[1], "best": v[2]}
            for r in rows for c in cols for v in [r.get(c)] if v is not None]
    pd.DataFrame(tidy, columns=["column", "method", "top1", "d_top1", "best"]).round(2).to_csv(
        reports_dir / "summary.csv", index=False)
    _write(reports_dir / "summary.tex", summary_latex(cols, rows))
    methods, at_rows = accuracy_at_gmacs(envs)
    pd.DataFrame(at_rows).round(3).to_csv(reports_dir / "accuracy_at_gmacs.csv", index=False)
    _write(reports_dir / "accuracy_at_gmacs.tex", at_gmacs_latex(methods, at_rows))
    if not envs:
        return []
    out = ["## Summary across models at matched budgets", "", "top-1 % (Δ against `none`, whose top-1 is the first row)", "",
           summary_markdown(cols, rows), ""]
    if at_rows:
        out += ["## Accuracy at equal GMACs", "", "Each method's top-1 read off its accuracy-vs-GMACs curve "
                "(its cells and the baseline, linear interpolation, at most 2 % beyond its ends) at each budget's target.",
                "", at_gmacs_markdown(methods, at_rows), ""]
    return out
