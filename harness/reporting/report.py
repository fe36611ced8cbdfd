"""Tables from stored records only: Markdown, CSV and LaTeX under ``reports/``. No model runs here.

Layout written by :func:`build_report` (``reports_dir``):

- ``results.md``: every table below, in Markdown (tabulate), with each model's environment, notes
  (failures, off-target cells, superseded method versions), pairwise tests and every cell not in the
  tables with its reason; ``report.html``: the same as one self-contained page, tables sortable and
  filterable, figures inline (:mod:`harness.reporting.html_report`);
- ``results.csv``: the stored records themselves, one tidy row per cell;
- ``tables/<env>.csv`` / ``.tex``: per model (environment), budgets x methods with top-1 and its 95 %
  Wilson interval, its change against ``none`` with the exact McNemar p-value (raw, Holm, BH), GMACs,
  ideal and measured speed-up (interleaved median [quartiles]) and their ratio; ``best`` marks the top
  top-1 of a budget only when significantly above every other, ``tie`` the ones it is tied with;
- ``pairwise.csv``: every two reducing methods of one budget, McNemar on their paired predictions;
- ``controls.csv`` / ``.tex``: each method against its random control (``random@method``), the
  difference with Newcombe's paired interval and the McNemar p, Holm- and BH-adjusted over the report;
- ``summary.csv`` / ``.tex``: top-1 (change) of every method across models at matched budgets;
- ``accuracy_at_gmacs.csv`` / ``.tex``: paper-style rows, each method's top-1 read off its
  accuracy-vs-GMACs curve at each budget's GMACs target (linear interpolation, no extrapolation),
  with an interval interpolated alike and no best.

"Significant" always means Holm-adjusted p < 0.05 within a stated family (:func:`adjust`): one model
and budget against ``none``; one model and budget pairwise; all the control tests of the report.

Records are compared only within one environment (:data:`GROUP`): throughput from another GPU, dtype,
torch or batch size is never a baseline, and accuracies on other images are never paired. Within an
environment only each method's newest version is compared, and ``off_target`` cells (achieved GMACs
more than 2 % from the target) stay out of the matched-budget tables; both are listed under the
model's table. ``docs/statistics.md`` explains the intervals, tests and spreads.

A row is one configuration, never two merged: records are told apart by their method's options and
``calib_limit`` as well as by method name and budget (budgets read in one spelling, ``0.70`` as
``0.7``). A method stored in several configurations is labelled by what tells them apart, less what
is at its default (``random`` and ``random[seed=1]``), in tables, pairwise tests, summaries, curves
and figures. Two records of one configuration in one environment (a re-run under another id) are
reported once, the newest measured one, and the duplication is noted under the model's table.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import logging
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from harness.measurement import stats
from harness.errors import HarnessError
from harness.training.recipes import OFF_THE_SHELF
from harness.sweep.store import ResultStore

log = logging.getLogger(__name__)

# The environment of a comparison: every setting that can move a top-1 or an img/s. The git sha is
# not one (a sweep resumed after a commit stays one group); the table header lists it. The
# throughput batch is the one asked for: a cell halved on out-of-memory stays with its siblings
# (its interleaved speed-up times both models at its own batch) and is noted.
GROUP = ["model", "checkpoint_sha", "data", "limit", "eval_set_sha", "device_name", "dtype", "batch_size",
         "throughput_batch_size_requested", "torch", "timm", "attention", "sdpa_backend", "prop_attn", "compile"]
# the kernel settings of GROUP and the value records written before them had
KERNEL = {"attention": "fused", "sdpa_backend": "auto", "prop_attn": "mask", "compile": False}
BASELINE = "none"
# how a reference method (a line every other method must beat, ``Method.baseline``) is labelled
REFERENCE_SUFFIX = " (baseline)"
# statuses of cells with measurements; only "ok" ones sit in the matched-budget tables
MEASURED = ("ok", "off_target")
# how far (relative GMACs) beyond a method's measured range "accuracy at x GMACs" may extend
REACH = 0.02
# a speed-up whose rounds spread more than this ((q3 - q1) / median) is flagged noisy
NOISY_SPREAD = 0.10
COLUMNS = ["model", "data", "limit", "device_name", "dtype", "method", "budget", "knob", "knob_value", "status",
           "error", "top1", "top5", "img_per_s", "gmacs", "gmacs_ratio", "gmacs_baseline", "gmacs_target",
           "n_images", "throughput_batch_size", "tokens_per_block", "gmacs_measured", "gmacs_overhead", "img_per_s_iqr",
           "latency_ms", "peak_mem_mb", "e2e_img_per_s", "cell_id", "checkpoint_sha", "eval_set_sha", "batch_size",
           "throughput_batch_size_requested", "torch", "timm", "git_sha", "method_version", "timestamp",
           "predictions", "gmacs_off_pct", "speedup_rounds", "speedup_median", "speedup_q1", "speedup_q3"]
# Table columns: (key, Markdown/CSV header, LaTeX header, format)
TABLE = [("budget", "budget", "Budget", None), ("method", "method", "Method", None), ("knob", "knob", "Knob", None),
         ("gmacs", "GMACs", "GMACs", "{:.3f}"), ("top1", "top-1 % [95 % CI]", r"Top-1 (\%) [95\% CI]", "{:.2f}"),
         ("d_top1", "Δ top-1", r"$\Delta$", "{:+.2f}"), ("p_mcnemar", "p vs none", "$p$", None),
         ("p_holm", "p Holm", r"$p$ Holm", None), ("q_bh", "q BH", r"$q$ BH", None),
         ("img_per_s", "img/s", "img/s", "{:.1f}"), ("speedup", "speed-up [IQR]", "Speed-up [IQR]", "{:.2f}x"),
         ("ideal_speedup", "ideal", "Ideal", "{:.2f}x"), ("realised", "realised", "Realised", "{:.2f}"),
         ("gmacs_measured", "GMACs (fvcore)", "GMACs (fvcore)", "{:.3f}")]
_COL = {c[0]: c for c in TABLE}
# The table of an environment without accuracy (the speed suite): speed, its spread, latency and memory.
SPEED_TABLE = [_COL["budget"], _COL["method"], _COL["knob"], _COL["gmacs"], _COL["gmacs_measured"],
               ("gmacs_overhead", "overhead GMACs", "Overhead", "{:.4f}"), _COL["img_per_s"],
               ("iqr_pct", "IQR %", r"IQR (\%)", "{:.1f}"), _COL["speedup"], _COL["ideal_speedup"], _COL["realised"],
               ("latency_ms", "latency ms (b=1)", "Latency (ms)", "{:.2f}"), ("peak_mem_mb", "peak MiB", "Peak MiB", "{:.0f}"),
               ("e2e_img_per_s", "e2e img/s", "E2E img/s", "{:.1f}")]
# The legend under the report's title: one short line per column group.
LEGEND = "\n".join([
    "- GMACs: analytic multiply-accumulates (the papers' convention); GMACs (fvcore): fvcore's count.",
    "- top-1 % [95 % CI]: Wilson score interval over the images evaluated.",
    "- **Bold**: the highest top-1 of a budget, only when significantly above every other method there (pairwise, "
    "Holm); ≈: no such best, and this top-1 is not significantly below the highest (a tie).",
    "- Δ top-1: change against `none`, in points (↑ better, ↓ worse); it needs a `none` cell in the run.",
    "- p vs none: exact McNemar test on the paired per-image predictions, raw; `-`: no paired predictions stored, "
    "no test.",
    "- p Holm / q BH: adjusted within the family of one model and budget (Holm: family-wise error; "
    "Benjamini-Hochberg: false discovery rate). Significant always means Holm p < 0.05; † marks a change that is not.",
    "- img/s and speed-up come from different timings. A method's img/s and its speed-up share its cell's "
    "interleaved rounds (the method and the unpatched model called in alternation); `none`'s img/s is its own "
    "cell's, timed minutes apart. So a row's img/s over `none`'s need not equal its speed-up.",
    "- speed-up [IQR]: median of the per-round ratios [first, third quartile]; `noisy`: (q3 − q1) / median "
    "above {noisy:.0%}; ‡: not interleaved (img/s over `none`'s img/s); n/a: fewer than {rounds} rounds "
    "(the CSV's `speedup_na` / `iqr_pct_na` say why).",
    "- ideal: `none`'s GMACs over the method's; realised: speed-up over ideal [its quartiles over ideal].",
    "- Off-target cells and superseded method versions stay out of the tables and are listed under each.",
    "- How these are computed: `docs/statistics.md`.",
]).format(noisy=NOISY_SPREAD, rounds=stats.MIN_ROUNDS)
# how a grouping field reads in a label or an environment line
LABEL_FORMS = {"limit": "limit {}", "attention": "{} attention", "sdpa_backend": "sdpa {}", "prop_attn": "prop-attn {}", "torch": "torch {}",
               "timm": "timm {}", "batch_size": "eval batch {}", "throughput_batch_size_requested": "throughput batch {}",
               "checkpoint_sha": "checkpoint {}", "eval_set_sha": "eval set {}"}
LABEL_KEYS = ("device_short", "dtype", "limit", "data", "checkpoint_sha", "eval_set_sha", "torch", "timm",
              "batch_size", "throughput_batch_size_requested", *KERNEL)


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
    asked = df["throughput_batch_size_requested"]
    df["throughput_batch_size_requested"] = asked.where(asked.notna(), df["throughput_batch_size"])
    df["results_dir"] = str(store.root)  # prediction paths are relative to it
    df["budget"] = df["budget"].map(canonical_budget)
    df["method"] = variant_labels(records)
    return df


def canonical_budget(text) -> str:
    """A stored budget in its one spelling (``0.70`` -> ``0.7``, as the plan writes it); other text as it is."""
    from harness.sweep.budget import parse_budget

    if text is None or text == "baseline" or (isinstance(text, float) and text != text):
        return str(text) if text is not None else text
    try:
        return parse_budget(str(text)).text
    except HarnessError:
        return str(text)


# --- configurations and their labels ----------------------------------------------------------------


def configuration(rec: dict) -> dict:
    """What tells a record's configuration apart beyond method and budget: its options, flattened
    (``random.seed`` under ``random@tome``), and the ``calib_limit`` of a searching method."""
    options = rec.get("method_options") if isinstance(rec.get("method_options"), dict) else {}
    flat = {}
    for k, v in options.items():
        if isinstance(v, dict) and "@" in str(rec.get("method")):  # follower@leader: options per part
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    limit = _norm(rec.get("calib_limit"))
    protocol = rec.get("protocol")  # fine-tuned cells are their own configuration: tome[protocol=finetune:x]
    return {**flat, **({"calib_limit": limit} if limit is not None else {}),
            **({"protocol": protocol} if protocol not in (None, OFF_THE_SHELF) else {})}


def variant_labels(records: list[dict]) -> list[str]:
    """Each record's method label: the method's name, with ``[option=value, ...]`` where the method
    was stored in several configurations (the settings that tell them apart, less those at their default).

    Options at the method's defaults count as left out, so a record that wrote a default out and
    one that did not (``{"seed": 0}``, ``{}``) are one configuration.
    """
    methods = [str(r.get("method")) for r in records]
    raw = [configuration(r) for r in records]
    several = {m for m in set(methods) if len({_key(c) for mm, c in zip(methods, raw) if mm == m}) > 1}
    configs = [_without_defaults(m, c) if m in several else c for m, c in zip(methods, raw)]
    labels = {m: _labels_of(m, [c for mm, c in zip(methods, configs) if mm == m]) for m in several}
    return [labels[m][_key(c)] if m in several else r.get("method") for m, c, r in zip(methods, configs, records)]


def _key(config: dict) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def _labels_of(method: str, configs: list[dict]) -> dict[str, str]:
    """Config key -> label for one method's configurations: the settings that vary among them."""
    distinct = {_key(c): c for c in configs}
    varying = sorted({k for c in distinct.values() for k in c
                      if len({_key({k: d.get(k, _ABSENT)}) for d in distinct.values()}) > 1})
    return {key: _variant_label(method, c, [k for k in varying if k in c]) for key, c in distinct.items()}


