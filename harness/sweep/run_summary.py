"""The short summary ``run`` ends with: what the sweep's cells came to, and where the full report is.

Everything here fits a 100-column terminal (:data:`WIDTH`); the full tables stay in the files
:func:`harness.reporting.report.build_report` writes. From stored records only, like the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from harness.reporting.report import BASELINE, environments, load_frame, model_rows

WIDTH = 100
# the statuses counted, in the order printed; "failed" is the store's "error"
STATUSES = (("ok", "ok"), ("off_target", "off_target"), ("unsupported", "unsupported"), ("skipped", "skipped"),
            ("error", "failed"))


def status_counts(records: list[Optional[dict]]) -> str:
    """``80 cells: 76 ok, 4 off_target, 0 unsupported, 0 skipped, 0 failed`` (a None record: not stored)."""
    statuses = [r.get("status") if r else None for r in records]
    parts = [f"{statuses.count(s)} {name}" for s, name in STATUSES]
    known = {s for s, _ in STATUSES}
    missing = sum(s not in known for s in statuses)
    if missing:  # held by another sweep, or a status this summary does not know
        parts.append(f"{missing} not stored")
    return f"{len(records)} cells: " + ", ".join(parts)


def _interval(row: dict) -> str:
    low, high = row.get("top1_ci_low"), row.get("top1_ci_high")
    return f"{row['top1']:.1f}" + (f" [{low:.1f}, {high:.1f}]" if low is not None and high is not None else "")


def best_text(rows: list[dict]) -> str:
    """One budget's highest top-1 with its interval, and whether it is a best or a tie.

    A best is significantly above every other method of the budget (Holm-adjusted pairwise McNemar:
    the report's ``best``); otherwise the highest is tied with every method not significantly below
    it (the report's ``tie``), named after it.

    Args:
        rows: the table rows of one budget (:func:`harness.reporting.report.model_rows`), ``none`` excluded.
    """
    scored = sorted((r for r in rows if r.get("top1") is not None), key=lambda r: (-r["top1"], r["method"]))
    if not scored:
        return "no top-1"
    top = scored[0]
    if top.get("best"):
        return f"{top['method']} {_interval(top)} (significantly above every other, Holm)"
    tied = [r["method"] for r in scored[1:] if r.get("tie")]
    if not tied:
        return f"{top['method']} {_interval(top)}"
    names = ", ".join(tied[:2]) + (f" +{len(tied) - 2} more" if len(tied) > 2 else "")
    return f"{top['method']} {_interval(top)}, tied with {names}"  # "tied": the header says what it means


def best_lines(results_dir: Path, cell_ids: set[str]) -> list[str]:
    """Per model (environment) and budget of the sweep's cells: the highest top-1, a best or tied."""
    df = load_frame(results_dir)
    df = df[df["cell_id"].isin(cell_ids)]
    if not len(df):
        return []
    lines = []
    for env, group in environments(df):
        by_budget: dict[str, list[dict]] = {}
        for row in model_rows(group):
            if row["method"] != BASELINE:
                by_budget.setdefault(row["budget"], []).append(row)
        lines += [_fit(f"  {env['label']} @ {budget}: {best_text(rows)}") for budget, rows in by_budget.items()]
    if lines:
        lines.insert(0, "highest top-1 % [95 % interval] per model and budget (best: significantly above all others;\n"
                     "  tied: the others not significantly below it; exact McNemar, Holm-adjusted)")
    return lines


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (shorter), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[:WIDTH - 3] + "..."


def run_summary(records: list[Optional[dict]], results_dir: Path, reports_dir: Optional[Path], figures: int,
                cell_ids: set[str]) -> list[str]:
    """The lines ``run`` ends with: status counts, the best method per model and budget, where the files are.

    Args:
        records: the stored record of each of the sweep's cells (None: not stored).
        results_dir: where the records are.
        reports_dir: where the report and (``figures`` > 0) its figures were written; None: no report
            (``--no-report``), no best lines either.
        figures: how many figure files were written.
        cell_ids: the sweep's cell ids (the best lines read only these).
    """
    lines = [_fit("done: " + status_counts(records))]
    if reports_dir is not None and any(records):
        lines += best_lines(results_dir, cell_ids)
    # a path stands alone on its line, never cut (a cut path names nothing)
    if reports_dir is not None:
        figs = f", figures/ ({figures} files)" if figures else ""
        lines += [f"full report: results.md, report.html, results.csv, tables/, summary.*{figs}, in",
                  f"  {_shown(reports_dir)}"]
    lines += ["records in", f"  {_shown(Path(results_dir) / 'records')}"]
    return lines
