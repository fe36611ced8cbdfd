"""Tables from stored records: the old-format records in tests/fixtures and a sweep in the current
format (tests/fixtures/sweep.py, with prediction files), numbers checked against them by hand."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from harness.reporting.report import NOISY_SPREAD, accuracy_at, budget_order, build_report, tex_escape, version_key
from harness.measurement.stats import wilson

FIXTURES = Path(__file__).parent / "fixtures"
CPU = "cpu (x86_64, 2 threads)"


def _record(model, method, budget, device=CPU):
    for p in (FIXTURES / "records").glob("*.json"):
        r = json.loads(p.read_text())
        if (r["model"], r["method"], r["budget"], r["device_name"]) == (model, method, budget, device):
            return r
    raise KeyError((model, method, budget, device))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    md = build_report(FIXTURES, out)
    return out, md


def _cells(line):
    """A Markdown table row's cells, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _table(out, model, device=CPU):
    for p in sorted((out / "tables").glob(f"{model}*.csv")):
        rows = _csv(p)
        if rows and rows[0]["device_name"] == device:
            return p, rows
    raise KeyError(model)


def test_csv_numbers_match_records(report):
    out, _ = report
    _, rows = _table(out, "deit_tiny_cifar10")
    base, tome = _record("deit_tiny_cifar10", "none", "baseline"), _record("deit_tiny_cifar10", "tome", "0.7")
    row = next(r for r in rows if r["method"] == "tome" and r["budget"] == "0.7")
    assert float(row["top1"]) == pytest.approx(81.0)
    assert float(row["d_top1"]) == pytest.approx(-0.8)  # 81.0 - 81.8 by hand
    assert float(row["d_top1"]) == pytest.approx(100 * (tome["top1"] - base["top1"]), abs=0.005)
    assert float(row["speedup"]) == pytest.approx(tome["img_per_s"] / base["img_per_s"], abs=1e-3)  # 55 / 43.5
    assert float(row["ideal_speedup"]) == pytest.approx(tome["gmacs_baseline"] / tome["gmacs"], abs=1e-3)
    assert float(row["gmacs"]) == pytest.approx(tome["gmacs"])
    assert row["knob"] == f"r={tome['knob_value']}"


def test_no_best_without_a_test_only_ties(report):
    out, md = report
    _, rows = _table(out, "deit_tiny_cifar10")
    # old records carry no predictions: no paired test, so the highest of a budget is never "best",
    # and every method is tied with it (0.9: evit 81.8, tome 81.6, random 80.4); the baseline never is
    assert not any(r["best"] == "True" for r in rows)
    ties = {(r["budget"], r["method"]) for r in rows if r["tie"] == "True"}
    assert ("0.9", "evit") in ties and ("0.9", "random") in ties and ("baseline", "none") not in ties
    assert "**" not in md.split("## Summary")[0].split("\n", 4)[-1].replace("**Bold**", "")


def test_environments_never_mix(report):
    out, md = report
    _, gpu = _table(out, "deit_tiny_cifar10", "NVIDIA H100 80GB HBM3")
    assert [(r["method"], r["budget"]) for r in gpu] == [("none", "baseline"), ("tome", "0.7")]
    tome = next(r for r in gpu if r["method"] == "tome")
    assert float(tome["d_top1"]) == pytest.approx(81.2 - 82.0)  # against the GPU baseline, not the CPU one
    assert float(tome["speedup"]) == pytest.approx(11500 / 9000, abs=1e-3)
    assert md.count("## deit_tiny_cifar10 (") == 2