_ABSENT = "<absent>"  # a setting one configuration names and another leaves at its default


def _variant_label(method: str, config: dict, keys: list[str]) -> str:
    return f"{method}[{','.join(f'{k}={_value_text(config[k])}' for k in keys)}]" if keys else method


def _value_text(v) -> str:
    if isinstance(v, float):
        from harness.sweep.budget import number_text

        return number_text(v)
    return json.dumps(v, separators=(",", ":")) if isinstance(v, (list, dict)) else str(v)


def _without_defaults(method: str, config: dict) -> dict:
    defaults = _default_configuration(method)
    return {k: v for k, v in config.items() if k not in defaults or _key(defaults[k]) != _key(v)}


@functools.lru_cache(maxsize=None)
def _default_configuration(method: str) -> dict:
    """Every option of ``method`` at its default, flattened as :func:`configuration` does (empty for a
    method this process cannot make: then every setting that varies is shown)."""
    from harness.registry import make_method

    try:
        return configuration({"method": method, "method_options": make_method(method).resolved_options()})
    except Exception as exc:  # an uninstalled plugin's records still report, labelled by every varying option
        log.debug("no defaults for %s: %s", method, exc)
        return {}


def base_method(label: str) -> str:
    """The method a label names: ``random[seed=1]`` -> ``random``."""
    return str(label).split("[", 1)[0]


def _num(v) -> Optional[float]:
    """A finite float, or None (NaN, None and text all count as missing)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _norm(v):
    """A grouping value: None for missing (None or NaN), whole floats as ints (pandas turns 64 into 64.0)."""
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


def _records(frame) -> list[dict]:
    """A frame's rows as dicts, NaN as None."""
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]


def _pct(v: Optional[float]) -> Optional[float]:
    return None if v is None else 100 * v


def budget_order(text: str) -> tuple:
    """Sort key: baseline first, then fractions and GMACs targets from the largest, then knobs."""
    text = str(text)
    if text == "baseline":
        return (0, 0.0, "")
    key, sep, raw = text.partition("=")
    value = _num(raw if sep else text)
    kind = 1 if not sep else 2 if key == "gmacs" else 3
    return (kind, -(value or 0.0), key)


@functools.lru_cache(maxsize=None)
def is_reference(method: str) -> bool:
    """Whether ``method`` is a reference line every other method must beat: its class sets
    ``baseline = True`` (``resolution``, the model at a lower input resolution). False for ``none``
    (the unpatched model, :data:`BASELINE`), for ``follower@leader`` names and for methods this
    process cannot find (records of an uninstalled plugin). Read from the registry's listing, which
    reads the sources, so a report imports no torch.
    """
    from harness.registry import method_infos

    return any(info.name == base_method(method) and info.baseline for info in method_infos())


def method_rank(method: str) -> tuple:
    """Sort key of methods in tables: ``none``, then the reference methods, then the rest, by name."""
    return method != BASELINE, not is_reference(method), method


def _cell_order(rec: dict) -> tuple:
    return budget_order(rec["budget"]), method_rank(rec["method"])


def _knob_text(row) -> str:
    v = _num(row.get("knob_value"))
    if row.get("knob") is None or v is None:
        return "-"
    return f"{row['knob']}={int(v) if v.is_integer() else round(v, 4)}"


# --- environments, versions, baselines -------------------------------------------------------------


def environments(df) -> list[tuple[dict, object]]:
    """(environment, its records) pairs, sorted; each environment is a dict of GROUP plus a ``label``.

    Records with measurements (``ok``, ``off_target``) define the environments. A record without
    (an error, a skip) may lack provenance its cell never reached; it joins every environment whose
    fields agree with those it has, or else forms its own. The label is the model's name, followed by
    what tells its environments apart when one model was run in several (``deit_tiny_cifar10 (cpu,
    fp32)``); ``slug`` is a file-name-safe form and ``differs`` the GROUP fields that tell them apart.
    """
    keys = [tuple(_norm(v) for v in row) for row in df[GROUP].itertuples(index=False, name=None)]
    measured = df["status"].isin(MEASURED).tolist()
    members: dict[tuple, list[int]] = {k: [] for k, m in zip(keys, measured) if m}
    strays: dict[tuple, list[int]] = {}
    for i, (key, m) in enumerate(zip(keys, measured)):
        homes = [key] if m else [k for k in members if _agrees(key, k)]
        for home in homes:
            members[home].append(i)
        if not homes:
            strays.setdefault(key, []).append(i)
    groups = sorted({**members, **strays}.items(), key=lambda kv: tuple((v is None, str(v)) for v in kv[0]))
    envs = [(dict(zip(GROUP, key)), df.iloc[sorted(rows)]) for key, rows in groups]
    _label(envs)
    return envs


def _agrees(partial: tuple, full: tuple) -> bool:
    """Whether a record's identity, missing fields as wildcards, fits an environment's."""
    return all(p is None or p == f for p, f in zip(partial, full))


