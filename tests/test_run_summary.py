"""What ``run`` prints: the progress line's ETA, ``--quick``'s settings, and the short summary at the end."""
import json
import re

import pytest

from harness.cli import _parser, main, quick_overrides
from harness.sweep.config import QUICK_RUN
from harness.progress import duration_text, eta_text
from harness.reporting.report import build_report
from harness.sweep.run_summary import WIDTH, best_text, status_counts


def test_eta_is_the_mean_finished_cell_time_the_cells_left():
    assert eta_text([], 80) == "0 done, 80 left"  # no cell finished: no ETA to give
    assert eta_text([10.0, 20.0], 4) == "2 done, 4 left, ETA ~1 min 00 s"
    assert eta_text([3.0], 0) == "1 done, 0 left"
    assert [duration_text(s) for s in (0.4, 59, 61, 3725)] == ["0 s", "59 s", "1 min 01 s", "1 h 02 min"]


def test_quick_fills_what_the_flags_leave_and_explicit_flags_win():
    given = {"limit": None, "calib_limit": None, "throughput_repeats": None, "device": "cpu"}
    run, methods = quick_overrides(True, given, None)
    assert run == {**QUICK_RUN, "device": "cpu"} and methods == ["all"]
    run, methods = quick_overrides(True, {**given, "limit": 40, "throughput_repeats": 5}, ["tome"])
    assert run["limit"] == 40 and run["throughput_repeats"] == 5 and run["calib_limit"] == QUICK_RUN["calib_limit"]
    assert methods == ["tome"]
    assert quick_overrides(False, given, None) == (given, None)


def test_quick_is_documented_in_run_help(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["run", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--quick" in out and f"--limit {QUICK_RUN['limit']} --calib-limit {QUICK_RUN['calib_limit']}" in out


def test_quick_cells_are_not_full_cells(tmp_path, shared):
    """limit and calib_limit are in a cell's id: a quick sweep never finds (or is taken for) a full one."""
    from harness.sweep.config import load_config
    from harness.paths import default_config
    from harness.sweep.runner import Sweep, override

    base = load_config(default_config())
    full = override(base, {"device": "cpu", "results_dir": str(tmp_path), "limit": 200}, {"methods": ["diffrate", "tome"]})
    quick = override(base, {"device": "cpu", "results_dir": str(tmp_path), **QUICK_RUN}, {"methods": ["diffrate", "tome"]})
    ids = [{Sweep(c).cell_id(cell): cell for cell in Sweep(c).cells} for c in (full, quick)]
    assert len(ids[0]) == len(ids[1]) > 0 and not set(ids[0]) & set(ids[1])


def _row(method, top1, low, high, best=False, tie=False):
    return {"method": method, "top1": top1, "top1_ci_low": low, "top1_ci_high": high, "best": best, "tie": tie}


def test_best_only_when_significant_else_the_ties_are_named():
    apart = [_row("tome", 91.0, 84.0, 95.0, best=True), _row("evit", 60.0, 50.0, 69.0)]
    assert best_text(apart) == "tome 91.0 [84.0, 95.0] (significantly above every other, Holm)"
    close = [_row("tome", 91.0, 84.0, 95.0, tie=True), _row("topk", 88.0, 80.5, 93.0, tie=True),
             _row("evit", 60.0, 50.0, 69.0)]
    assert best_text(close) == "tome 91.0 [84.0, 95.0], tied with topk"
    tied = [_row(m, 90.0, 80.0, 95.0, tie=True) for m in "abcd"]
    assert best_text(tied) == "a 90.0 [80.0, 95.0], tied with b, c +1 more"


def test_status_counts_name_every_status():
    recs = [{"status": "ok"}] * 3 + [{"status": "off_target"}, {"status": "error"}, None]
    assert status_counts(recs) == ("6 cells: 3 ok, 1 off_target, 0 unsupported, 0 skipped, 1 failed, 1 not stored")


def _records_without_none(tmp_path, none_failed: bool):
    common = {"model": "m", "data": "cifar10", "limit": 8, "eval_set_sha": "e", "device_name": "cpu", "dtype": "fp32",
              "batch_size": 8, "throughput_batch_size": 8, "torch": "2", "timm": "1", "status": "ok", "error": None,
              "gmacs_baseline": 1.0, "method_version": "1", "method_options": {}, "n_images": 8,
              "timestamp": "2026-01-01T00:00:00+00:00", "budget": "0.7", "gmacs": 0.7, "gmacs_target": 0.7}
    recs = [{**common, "cell_id": "a", "method": "tome", "top1": 0.75, "img_per_s": 10.0,
             "speedup_median": 1.3, "speedup_q1": 1.2, "speedup_q3": 1.4}]
    if none_failed:
        recs.append({**common, "cell_id": "n", "method": "none", "budget": "baseline", "status": "error",
                     "error": "RuntimeError: boom"})
    (tmp_path / "records").mkdir()
    for rec in recs:
        (tmp_path / "records" / f"{rec['cell_id']}.json").write_text(json.dumps(rec))


@pytest.mark.parametrize("none_failed", [False, True])
def test_a_missing_none_note_agrees_with_the_speedups_shown(tmp_path, none_failed):
    _records_without_none(tmp_path, none_failed)
    md = build_report(tmp_path, tmp_path / "rep")
    assert "1.30x" in md  # the speed-up is in the table ...
    assert "no speed-up" not in md  # ... so no note denies it
    assert "need no `none`" in md
    if none_failed:
        assert "`none` did not end ok here" in md and "add none to --methods" not in md
    else:
        assert "add none to --methods for Δ top-1" in md


def test_report_legend_lines_are_short_and_say_img_s_and_speed_up_are_different_timings(tmp_path):
    _records_without_none(tmp_path, False)
    md = build_report(tmp_path, tmp_path / "rep")
    legend = [line for line in md.splitlines() if line.startswith("- ")]
    assert any("different timings" in line for line in legend)
    assert max(len(line) for line in md.splitlines()[:14]) < 300  # was one 976-character line


@pytest.mark.slow
def test_run_ends_with_a_short_summary_and_writes_figures(capsys, tmp_path, shared):
    results = tmp_path / "results"
    argv = ["run", "--models", "deit_tiny_cifar10", "--methods", "tome,evit", "--budgets", "0.7", "--limit", "8",
            "--device", "cpu", "--repeats", "3", "--results", str(results)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    tail = out[out.index("done: "):].splitlines()
    assert len(tail) <= 12 and max(len(line) for line in tail) <= WIDTH, tail
    assert tail[0].startswith("done: 2 cells: 2 ok, 0 off_target, 0 unsupported, 0 skipped, 0 failed")
    assert any(line.lstrip().startswith("deit_tiny_cifar10 @ 0.7: ") for line in tail)
    report = results / "reports" / "results.md"
    said = tail.index(f"  {results / 'reports'}") - 1  # the reports folder, on its own line
    assert tail[said].startswith("full report: results.md") and report.is_file()
    assert "# Results" not in out  # the tables went to the file only
    figures = sorted((results / "reports" / "figures").glob("*.png"))
    assert figures and f"figures/ ({len(list((results / 'reports' / 'figures').iterdir()))} files)" in tail[said]
    assert re.search(r"^\[2/2\] deit_tiny_cifar10 \| \w+ \| 0\.7  \(1 done, 1 left, ETA ~\d[^)]*\)$", out, re.M), out
    assert "add none to --methods for Δ top-1" in report.read_text()