def test_markdown_markers_and_failures(report):
    _, md = report
    section = md.split("## deit_tiny_cifar10 (cpu")[1].split("## ")[0]
    line = next(l for l in section.splitlines() if l.startswith("| 0.7") and "| tome " in l)
    assert "81.00 ≈" in line and "−0.80 ↓" in line and "1.26x" in line
    assert "+0.60 ↑" in md  # tome on deit_small beats its baseline
    assert "- diffrate @ 0.7: error: RuntimeError: boom" in md
    assert "- tome @ 0.1: skipped" in md
    # old records: the interval from top1 and n_images, no paired test, a speed-up timed apart
    assert "81.00 ≈ [77.3, 84.2]" in line and "1.26x ‡" in line  # Wilson 405/500 (test_stats checks the formula)
    assert "†" not in section and _cells(line)[6] == "-"  # the p column
    gpu = md.split("## deit_tiny_cifar10 (H100")[1].split("## ")[0]
    assert "tome @ 0.1" not in gpu  # the skip, which names no torch, joins only the environment it fits
    assert (out_md := report[0] / "results.md").read_text() == md and out_md.stat().st_size > 0


def test_latex_table_is_booktabs_and_matches(report):
    out, _ = report
    path, _ = _table(out, "deit_tiny_cifar10")
    tex = path.with_suffix(".tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\begin{tabular}") == 1
    rows = [l for l in tex.splitlines() if l.endswith(r"\\")]
    assert {l.count("&") for l in rows} == {13}  # fourteen columns in every row
    tome = next(l for l in rows if " & tome & r=9 " in l)
    assert r"81.00\,$\approx$ {\scriptsize [77.3, 84.2]}" in tome and r"$-$0.80\,$\downarrow$" in tome
    assert r"1.26$\times$\,\ddag" in tome
    assert r"keep\_rate" in tex and "_" not in tex.replace(r"\_", "").split(r"\begin{tabular}")[1]


def test_summary_and_accuracy_at_gmacs(report):
    out, md = report
    summary = _csv(out / "summary.csv")
    tome = next(r for r in summary if r["method"] == "tome" and r["column"] == "deit_small_cifar10 @ 0.7")
    # the highest of its budget, but with no paired test it is a tie, not a best
    assert float(tome["top1"]) == 77.0 and float(tome["d_top1"]) == pytest.approx(0.6)
    assert (tome["best"], tome["tie"]) == ("False", "True")
    at = _csv(out / "accuracy_at_gmacs.csv")
    small = next(r for r in at if r["model"] == "deit_small_cifar10")
    t, b = _record("deit_small_cifar10", "tome", "0.7"), _record("deit_small_cifar10", "none", "baseline")
    target = float(small["gmacs"])
    assert target == pytest.approx(t["gmacs_target"], abs=1e-3)
    # tome's curve: (3.272 GMACs, 77.0) to the baseline (4.598, 76.4); 3.219 lies 1.6 % below its end
    slope = (76.4 - 77.0) / (b["gmacs"] - t["gmacs"])
    assert float(small["tome"]) == pytest.approx(77.0 + slope * (target - t["gmacs"]), abs=1e-3)
    assert "## Accuracy at equal GMACs" in md and (out / "summary.tex").read_text().count(r"\cmidrule") == 3


def test_accuracy_at_interpolates_by_hand():
    curve = [(1.0, 70.0), (2.0, 80.0), (4.0, 82.0)]
    assert accuracy_at(curve, 1.5) == pytest.approx(75.0)
    assert accuracy_at(curve, 3.0) == pytest.approx(81.0)
    assert accuracy_at(curve, 4.0) == pytest.approx(82.0)
    assert accuracy_at(curve, 0.99) == pytest.approx(69.9)  # 1 % below the end: the end segment extends
    assert accuracy_at(curve, 0.9) is None and accuracy_at(curve, 4.2) is None and accuracy_at([], 1.0) is None


def test_budget_order_and_escape():
    assert sorted(["0.5", "r=13", "baseline", "0.9", "gmacs=2.9"], key=budget_order) == \
        ["baseline", "0.9", "0.5", "gmacs=2.9", "r=13"]
    assert tex_escape("keep_rate=50% & #1") == r"keep\_rate=50\% \& \#1"


def test_version_order():
    assert sorted(["10", "9", "2", "1@2", "1@1", "1"], key=version_key) == ["1", "1@1", "1@2", "2", "9", "10"]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep", FIXTURES / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The current-format sweep of tests/fixtures/sweep.py and its report."""
    root = tmp_path_factory.mktemp("sweep")
    recs = _sweep_module().write_sweep(root)
    md = build_report(root, root / "rep")
    return root / "rep", md, recs