def _label(envs: list[tuple[dict, object]]) -> None:
    for env, _ in envs:
        env["device_short"] = str(env["device_name"] or "?").split(" (")[0].replace("NVIDIA ", "")
        env["slug"] = env["label"] = env["model"]
        env["differs"] = []
    for model in {e["model"] for e, _ in envs}:
        same = [e for e, _ in envs if e["model"] == model]
        if len(same) == 1:
            continue
        parts = [k for k in LABEL_KEYS if len({str(e[k]) for e in same}) > 1]
        for e in same:
            e["differs"] = parts
            e["label"] = f"{model} ({', '.join(_label_part(k, e[k]) for k in parts)})"
            e["slug"] = f"{model}-{_env_hash(e)}"


def _label_part(key: str, value) -> str:
    if key == "compile":
        return "compiled" if value else "not compiled"
    text = "?" if value is None else str(value)[:8] if key.endswith("_sha") else str(value)
    return LABEL_FORMS.get(key, "{}").format(text)


def _env_hash(env: dict) -> str:
    return hashlib.sha1(repr([env[k] for k in GROUP]).encode()).hexdigest()[:6]


def version_key(version) -> tuple:
    """Sort key of a method version: numbers as numbers ("10" after "9"), ``leader@follower`` part by part."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.findall(r"\d+|\D+", str(version)))


def _superseded_mask(group):
    """True for the records of a method at an older version than its newest one in ``group``.

    A record that names no version (older than versions, or a cell that failed before it knew) is
    never superseded.
    """
    newest: dict[str, str] = {}
    for method, version in zip(group["method"], group["method_version"]):
        if _norm(version) is not None:
            newest[method] = max(newest.get(method, str(version)), str(version), key=version_key)
    return [(_norm(v) is not None and str(v) != newest[m]) for m, v in zip(group["method"], group["method_version"])]


def current(group):
    """The records of ``group`` compared: each method's newest version, one record per configuration."""
    superseded = _superseded_mask(group)
    keep = {i for ids in _configurations(group, superseded).values() for i in ids[:1]}
    return group[[not s and (i in keep or m == BASELINE) for i, (s, m) in enumerate(zip(superseded, group["method"]))]]


def _configurations(group, superseded=None) -> dict[tuple, list[int]]:
    """(method label, budget) -> positions of its records in ``group`` not superseded, the one
    reported first: measured before not, then the newest (timestamp, then cell id). The baseline's
    records are left to :func:`baseline_of`."""
    superseded = _superseded_mask(group) if superseded is None else superseded
    found: dict[tuple, list[tuple]] = {}
    rows = zip(group["method"], group["budget"], group["status"], group["timestamp"], group["cell_id"], superseded)
    for i, (method, budget, status, when, cid, old) in enumerate(rows):
        if not old and method != BASELINE:
            found.setdefault((method, str(budget)), []).append((status in MEASURED, _when(when), str(cid), i))
    return {k: [i for *_, i in sorted(v, reverse=True)] for k, v in found.items()}


def duplicates(group) -> dict[tuple, list[str]]:
    """(method label, budget) -> the cell ids of a configuration stored more than once (a re-run), the reported one first."""
    ids = list(group["cell_id"])
    return {k: [str(ids[i]) for i in v] for k, v in _configurations(group).items() if len(v) > 1}


def _baselines(group) -> list[dict]:
    """The compared ``none`` records that ended ok, newest first (by timestamp, then cell id)."""
    cur = current(group)
    recs = _records(cur[(cur["method"] == BASELINE) & (cur["status"] == "ok")])
    return sorted(recs, key=lambda r: (_when(r.get("timestamp")), str(r.get("cell_id"))), reverse=True)


def _when(text) -> float:
    """A record's ISO timestamp as seconds (UTC when it names no zone); -inf when absent or unreadable."""
    try:
        t = datetime.fromisoformat(str(text))
    except ValueError:
        return -math.inf
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def baseline_of(group) -> Optional[dict]:
    """The environment's ``none`` record that ended ok (the newest, if several), or None."""
    recs = _baselines(group)
    return recs[0] if recs else None


# --- rows: accuracy, its test, speed ---------------------------------------------------------------


def _loader() -> Callable:
    """A prediction-file reader that reads each file once (for one report)."""
    return functools.lru_cache(maxsize=None)(stats.load_predictions)


def top1_interval(rec: dict) -> tuple[Optional[float], Optional[float]]:
    """The 95 % Wilson interval of a record's top-1, in percent; (None, None) without top1 and n_images.

    ``top1`` is k / n, so round(top1 * n) recovers k, the count of images right.
    """
    top1, n = _num(rec.get("top1")), _num(rec.get("n_images"))
    if top1 is None or n is None or n < 1:
        return None, None
    n = int(n)
    low, high = stats.wilson(min(n, max(0, round(top1 * n))), n)
    return 100 * low, 100 * high


def _accuracy(rec: dict, base: Optional[dict], load: Callable) -> dict:
    """top1 with its interval, and its change against ``base`` with the paired test (None where none can be done)."""
    top1 = _num(rec.get("top1"))
    low, high = top1_interval(rec)
    out = {"top1": _pct(top1), "top1_ci_low": low, "top1_ci_high": high, "d_top1": None, "p_mcnemar": None,
           "p_holm": None, "q_bh": None, "significant": None}
    base_top1 = _num(base.get("top1")) if base else None
    if top1 is None or base_top1 is None:
        return out
    out["d_top1"] = 100 * (top1 - base_top1)
    if rec.get("cell_id") != base.get("cell_id"):
        test = stats.paired_test(rec, base, Path(rec.get("results_dir") or "."), load)
        if test is not None:
            out["p_mcnemar"] = test.p
    return out


def adjust(rows: list[dict], family: Callable, p_key: str = "p_mcnemar") -> None:
    """Holm's adjusted p (``p_holm``) and Benjamini-Hochberg's q (``q_bh``) of each row's ``p_key``
    within its family (rows with one ``family(row)`` value), and ``significant``: Holm below
    ``stats.ALPHA`` (None without a test). "Significant" in every table, mark and sentence is this one.
    """
    families: dict = {}
    for r in rows:
        families.setdefault(family(r), []).append(r)
    for members in families.values():
        ps = [r.get(p_key) for r in members]
        for r, holm, bh in zip(members, stats.holm(ps), stats.benjamini_hochberg(ps)):
            r.update(p_holm=holm, q_bh=bh, significant=None if holm is None else holm < stats.ALPHA)


def speedup_na(rec: dict) -> Optional[str]:
    """Why a record has no speed-up ("n/a"): timed in fewer than ``stats.MIN_ROUNDS`` interleaved rounds."""
    if rec.get("speedup_na"):
        return str(rec["speedup_na"])
    rounds = rec.get("speedup_rounds")
    return stats.too_few_rounds(len(rounds), "a speed-up") if isinstance(rounds, (list, tuple)) and rounds else None


def iqr_na(rec: dict) -> Optional[str]:
    """Why a record's img/s has no IQR ("n/a"): fewer than ``stats.MIN_ROUNDS`` timed runs."""
    if rec.get("img_per_s_iqr_na"):
        return str(rec["img_per_s_iqr_na"])
    runs = _num(rec.get("throughput_repeats"))
    return stats.too_few_rounds(int(runs), "an IQR") if runs else None


def _stored_speedup(rec: dict) -> Optional[stats.RatioSummary]:
    """The interleaved speed-up of a record: its stored median and quartiles, else its rounds; None without either."""
    median = _num(rec.get("speedup_median"))
    if median:
        q1, q3 = _num(rec.get("speedup_q1")), _num(rec.get("speedup_q3"))
        q1, q3 = (median if q1 is None else q1), (median if q3 is None else q3)
        return stats.RatioSummary(median, q1, q3, (q3 - q1) / median)
    rounds = rec.get("speedup_rounds")
    values = [v for v in map(_num, rounds) if v is not None] if isinstance(rounds, (list, tuple)) else []
    return stats.ratio_summary(values) if values else None


def speedup_of(rec: dict, base: Optional[dict]) -> dict:
    """A cell's measured speed-up over ``none``.

    Returns ``speedup`` (the median of interleaved rounds; for a record without rounds, its img/s
    over the baseline's), ``speedup_q1``/``speedup_q3``, ``speedup_spread`` ((q3 - q1) / median),
    ``interleaved`` (True; False for the fallback; None for the baseline itself) and ``noisy``
    (spread above NOISY_SPREAD). A record timed in too few interleaved rounds has none of them:
    ``speedup_na`` says why (and ``noisy`` is None: no spread to judge).
    """
    out = {"speedup": None, "speedup_q1": None, "speedup_q3": None, "speedup_spread": None, "interleaved": None,
           "noisy": False, "speedup_na": speedup_na(rec)}
    if out["speedup_na"] is not None:
        return {**out, "interleaved": True, "noisy": None}
    s = _stored_speedup(rec)
    if s is not None:
        out.update(speedup=s.median, speedup_q1=s.q1, speedup_q3=s.q3, speedup_spread=s.spread, interleaved=True,
                   noisy=s.spread > NOISY_SPREAD)
        return out
    speed, base_speed = _num(rec.get("img_per_s")), _num(base.get("img_per_s")) if base else None
    if speed and base_speed:
        out["speedup"] = speed / base_speed
        out["interleaved"] = None if rec.get("cell_id") == base.get("cell_id") else False
    return out


def _realised(row: dict) -> dict:
    """How much of the FLOP saving became measured speed: speed-up / ideal, and its quartiles over ideal."""
    ideal = row["ideal_speedup"]
    ratio = (lambda v: v / ideal if v and ideal else None)
    return {"realised": ratio(row["speedup"]), "realised_low": ratio(row["speedup_q1"]),
            "realised_high": ratio(row["speedup_q3"])}


def _row(rec: dict, base: Optional[dict], load: Callable) -> dict:
    gmacs, speed = _num(rec.get("gmacs")), _num(rec.get("img_per_s"))
    base_gmacs = _num(rec.get("gmacs_baseline")) or _num((base or {}).get("gmacs"))
    iqr = _num(rec.get("img_per_s_iqr"))
    row = {"budget": str(rec["budget"]), "method": rec["method"], "knob": _knob_text(rec), "gmacs": gmacs,
           **_accuracy(rec, base, load), "img_per_s": speed, **speedup_of(rec, base),
           "ideal_speedup": base_gmacs / gmacs if base_gmacs and gmacs else None}
    row.update(_realised(row))
    row.update({"gmacs_measured": _num(rec.get("gmacs_measured")), "gmacs_overhead": _num(rec.get("gmacs_overhead")),
                "iqr_pct": 100 * iqr / speed if speed and iqr is not None and not iqr_na(rec) else None,
                "iqr_pct_na": iqr_na(rec),
                "latency_ms": _num(rec.get("latency_ms")), "peak_mem_mb": _num(rec.get("peak_mem_mb")),
                "e2e_img_per_s": _num(rec.get("e2e_img_per_s")), "cell_id": rec.get("cell_id")})
    return row


def model_rows(group, load: Optional[Callable] = None) -> list[dict]:
    """One environment's compared cells as table rows (raw numbers), baseline first, then by budget and method.

    Compared: ``ok`` cells at their method's newest version, and one ``none`` record (:func:`baseline_of`).
    Each row: budget, method, knob, gmacs; top1 with ``top1_ci_low``/``top1_ci_high`` (95 % Wilson,
    percent), d_top1 (points against ``none``) with ``p_mcnemar`` and ``significant`` (None where the
    cells are not paired); img_per_s; the speed-up of :func:`speedup_of`; ideal_speedup (baseline
    GMACs / GMACs); ``realised`` = speed-up / ideal with ``realised_low``/``realised_high``;
    ``p_holm``/``q_bh`` (adjusted within the budget) and ``best``/``tie`` (:func:`mark_best`).

    Args:
        group: one environment's records (:func:`environments`).
        load: reads a prediction file; pass one reader to several calls to read each file once.
    """
    load = load or _loader()
    base = baseline_of(group)
    ok = current(group)
    recs = [r for r in _records(ok[ok["status"] == "ok"])
            if r["method"] != BASELINE or r.get("cell_id") == (base or {}).get("cell_id")]
    rows = [_row(r, base, load) for r in sorted(recs, key=_cell_order)]
    adjust(rows, lambda r: r["budget"])  # family: one model (environment) x budget, each method against none
    twice = duplicates(group)
    for row in rows if twice else []:  # a column only where a configuration was stored twice
        row["records"] = len(twice.get((row["method"], row["budget"]), [None]))
    mark_best(rows, pairwise(group, load))
    return rows


def mark_best(rows: list[dict], pairs: list[dict]) -> None:
    """Per budget, ``best``: the highest top-1 of the reducing methods, only when it is significantly
    above every other (Holm-adjusted pairwise tests, :func:`pairwise`); else ``tie`` on the highest
    and on every method not significantly below it (no test: not significantly below).
    """
    tests = {(p["budget"], frozenset((p["method_a"], p["method_b"]))): p for p in pairs}
    by_budget: dict[str, list[dict]] = {}
    for r in rows:
        r["best"] = r["tie"] = False
        if r["method"] != BASELINE and r["top1"] is not None:
            by_budget.setdefault(r["budget"], []).append(r)
    for budget, cands in by_budget.items():
        if len(cands) < 2:
            continue
        top = max(cands, key=lambda c: c["top1"])
        below = {c["method"]: c["top1"] < top["top1"] - 1e-9 and
                 bool(tests.get((budget, frozenset((c["method"], top["method"]))), {}).get("significant"))
                 for c in cands if c is not top}
        if all(below.values()):
            top["best"] = True
            continue
        for c in cands:
            c["tie"] = c is top or not below[c["method"]]


def pairwise(group, load: Optional[Callable] = None) -> list[dict]:
    """Every two reducing methods of one budget in an environment, tested on their paired predictions.

    Returns:
        Rows by budget, then method names: budget, method_a, method_b, top1_a, top1_b, d_top1 (a - b,
        points), ``b`` (images only a got right), ``c`` (only b), p_mcnemar, its Holm and BH
        adjustments within the budget (:func:`adjust`) and significant; the test's fields are None
        where the two cells are not paired.
    """
    load = load or _loader()
    ok = current(group)
    by_budget: dict[str, list[dict]] = {}
    for rec in _records(ok[(ok["status"] == "ok") & (ok["method"] != BASELINE)]):
        by_budget.setdefault(str(rec["budget"]), []).append(rec)
    rows = []
    for budget in sorted(by_budget, key=budget_order):
        for a, b in itertools.combinations(sorted(by_budget[budget], key=lambda r: r["method"]), 2):
            test = stats.paired_test(a, b, Path(a.get("results_dir") or "."), load)
            ta, tb = _pct(_num(a.get("top1"))), _pct(_num(b.get("top1")))
            rows.append({"budget": budget, "method_a": a["method"], "method_b": b["method"], "top1_a": ta, "top1_b": tb,
                         "d_top1": ta - tb if ta is not None and tb is not None else None,
                         "b": test.b if test else None, "c": test.c if test else None,
                         "p_mcnemar": test.p if test else None})
    adjust(rows, lambda r: r["budget"])  # family: every two methods of one model (environment) x budget
    return rows


def control_of(label: str) -> Optional[str]:
    """The method a paired control stands for: ``random@tome`` -> ``tome``; None for any other label."""
    follower, sep, leader = base_method(label).partition("@")
    return leader if sep and follower else None


def controls(envs: list[tuple[dict, object]], load: Optional[Callable] = None) -> list[dict]:
    """Each method against its paired control (``random@<method>``: random tokens at the method's own
    schedule), per environment and budget: the difference in top-1 with Newcombe's interval for
    paired proportions (:func:`harness.measurement.stats.newcombe_paired`) and the exact McNemar p, adjusted
    (Holm, BH) over the whole report's control tests: one family.

    Returns:
        Rows: model (environment label), budget, method, control, top1, top1_control, d_top1 and its
        ``d_ci_low``/``d_ci_high`` (points), b, c, n, p_mcnemar, p_holm, q_bh, significant.
    """
    load = load or _loader()
    rows = []
    for env, group in envs:
        ok = current(group)
        recs = {(r["method"], str(r["budget"])): r for r in _records(ok[ok["status"] == "ok"])}
        for (label, budget), ctrl in sorted(recs.items(), key=lambda kv: (budget_order(kv[0][1]), kv[0][0])):
            rec = recs.get((control_of(label), budget)) if control_of(label) else None
            if rec is not None:
                rows.append({"model": env["label"], **_control_row(rec, ctrl, load)})
    adjust(rows, lambda r: "controls")
    return rows