def _section(md, heading):
    return md.split(f"## {heading}\n")[1].split("\n## ")[0]


def _md_row(section, budget, method):
    """The cells of a model table's row (the first table of the section)."""
    table = next(block for block in section.split("\n\n") if block.startswith("| budget"))
    return next(c for c in map(_cells, table.splitlines()) if c[:2] == [budget, method])


def _sweep_table(out, torch_version):
    return next(rows for p in sorted((out / "tables").glob("m-*.csv")) for rows in [_csv(p)]
                if rows[0]["torch"] == torch_version)


def test_superseded_version_is_listed_not_compared(sweep):
    out, md, _ = sweep
    a = _section(md, "m (torch 2.4.0)")
    rows = _sweep_table(out, "2.4.0")
    assert [(r["method"], r["budget"]) for r in rows] == [("none", "baseline"), ("tome", "0.7"), ("topk", "0.7")]
    tome = next(r for r in rows if r["method"] == "tome")
    assert float(tome["top1"]) == 79.0 and tome["cell_id"] == "tome"  # version 2, not version 1's 50 %
    assert "- tome @ 0.7: superseded (method version 1), not compared" in a
    assert "50.00" not in md
    results = _csv(out / "results.csv")
    assert {r["cell_id"] for r in results} >= {"tome_v1", "evit_off", "random_err"}  # every stored record


def test_each_torch_version_is_an_environment_with_its_own_baseline(sweep):
    out, md, _ = sweep
    assert md.count("## m (") == 2
    a, b = _sweep_table(out, "2.4.0"), _sweep_table(out, "2.5.0")
    # tome against its own environment's none: 79 - 80 under torch 2.4.0, 85 - 90 under 2.5.0
    assert float(next(r for r in a if r["method"] == "tome")["d_top1"]) == pytest.approx(-1.0)
    assert float(next(r for r in b if r["method"] == "tome")["d_top1"]) == pytest.approx(-5.0)
    # two ok none records under 2.4.0: the newer (80 %, day 2) is the baseline, and the report says so
    assert [r["cell_id"] for r in a if r["method"] == "none"] == ["base"]
    section = _section(md, "m (torch 2.4.0)")
    assert "- baseline: the newest of 2 ok `none` records (cell base, 2026-01-02" in section
    # git shas differ within 2.4.0 (a sweep resumed after a commit): one environment, the shas listed
    assert "git aaa, bbb, ccc" in section and "torch 2.4.0, timm 1.0.31, eval batch 64, throughput batch 8" in section
    assert "- random @ 0.7: error: RuntimeError: boom" in section


def test_off_target_cell_is_data_but_not_at_its_budget(sweep):
    out, md, recs = sweep
    a = _sweep_table(out, "2.4.0")
    assert "evit" not in {r["method"] for r in a}
    assert "evit" not in {r["method"] for r in _csv(out / "summary.csv")}
    stored = next(r for r in _csv(out / "results.csv") if r["cell_id"] == "evit_off")
    assert stored["status"] == "off_target" and float(stored["top1"]) == 0.7
    assert ("- evit @ 0.5: off target: 0.550 GMACs achieved, 0.500 targeted (+10.0 %)"
            in _section(md, "m (torch 2.4.0)"))
    # on evit's curve at its achieved GMACs: (0.55, 70) to the baseline (1.0, 80), read at tome's target 0.7
    at = next(r for r in _csv(out / "accuracy_at_gmacs.csv") if r["model"] == "m (torch 2.4.0)" and r["gmacs"] == "0.7")
    assert float(at["evit"]) == pytest.approx(70 + 10 * (0.7 - 0.55) / (1.0 - 0.55), abs=1e-3)  # 73.333
    assert float(at["baseline_top1_ci_low"]) == pytest.approx(100 * wilson(160, 200)[0], abs=1e-3)