def _control_row(rec: dict, ctrl: dict, load: Callable) -> dict:
    test = stats.paired_test(rec, ctrl, Path(rec.get("results_dir") or "."), load)
    top1, top1_ctrl, n = _num(rec.get("top1")), _num(ctrl.get("top1")), _num(rec.get("n_images"))
    row = {"budget": str(rec["budget"]), "method": rec["method"], "control": ctrl["method"], "top1": _pct(top1),
           "top1_control": _pct(top1_ctrl), "d_top1": None, "d_ci_low": None, "d_ci_high": None,
           "b": test.b if test else None, "c": test.c if test else None, "n": int(n) if n else None,
           "p_mcnemar": test.p if test else None}
    if top1 is not None and top1_ctrl is not None:
        row["d_top1"] = 100 * (top1 - top1_ctrl)
    if test is not None and n:
        both = round(top1 * n) - test.b  # images both got right: the method's right ones less its discordant ones
        _, low, high = stats.newcombe_paired(both, test.b, test.c, int(n) - both - test.b - test.c)
        row.update(d_ci_low=100 * low, d_ci_high=100 * high)
    return row


# --- formatting ------------------------------------------------------------------------------------


def _arrow(delta: Optional[float], fmt: str) -> str:
    # the arrow follows the printed number: -0.001 prints as +0.00 / -0.00 and gets no arrow
    text = fmt.format(delta)
    if float(text) > 0:
        return text + " ↑"
    if float(text) < 0:
        return text.replace("-", "−") + " ↓"
    return text.replace("-", "")


def _tex_arrow(text: str) -> str:
    text = text.replace("−", "-").replace(" ↑", r"\,$\uparrow$").replace(" ↓", r"\,$\downarrow$")
    return text.replace("-", "$-$", 1) if text.startswith("-") else text


def _interval(text: str, low: Optional[float], high: Optional[float], fmt: str, latex: bool) -> str:
    """``text [low, high]``; in LaTeX the bracket in small type."""
    if low is None or high is None:
        return text
    span = f"[{fmt.format(low)}, {fmt.format(high)}]"
    return rf"{text} {{\scriptsize {span}}}" if latex else f"{text} {span}"


def _times(text: str, latex: bool) -> str:
    return text[:-1] + r"$\times$" if latex and text.endswith("x") else text


def p_text(p: Optional[float], latex: bool = False) -> str:
    """A p-value as printed: three decimals, ``<0.001`` below that, ``-`` when no test was possible."""
    if p is None:
        return "--" if latex else "-"
    if p < 0.001:
        return "$<$0.001" if latex else "<0.001"
    return f"{p:.3f}"


def _top1_text(row: dict, fmt: str, latex: bool) -> str:
    text = fmt.format(row["top1"])
    if row.get("best"):
        text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
    elif row.get("tie"):
        text = rf"{text}\,$\approx$" if latex else f"{text} ≈"
    return _interval(text, row.get("top1_ci_low"), row.get("top1_ci_high"), "{:.1f}", latex)


def _delta_text(row: dict, fmt: str, latex: bool) -> str:
    text = _arrow(row["d_top1"], fmt)
    text = _tex_arrow(text) if latex else text
    # not significant after adjustment: the change is within what chance on these images gives
    if row.get("significant") is False:
        text += r"\,\dag" if latex else " †"
    return text


def _speedup_text(row: dict, fmt: str, latex: bool) -> str:
    text = _times(fmt.format(row["speedup"]), latex)
    if row.get("interleaved") is False:
        return text + (r"\,\ddag" if latex else " ‡")
    text = _interval(text, row.get("speedup_q1"), row.get("speedup_q3"), "{:.2f}", latex)
    return text + " noisy" if row.get("noisy") else text


def _realised_text(row: dict, fmt: str, latex: bool) -> str:
    return _interval(fmt.format(row["realised"]), row.get("realised_low"), row.get("realised_high"), "{:.2f}", latex)


def method_label(method: str) -> str:
    """A method's name as tables and legends show it: a reference method says so ("resolution (baseline)")."""
    return f"{method}{REFERENCE_SUFFIX}" if is_reference(method) else method


def _method_text(row: dict, fmt: Optional[str], latex: bool) -> str:
    text = method_label(row["method"]) + (f" ({row['records']} records)" if (row.get("records") or 0) > 1 else "")
    return tex_escape(text) if latex else text


_RENDER = {"method": _method_text, "top1": _top1_text, "d_top1": _delta_text, "speedup": _speedup_text,
           "realised": _realised_text, **{k: (lambda row, fmt, latex, k=k: p_text(row[k], latex))
                                          for k in ("p_mcnemar", "p_holm", "q_bh")}}


def _cell_text(key: str, row: dict, fmt: Optional[str], latex: bool) -> str:
    value = row.get(key)
    if value is None and row.get(f"{key}_na"):  # not measurable from what was timed: the record says why
        return "n/a"
    if value is None:
        return "--" if latex else "-"
    if key in _RENDER:
        return _RENDER[key](row, fmt, latex)
    text = fmt.format(value) if fmt else str(value)
    return _times(tex_escape(text), latex) if latex else text


def tex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text."""
    return re.sub(r"([&%$#_{}])", r"\\\1", str(text)).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def markdown_table(rows: list[dict], table: list = TABLE) -> str:
    """A model's rows as a GitHub Markdown table; the best top-1 of each budget in bold."""
    from tabulate import tabulate

    body = [[_cell_text(k, r, f, False) for k, _, _, f in table] for r in rows]
    return tabulate(body, headers=[h for _, h, _, _ in table], tablefmt="github", disable_numparse=True)


def latex_table(rows: list[dict], caption_note: str = "", table: list = TABLE) -> str:
    """A model's rows as a booktabs ``tabular`` (``\\usepackage{booktabs}``), one rule between budgets."""
    align = "lll" + "r" * (len(table) - 3)
    lines = [f"% {caption_note}".rstrip(),
             r"% needs \usepackage{booktabs}; bold: highest top-1 of a budget, significantly above every other "
             r"(Holm-adjusted pairwise McNemar); \approx: tied with the highest; [95% CI] Wilson; \dag: not significant "
             r"against none (Holm-adjusted p >= 0.05 within model x budget); \ddag: speed-up not interleaved; "
             r"speed-up [quartiles]",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(t for _, _, t, _ in table) + r" \\", r"\midrule"]
    prev = None
    for r in rows:
        if prev is not None and r["budget"] != prev:
            lines.append(r"\midrule")
        cells = [_cell_text(k, r, f, True) for k, _, _, f in table]
        if r["budget"] == prev:
            cells[0] = ""
        lines.append(" & ".join(cells) + r" \\")
        prev = r["budget"]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


# CSV rounding per column; p-values keep four significant digits instead (they can be tiny)
DIGITS = {"gmacs": 4, "top1": 2, "top1_ci_low": 2, "top1_ci_high": 2, "d_top1": 2, "img_per_s": 2, "speedup": 3,
          "speedup_q1": 3, "speedup_q3": 3, "speedup_spread": 3, "ideal_speedup": 3, "realised": 3, "realised_low": 3,
          "realised_high": 3, "gmacs_measured": 4, "gmacs_overhead": 5, "iqr_pct": 2, "latency_ms": 3,
          "peak_mem_mb": 1, "e2e_img_per_s": 2, "top1_a": 2, "top1_b": 2}


def _rounded(key: str, v):
    if v is None or isinstance(v, bool):
        return v
    if key in ("p_mcnemar", "p_holm", "q_bh"):
        return float(f"{v:.4g}")
    return round(v, DIGITS[key]) if key in DIGITS else v


def csv_rows(rows: list[dict], env: dict) -> list[dict]:
    """Rows for CSV: the environment's fields, then the raw numbers rounded (no markers)."""
    return [{**{k: env[k] for k in GROUP}, **{k: _rounded(k, v) for k, v in r.items()}} for r in rows]


def pairwise_markdown(rows: list[dict]) -> str:
    from tabulate import tabulate

    body = [[r["budget"], r["method_a"], r["method_b"], _fmt(r["top1_a"], "{:.2f}"), _fmt(r["top1_b"], "{:.2f}"),
             "-" if r["d_top1"] is None else _arrow(r["d_top1"], "{:+.2f}"), _fmt(r["b"], "{}"), _fmt(r["c"], "{}"),
             p_text(r["p_mcnemar"]), p_text(r["p_holm"]) + (" †" if r["significant"] is False else ""),
             p_text(r["q_bh"])] for r in rows]
    return tabulate(body, headers=["budget", "A", "B", "top-1 A", "top-1 B", "Δ (A − B)", "b: only A right",
                                   "c: only B right", "p", "p Holm", "q BH"], tablefmt="github", disable_numparse=True)


CONTROL_COLUMNS = ["model", "budget", "method", "control", "top1", "top1_control", "d_top1", "d_ci_low", "d_ci_high",
                   "b", "c", "n", "p_mcnemar", "p_holm", "q_bh", "significant"]


def _control_cells(r: dict, latex: bool) -> list[str]:
    dash = "--" if latex else "-"
    delta = dash if r["d_top1"] is None else _arrow(r["d_top1"], "{:+.1f}")
    delta = _tex_arrow(delta) if latex and r["d_top1"] is not None else delta
    delta = _interval(delta, r["d_ci_low"], r["d_ci_high"], "{:+.1f}", latex)
    mark = (r"\,\dag" if latex else " †") if r["significant"] is False else ""
    return [_fmt(r["top1"], "{:.1f}"), _fmt(r["top1_control"], "{:.1f}"), delta, p_text(r["p_mcnemar"], latex),
            p_text(r["p_holm"], latex) + mark, p_text(r["q_bh"], latex)]


def controls_markdown(rows: list[dict]) -> str:
    """Each method against its random control: top-1s, the difference [Newcombe 95 %], raw, Holm and BH p."""
    from tabulate import tabulate

    body = [[r["model"], r["budget"], r["method"], *_control_cells(r, False)] for r in rows]
    return tabulate(body, headers=["model", "budget", "method", "top-1", "top-1 control", "Δ [95 % CI, Newcombe]",
                                   "p", "p Holm", "q BH"], tablefmt="github", disable_numparse=True)


def controls_latex(rows: list[dict]) -> str:
    """The control comparisons as a booktabs tabular."""
    lines = [r"% needs \usepackage{booktabs}; each method minus random pruning at its own schedule (random@method), "
             r"points [95% CI, Newcombe's paired score interval]; exact McNemar p, Holm- and BH-adjusted over all "
             r"these tests; \dag: not significant (Holm p >= 0.05)",
             r"\begin{tabular}{lllrrrrrr}", r"\toprule",
             r"Model & Budget & Method & Top-1 & Control & $\Delta$ [95\% CI] & $p$ & $p$ Holm & $q$ BH \\", r"\midrule"]
    prev = None
    for r in rows:
        if prev is not None and (r["model"], r["budget"]) != prev:
            lines.append(r"\midrule")
        cells = [tex_escape(r["model"]), r["budget"], tex_escape(method_label(r["method"])), *_control_cells(r, True)]
        lines.append(" & ".join(cells) + r" \\")
        prev = (r["model"], r["budget"])
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


# --- across models ---------------------------------------------------------------------------------


def summary(envs: list[tuple[dict, object]], load: Optional[Callable] = None) -> tuple[list[str], list[dict]]:
    """Top-1 and its change for every method across models at matched budgets.

    Returns:
        The column labels (``<model label> @ <budget>``) and one row per method, the ``none`` row
        first with each column's reference top-1: ``{"method": m, "<col>": <its model_rows row>, ...}``.
    """
    load = load or _loader()
    cols, table = [], {BASELINE: {"method": BASELINE}}
    for env, group in envs:
        rows = model_rows(group, load)
        base = next((r for r in rows if r["method"] == BASELINE), None)
        for budget in sorted({r["budget"] for r in rows if r["method"] != BASELINE}, key=budget_order):
            col = f"{env['label']} @ {budget}"
            cols.append(col)
            if base is not None:
                table[BASELINE][col] = {**base, "d_top1": None, "best": False}
            for r in rows:
                if r["budget"] == budget:
                    table.setdefault(r["method"], {"method": r["method"]})[col] = r
    order = sorted(table, key=method_rank)
    return cols, [table[m] for m in order]


def _summary_cell(v: Optional[dict], latex: bool) -> str:
    if v is None or v.get("top1") is None:
        return "--" if latex else "-"
    text = _top1_text(v, "{:.2f}", latex)
    if v.get("d_top1") is None:
        return text
    delta = _delta_text(v, "{:+.2f}", latex)
    return rf"{text} {{\scriptsize({delta})}}" if latex else f"{text} ({delta})"


def summary_markdown(cols: list[str], rows: list[dict]) -> str:
    from tabulate import tabulate

    body = [[method_label(r["method"])] + [_summary_cell(r.get(c), False) for c in cols] for r in rows]
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
    lines = [r"% needs \usepackage{booktabs}; top-1 (%) [95% CI, Wilson] and its change against none; bold: "
             r"significantly above every other method of its budget, \approx: tied with the highest; \dag: not "
             r"significant against none (exact McNemar, Holm-adjusted within model x budget)",
             rf"\begin{{tabular}}{{l{'r' * len(cols)}}}", r"\toprule", " & ".join(head1) + r" \\", "".join(rules),
             " & ".join(head2) + r" \\", r"\midrule"]
    for r in rows:
        cells = [tex_escape(method_label(r["method"]))] + [_summary_cell(r.get(c), True) for c in cols]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


def _summary_tidy(cols: list[str], rows: list[dict]) -> list[dict]:
    keys = ("top1", "top1_ci_low", "top1_ci_high", "d_top1", "p_mcnemar", "p_holm", "q_bh", "significant", "best", "tie")
    return [{"column": c, "method": r["method"], **{k: _rounded(k, v[k]) for k in keys}}
            for r in rows for c in cols for v in [r.get(c)] if v is not None]