def test_significance_mark_exactly_when_p_at_least_five_percent(sweep):
    out, md, _ = sweep
    a = _section(md, "m (torch 2.4.0)")
    tome, topk = _md_row(a, "0.7", "tome"), _md_row(a, "0.7", "topk")
    # tome: b = 1, c = 3, p = 2 * (1 + 4) / 16 = 0.625; topk: b = 0, c = 30, p = 2 / 2^30
    assert tome[5] == "−1.00 ↓ †" and tome[6] == "0.625"
    assert topk[5] == "−15.00 ↓" and topk[6] == "<0.001"
    rows = {r["method"]: r for r in _sweep_table(out, "2.4.0")}
    assert float(rows["tome"]["p_mcnemar"]) == 0.625 and rows["tome"]["significant"] == "False"
    assert float(rows["topk"]["p_mcnemar"]) == pytest.approx(2 / 2 ** 30, rel=1e-3)
    assert rows["topk"]["significant"] == "True" and rows["none"]["p_mcnemar"] == ""
    # under torch 2.5.0: b = 0, c = 10, p = 2 / 1024 = 0.00195: significant, no mark
    b = _md_row(_section(md, "m (torch 2.5.0)"), "0.7", "tome")
    assert b[5] == "−5.00 ↓" and b[6] == "0.002"
    # the interval: Wilson on 158 of 200
    low, high = wilson(158, 200)
    assert tome[4] == f"**79.00** [{100 * low:.1f}, {100 * high:.1f}]" == "**79.00** [72.8, 84.1]"
    assert float(rows["tome"]["top1_ci_high"]) == pytest.approx(100 * high, abs=0.005)
    # the summary carries the same marks
    summary = {(r["column"], r["method"]): r for r in _csv(out / "summary.csv")}
    assert summary[("m (torch 2.4.0) @ 0.7", "tome")]["significant"] == "False"
    assert "(−1.00 ↓ †)" in md.split("## Summary")[1] and "(−15.00 ↓)" in md.split("## Summary")[1]


def test_pairwise_tests_between_methods(sweep):
    out, md, _ = sweep
    (row,) = _csv(out / "pairwise.csv")
    # tome right on 3..160, topk on 0..129: only tome right on 130..160 (31), only topk on 0..2 (3)
    assert (row["method_a"], row["method_b"], row["b"], row["c"]) == ("tome", "topk", "31", "3")
    # p = 2 * (C(34,0) + C(34,1) + C(34,2) + C(34,3)) / 2^34 = 2 * 6580 / 2^34
    assert float(row["p_mcnemar"]) == pytest.approx(2 * 6580 / 2 ** 34, rel=1e-3) and row["significant"] == "True"
    pairs = _section(md, "m (torch 2.4.0)").split("Pairwise, each two methods")[1]
    line = next(c for c in map(_cells, pairs.splitlines()) if c[:3] == ["0.7", "tome", "topk"])
    assert line[5:] == ["+14.00 ↑", "31", "3", "<0.001", "<0.001", "<0.001"]  # one test: Holm = BH = raw p


def test_noisy_flag_when_rounds_spread_more_than_ten_percent(sweep):
    out, md, _ = sweep
    assert NOISY_SPREAD == 0.10
    a = _section(md, "m (torch 2.4.0)")
    # tome: rounds 1.2..1.6, median 1.4, quartiles 1.3 / 1.5: spread 0.2 / 1.4 = 14 %
    # topk: only rounds stored, 1.49 1.50 1.50 1.51 1.52: quartiles 1.50 / 1.51, spread 0.7 %
    assert _md_row(a, "0.7", "tome")[10] == "1.40x [1.30, 1.50] noisy"
    assert _md_row(a, "0.7", "topk")[10] == "1.50x [1.50, 1.51]"
    # realised: speed-up over ideal (1.0 / 0.7): 1.4 * 0.7 = 0.98, quartiles 0.91 and 1.05
    assert _md_row(a, "0.7", "tome")[12] == "0.98 [0.91, 1.05]"
    rows = {r["method"]: r for r in _sweep_table(out, "2.4.0")}
    assert rows["tome"]["noisy"] == "True" and float(rows["tome"]["speedup_spread"]) == pytest.approx(0.143, abs=1e-3)
    assert rows["topk"]["noisy"] == "False" and rows["topk"]["interleaved"] == "True"
    # no rounds under torch 2.5.0: img/s over none's, marked as not interleaved
    assert _md_row(_section(md, "m (torch 2.5.0)"), "0.7", "tome")[10] == "1.00x ‡"