def method_curve(group, method: str, interval: bool = False) -> list[tuple]:
    """(GMACs, top-1 %) points of ``method`` in one environment, anchored at the baseline, by GMACs;
    with ``interval``, (GMACs, top-1 %, Wilson low, high).

    Its cells at their achieved GMACs: ``ok`` ones and ``off_target`` ones (a point of the curve all
    the same, only not at its budget), at the method's newest version.
    """
    cur = current(group)
    cells = _records(cur[cur["status"].isin(MEASURED) & (cur["method"] == method)])
    base = baseline_of(group)
    if base and method != BASELINE:
        cells.append(base)  # every method at its identity knob is the unpatched model (a contract test checks it)
    pts = {(_num(r["gmacs"]), 100 * _num(r["top1"]), *top1_interval(r)) for r in cells
           if _num(r.get("gmacs")) is not None and _num(r.get("top1")) is not None}
    return sorted(p if interval else p[:2] for p in pts)


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
        The method columns and rows ``{"model", "gmacs", "baseline_top1", "baseline_top1_ci_low",
        "baseline_top1_ci_high", "baseline_gmacs", <method>: top1, <method>_ci_low, <method>_ci_high}``.
        The baseline's top-1 is measured with its Wilson interval; a method's is interpolated, and so
        is its interval (the two neighbouring cells' Wilson bounds, read off alike).
    """
    methods = sorted({m for _, g in envs for m in current(g).loc[lambda c: c["status"].isin(MEASURED), "method"]
                      if m != BASELINE}, key=method_rank)
    rows = []
    for env, group in envs:
        base = baseline_of(group) or {}
        low, high = top1_interval(base)
        targets = sorted({round(t, 3) for t in map(_num, current(group)["gmacs_target"]) if t is not None}, reverse=True)
        curves = {m: method_curve(group, m, interval=True) for m in methods}
        for t in targets:
            row = {"model": env["label"], "gmacs": t, "baseline_top1": _pct(_num(base.get("top1"))),
                   "baseline_top1_ci_low": low, "baseline_top1_ci_high": high, "baseline_gmacs": _num(base.get("gmacs"))}
            for m in methods:
                row.update(_read_off(curves[m], t, m))
            rows.append(row)
    return methods, rows


def _read_off(curve: list[tuple], gmacs: float, method: str) -> dict:
    """``method``'s top-1 and interval bounds at ``gmacs``, each interpolated along its curve (None outside it)."""
    top1 = accuracy_at([p[:2] for p in curve], gmacs)
    bounds = [[(p[0], p[i]) for p in curve if p[i] is not None] for i in (2, 3)]
    low, high = (accuracy_at(b, gmacs) if top1 is not None and len(b) == len(curve) else None for b in bounds)
    return {method: top1, f"{method}_ci_low": low, f"{method}_ci_high": high}


def _at_cell(row: dict, method: str, latex: bool) -> str:
    if row.get(method) is None:
        return "--" if latex else "-"
    return _interval(f"{row[method]:.1f}", row.get(f"{method}_ci_low"), row.get(f"{method}_ci_high"), "{:.1f}", latex)


def at_gmacs_markdown(methods: list[str], rows: list[dict]) -> str:
    from tabulate import tabulate

    body = []
    for r in rows:
        cells = [_at_cell(r, m, False) for m in methods]
        base = "-"
        if r["baseline_top1"] is not None:
            top1 = _interval(f"{r['baseline_top1']:.2f}", r["baseline_top1_ci_low"], r["baseline_top1_ci_high"],
                             "{:.1f}", False)
            base = f"{top1} @ {_fmt(r['baseline_gmacs'], '{:.2f}')}"
        body.append([r["model"], f"{r['gmacs']:.2f}", base] + cells)
    headers = ["model", "GMACs", "none (top-1 [95 % CI] @ GMACs)"] + [method_label(m) for m in methods]
    return tabulate(body, headers=headers, tablefmt="github", disable_numparse=True)


def at_gmacs_latex(methods: list[str], rows: list[dict]) -> str:
    lines = [r"% needs \usepackage{booktabs}; top-1 (%) interpolated at each GMACs target, [its neighbouring "
             r"cells' 95% Wilson bounds interpolated alike]; no best marked: interpolated values have no paired test",
             rf"\begin{{tabular}}{{lr{'r' * len(methods)}}}", r"\toprule",
             " & ".join(["Model", "GMACs"] + [tex_escape(method_label(m)) for m in methods]) + r" \\", r"\midrule"]
    prev = None
    for r in rows:
        if prev is not None and r["model"] != prev:
            lines.append(r"\midrule")
        cells = [_at_cell(r, m, True) for m in methods]
        label = tex_escape(r["model"]) if r["model"] != prev else ""
        lines.append(" & ".join([label, f"{r['gmacs']:.2f}"] + cells) + r" \\")
        prev = r["model"]
    lines += [r"\bottomrule", r"\end{tabular}", ""]
    return "\n".join(lines)


# --- attention kernels -----------------------------------------------------------------------------


def kernel_setting(row) -> str:
    """A record's kernel settings as one label: ``fused``, ``eager``, ``fused/sdpa=efficient``, ``fused+compile``."""
    text = str(row["attention"]) + (f"/sdpa={row['sdpa_backend']}" if row["sdpa_backend"] != "auto" else "")
    text += f"/prop-attn={row['prop_attn']}" if row["prop_attn"] != "mask" else ""
    return text + ("+compile" if row["compile"] else "")


def kernel_comparison(df) -> tuple[list[str], list[dict]]:
    """img/s of the same cell under each attention kernel / compile setting stored.

    Returns the settings (the default ``fused`` first) and one row per environment (less its kernel
    settings), method and budget that ran under more than one; each row maps a setting to its img/s,
    and ``vs_<s>`` to the ratio of the default's img/s over it (above 1: the default is faster).
    Only ok cells at their method's newest version count.
    """
    import pandas as pd

    envs = environments(df)
    ok = pd.concat([current(g) for _, g in envs]) if envs else df
    ok = ok[(ok["status"] == "ok") & ok["img_per_s"].map(_num).notna()].drop_duplicates("cell_id").copy()
    if ok.empty:
        return [], []
    ok["setting"] = ok.apply(kernel_setting, axis=1)
    settings = sorted(ok["setting"].unique(), key=lambda t: (t != "fused", t))
    if len(settings) < 2:
        return settings, []
    rows = []
    keys = [k for k in GROUP if k not in KERNEL] + ["method", "budget"]
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


# --- a model's section -----------------------------------------------------------------------------


def _notes(group) -> list[str]:
    """The lines under a model's table: the baseline when there was a choice, failures, off-target
    cells, halved throughput batches and superseded method versions."""
    cur = current(group)
    lines = _baseline_notes(group)
    for r in sorted(_records(cur[~cur["status"].isin(MEASURED)]), key=_cell_order):
        lines.append(f"- {r['method']} @ {r['budget']}: {r['status']}: {r.get('error')}")
    for r in sorted(_records(cur[cur["status"] == "off_target"]), key=_cell_order):
        lines.append(_off_target_note(r))
    for r in sorted(_records(cur[cur["status"].isin(MEASURED)]), key=_cell_order):
        used, asked = _num(r.get("throughput_batch_size")), _num(r.get("throughput_batch_size_requested"))
        if used and asked and used < asked:
            lines.append(f"- {r['method']} @ {r['budget']}: timed at throughput batch {int(used)}, not {int(asked)} "
                         "(out of memory)")
    return lines + _duplicate_notes(group) + _superseded_notes(group)


def _duplicate_notes(group) -> list[str]:
    lines = []
    for (method, budget), ids in sorted(duplicates(group).items(), key=lambda kv: (budget_order(kv[0][1]), kv[0][0])):
        lines.append(f"- {method} @ {budget}: {len(ids)} records of one configuration (a re-run; cells {', '.join(ids)}): "
                     f"reported once, from cell {ids[0]} (measured first, then the newest); the others are not compared")
    return lines


def _baseline_notes(group) -> list[str]:
    bases = _baselines(group)
    if not bases:
        return [_missing_baseline_note(group)] if len(group) else []
    if len(bases) == 1:
        return []
    b = bases[0]
    return [f"- baseline: the newest of {len(bases)} ok `none` records (cell {b.get('cell_id')}, "
            f"{b.get('timestamp') or 'no timestamp'}); the others are not compared"]


def _missing_baseline_note(group) -> str:
    """Why the table has no Δ top-1, and what the speed-ups it shows rest on."""
    cur = current(group)
    timed = any(_stored_speedup(r) is not None for r in _records(cur[cur["status"] == "ok"]))
    speed = ("the speed-ups are interleaved with the unpatched model inside each cell and need no `none`" if timed
             else "no speed-up either: none was timed interleaved")
    if (cur["method"] == BASELINE).any():
        return f"- `none` did not end ok here (its line below says why): no Δ top-1; {speed}"
    return f"- no `none` cell in this run: add none to --methods for Δ top-1; {speed}"


def _off_target_note(r: dict) -> str:
    gmacs, target = _num(r.get("gmacs")), _num(r.get("gmacs_target"))
    off = _num(r.get("gmacs_off_pct"))
    if off is None and gmacs and target:
        off = 100 * (gmacs / target - 1)
    return (f"- {r['method']} @ {r['budget']}: off target: {_fmt(gmacs, '{:.3f}')} GMACs achieved, "
            f"{_fmt(target, '{:.3f}')} targeted ({_fmt(off, '{:+.1f}')} %); on the accuracy-vs-GMACs curves, "
            "not in the matched-budget rows")


def _superseded_notes(group) -> list[str]:
    by_version: dict[tuple, set] = {}
    for r in _records(group[_superseded_mask(group)]):
        by_version.setdefault((r["method"], str(r["method_version"])), set()).add(str(r["budget"]))
    lines = []
    for method, version in sorted(by_version, key=lambda mv: (mv[0], version_key(mv[1]))):
        budgets = ", ".join(sorted(by_version[method, version], key=budget_order))
        lines.append(f"- {method} @ {budgets}: superseded (method version {version}), not compared")
    return lines


def _env_line(env: dict, group) -> str:
    """What environment a section is: data, images, device, dtype, versions, batches, kernels, git."""
    cur = current(group)
    n = cur["n_images"].map(_num).dropna()
    gits = sorted({str(v) for v in cur["git_sha"] if _norm(v) is not None})
    parts = [f"data `{env['data']}`", f"{int(n.max()) if len(n) else 'no'} images", str(env["device_name"]),
             str(env["dtype"])]
    parts += [_label_part(k, env[k]) for k in ("torch", "timm", "batch_size", "throughput_batch_size_requested",
                                               "attention", "sdpa_backend", "prop_attn", "compile", "checkpoint_sha",
                                               "eval_set_sha")
              if env[k] is not None or k in ("torch", "timm")]
    text = ", ".join(parts) + (f"; git {', '.join(gits)}" if gits else "")
    if env["differs"]:
        text += "; told apart from the model's other environments by " + ", ".join(
            _label_part(k, env[k]) for k in env["differs"])
    return text


def _model_section(env: dict, group, scored: bool, load: Callable, reports_dir: Path) -> tuple[list[str], list[dict]]:
    """A model's Markdown (heading, environment, table, notes, pairwise tests) and its pairwise rows; writes its CSV and LaTeX."""
    import pandas as pd

    rows = model_rows(group, load)
    table = TABLE if scored else SPEED_TABLE
    parts = [f"## {env['label']}", "", _env_line(env, group), ""]
    parts += [markdown_table(rows, table) if rows else "(no successful cells)", ""]
    parts += _notes(group) + [""]
    pairs = pairwise(group, load) if scored else []
    if any(p["p_mcnemar"] is not None for p in pairs):
        parts += ["Pairwise, each two methods of a budget (exact McNemar on paired predictions; Holm and BH "
                  "adjusted within the budget; † not significant: Holm p ≥ 0.05):", "", pairwise_markdown(pairs), ""]
    elif pairs:
        parts += ["Pairwise tests between methods: not available (no paired prediction files).", ""]
    _write(reports_dir / "tables" / f"{env['slug']}.csv", pd.DataFrame(csv_rows(rows, env)).to_csv(index=False))
    _write(reports_dir / "tables" / f"{env['slug']}.tex", latex_table(rows, f"{env['label']}: {_env_line(env, group)}", table))
    return parts, [{"environment": env["label"], **{k: env[k] for k in GROUP}, **{k: _rounded(k, v) for k, v in p.items()}}
                   for p in pairs]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def build_report(results_dir: Path, reports_dir: Path, html: bool = True) -> str:
    """Write every table (see the module docstring) under ``reports_dir``; return the Markdown.

    With ``html``, also ``report.html`` (:mod:`harness.reporting.html_report`), with the figures already in
    ``<reports_dir>/figures`` inlined: write the figures first to have them there.
    """
    import pandas as pd

    df = load_frame(results_dir)
    reports_dir = Path(reports_dir)
    envs = environments(df)
    load = _loader()
    parts = ["# Results", "", f"From {len(df)} stored records in `{results_dir}`.", "", LEGEND, ""]
    parts += _model_parts(envs, reports_dir, load)
    parts += _control_parts(scored_envs(envs), reports_dir, load)
    parts += _summary_parts(envs, reports_dir, load)
    parts += _kernel_parts(df, reports_dir)
    parts += _protocol_parts(df, results_dir, reports_dir)
    parts += _unmeasured_parts(envs)
    text = "\n".join(parts)
    _write(reports_dir / "results.md", text)
    if html:
        from harness.reporting.html_report import write_html

        write_html(text, reports_dir)
    df.drop(columns=[c for c in ("traceback", "results_dir") if c in df]).to_csv(reports_dir / "results.csv", index=False)
    log.info("report written to %s", reports_dir)
    return text


def _model_parts(envs, reports_dir: Path, load) -> list[str]:
    """One section per model environment, and every pairwise test of them in ``pairwise.csv``."""
    import pandas as pd

    scored = {id(g) for _, g in scored_envs(envs)}
    parts, pair_rows = [], []
    for env, group in envs:
        section, pairs = _model_section(env, group, id(group) in scored, load, reports_dir)
        parts += section
        pair_rows += pairs
    pair_cols = ["environment", *GROUP, "budget", "method_a", "method_b", "top1_a", "top1_b", "d_top1", "b", "c",
                 "p_mcnemar", "p_holm", "q_bh", "significant"]
    _write(reports_dir / "pairwise.csv", pd.DataFrame(pair_rows, columns=pair_cols).to_csv(index=False))
    return parts


def _kernel_parts(df, reports_dir: Path) -> list[str]:
    """The same cells under each attention kernel stored (``kernels.csv``), where there are several."""
    import pandas as pd

    settings, krows = kernel_comparison(df)
    if not krows:
        return []
    pd.DataFrame(krows).round(3).to_csv(reports_dir / "kernels.csv", index=False)
    return ["## Attention kernels", "", "Model-only img/s of the same cell under each attention kernel and "
            "compile setting stored; the last columns: the default (fused SDPA) over the others.", "",
            kernel_markdown(settings, krows), ""]


def fine_tuned(df) -> bool:
    """Whether any stored record was fine-tuned (records before protocols existed are off the shelf)."""
    return "protocol" in df and bool(df["protocol"].map(lambda p: p not in (None, OFF_THE_SHELF) and p == p).any())


def _protocol_parts(df, results_dir: Path, reports_dir: Path) -> list[str]:
    """Each fine-tuned cell beside its off-the-shelf partner (``protocol_pairs.csv``), where there are any."""
    from harness.reporting.protocol_report import pairs_markdown, protocol_pairs

    if not fine_tuned(df):  # the raw records are read again only where there is something to pair
        return []
    rows = protocol_pairs(ResultStore(results_dir).load_all(), Path(results_dir))
    if not rows:
        return []
    with open(reports_dir / "protocol_pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return ["## Off the shelf vs fine-tuned", "", "Each fine-tuned cell beside the same method, model and "
            "budget off the shelf, on the same images: 95 % Wilson intervals, exact McNemar p "
            "(b: only off the shelf right, c: only fine-tuned right; † p >= 0.05). Curves: "
            "`figures/training_curves.png`.", "", pairs_markdown(rows), ""]


def unmeasured(envs: list[tuple[dict, object]]) -> list[dict]:
    """Every compared cell that is not in the matched-budget tables (``unsupported``, ``off_target``,
    ``skipped``, ``error``), with its reason: model, budget, method, status, reason."""
    rows = []
    for env, group in envs:
        cur = current(group)
        for r in sorted(_records(cur[cur["status"] != "ok"]), key=_cell_order):
            reason = _off_target_note(r).split(": ", 1)[1] if r["status"] == "off_target" else r.get("error")
            rows.append({"model": env["label"], "budget": str(r["budget"]), "method": r["method"], "status": r["status"],
                         "reason": str(reason or "-").replace("|", "/").replace("\n", " ")})
    return rows


def _unmeasured_parts(envs) -> list[str]:
    from tabulate import tabulate

    rows = unmeasured(envs)
    if not rows:
        return []
    return ["## Cells not in the tables", "", "Every cell without a matched-budget measurement, with its reason.", "",
            tabulate([list(r.values()) for r in rows], headers=list(rows[0]), tablefmt="github",
                     disable_numparse=True), ""]


def _control_parts(envs, reports_dir: Path, load: Callable) -> list[str]:
    """The section on each method against its random control; writes ``controls.csv`` and ``.tex``."""
    import pandas as pd

    rows = controls(envs, load)
    pd.DataFrame([{k: _rounded(k, r[k]) for k in CONTROL_COLUMNS} for r in rows], columns=CONTROL_COLUMNS).to_csv(
        reports_dir / "controls.csv", index=False)
    _write(reports_dir / "controls.tex", controls_latex(rows))
    if not rows:
        return []
    return ["## Each method against its random control", "",
            "Random pruning at the method's own token schedule (`random@<method>`, same images): the difference "
            "in top-1, points, with Newcombe's 95 % interval for paired proportions; exact McNemar p, Holm and BH "
            f"adjusted over these {len(rows)} tests (one family); † not significant (Holm p ≥ 0.05).", "",
            controls_markdown(rows), ""]


def scored_envs(envs: list[tuple[dict, object]]) -> list[tuple[dict, object]]:
    """The environments with an accuracy figure (synthetic speed-only data has none)."""
    return [(e, g) for e, g in envs if g["top1"].map(_num).notna().any()]


def _summary_parts(envs, reports_dir: Path, load: Callable) -> list[str]:
    import pandas as pd

    envs = scored_envs(envs)
    cols, rows = summary(envs, load)
    pd.DataFrame(_summary_tidy(cols, rows), columns=["column", "method", "top1", "top1_ci_low", "top1_ci_high", "d_top1",
                                                     "p_mcnemar", "p_holm", "q_bh", "significant", "best", "tie"]).to_csv(
        reports_dir / "summary.csv", index=False)
    _write(reports_dir / "summary.tex", summary_latex(cols, rows))
    methods, at_rows = accuracy_at_gmacs(envs)
    pd.DataFrame(at_rows).round(3).to_csv(reports_dir / "accuracy_at_gmacs.csv", index=False)
    _write(reports_dir / "accuracy_at_gmacs.tex", at_gmacs_latex(methods, at_rows))
    if not envs:
        return []
    out = ["## Summary across models at matched budgets", "",
           "top-1 % [95 % CI] (Δ against `none`, whose top-1 is the first row; † not significant: exact McNemar, "
           "Holm-adjusted within model × budget; **bold** and ≈ as in the model tables)", "",
           summary_markdown(cols, rows), ""]
    if at_rows:
        out += ["## Accuracy at equal GMACs", "", "Each method's top-1 read off its accuracy-vs-GMACs curve "
                "(its cells, off-target ones included at their achieved GMACs, and the baseline; linear interpolation, "
                "at most 2 % beyond its ends) at each budget's target, with the two neighbouring cells' 95 % Wilson "
                "bounds read off alike (an approximate interval). No best is marked: interpolated values have no "
                "paired test. The baseline's top-1 is measured.", "", at_gmacs_markdown(methods, at_rows), ""]
    return out