def test_too_few_timing_rounds_read_n_a_with_the_reason(tmp_path):
    """A spread or a speed-up from fewer than 3 rounds is "n/a" (with why in the CSV), never a number."""
    from harness.measurement.measure import rate_stats, speedup_stats

    env = {k: v for k, v in _sweep_module()._env("2.4.0").items() if k not in ("limit", "eval_set_sha")}
    env.update(data="synthetic")
    common = {**env, "status": "ok", "error": None, "gmacs_baseline": 1.0, "method_version": "1", "git_sha": "x",
              "method_options": {}, "timestamp": "2026-01-01T00:00:00+00:00"}
    reduce = {"budget": "0.7", "gmacs": 0.7, "gmacs_target": 0.7, "knob": "r", "knob_value": 9}
    two = {**rate_stats([0.1, 0.2], 2), **speedup_stats([0.1, 0.2], [0.2, 0.3], 2), "throughput_repeats": 2}
    five = {**rate_stats([0.1, 0.11, 0.12, 0.1, 0.1], 2),
            **speedup_stats([0.1] * 5, [0.14, 0.15, 0.16, 0.15, 0.15], 2), "throughput_repeats": 5}
    assert two["img_per_s_iqr"] is None and "2 timing rounds" in two["img_per_s_iqr_na"]
    assert two["speedup_median"] is None and "needs at least 3" in two["speedup_na"]
    assert five["speedup_na"] is None and five["img_per_s_iqr_na"] is None and five["speedup_median"] == 1.5
    recs = [{**common, "cell_id": "base", "method": "none", "budget": "baseline", "gmacs": 1.0,
             **rate_stats([0.2] * 5, 2), "throughput_repeats": 5},
            {**common, **reduce, "cell_id": "two", "method": "tome", **two},
            {**common, **reduce, "cell_id": "five", "method": "topk", **five},
            # an older record, timed in 1 round: its stored quartiles (q1 = q3) never showed noise
            {**common, **reduce, "cell_id": "old", "method": "random", "img_per_s": 12.0, "img_per_s_iqr": 0.0,
             "throughput_repeats": 1, "speedup_rounds": [1.2], "speedup_median": 1.2, "speedup_q1": 1.2,
             "speedup_q3": 1.2, "timing_rounds": 1}]
    (tmp_path / "records").mkdir()
    for rec in recs:
        (tmp_path / "records" / f"{rec['cell_id']}.json").write_text(json.dumps(rec))
    md = build_report(tmp_path, tmp_path / "rep")
    header = next(line for line in md.splitlines() if line.startswith("| budget"))
    col = {h: i for i, h in enumerate(_cells(header))}
    rows = {c[1]: c for c in map(_cells, md.splitlines()) if len(c) == len(col) and c[0] == "0.7"}
    for method in ("tome", "random"):
        assert rows[method][col["speed-up [IQR]"]] == "n/a" and rows[method][col["IQR %"]] == "n/a"
    assert rows["topk"][col["speed-up [IQR]"]] == "1.50x [1.50, 1.50]" and rows["topk"][col["IQR %"]] not in ("n/a", "-")
    csv_rows = {r["method"]: r for p in (tmp_path / "rep" / "tables").glob("*.csv") for r in _csv(p)}
    assert "needs at least 3" in csv_rows["tome"]["speedup_na"] and csv_rows["tome"]["noisy"] == ""
    assert "1 timing round:" in csv_rows["random"]["speedup_na"] and "an IQR" in csv_rows["random"]["iqr_pct_na"]
    assert csv_rows["topk"]["speedup_na"] == "" and csv_rows["topk"]["noisy"] == "False"
    from harness.sweep.runner import summary_line

    line = summary_line({**recs[1], "gmacs_ratio": 0.7, "cell_s": 1.0})  # the terminal says it too
    assert "speed-up n/a (2 timing rounds: a speed-up needs at least 3)" in line
