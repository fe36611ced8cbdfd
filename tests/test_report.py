"""Tables from the stored records in tests/fixtures: numbers checked against the records by hand."""
import csv
import json
from pathlib import Path

import pytest

from harness.report import accuracy_at, budget_order, build_report, tex_escape

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


def test_best_per_budget(report):
    out, _ = report
    _, rows = _table(out, "deit_tiny_cifar10")
    best = {(r["budget"], r["method"]) for r in rows if r["best"] == "True"}
    # 0.9: evit 81.8 > tome 81.6 > random 80.4; 0.7 and 0.5: tome; the baseline is never "best"
    assert best == {("0.9", "evit"), ("0.7", "tome"), ("0.5", "tome")}


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
    assert "**81.00**" in line and "−0.80 ↓" in line and "1.26x" in line
    assert "+0.60 ↑" in md  # tome on deit_small beats its baseline
    assert "- diffrate @ 0.7: error: RuntimeError: boom" in md
    assert "- tome @ 0.1: skipped" in md
    assert (out_md := report[0] / "results.md").read_text() == md and out_md.stat().st_size > 0


def test_latex_table_is_booktabs_and_matches(report):
    out, _ = report
    path, _ = _table(out, "deit_tiny_cifar10")
    tex = path.with_suffix(".tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\begin{tabular}") == 1
    rows = [l for l in tex.splitlines() if l.endswith(r"\\")]
    assert {l.count("&") for l in rows} == {10}  # eleven columns in every row
    tome = next(l for l in rows if " & tome & r=9 " in l)
    assert r"\textbf{81.00}" in tome and r"$-$0.80\,$\downarrow$" in tome and r"1.26$\times$" in tome
    assert r"keep\_rate" in tex and "_" not in tex.replace(r"\_", "").split(r"\begin{tabular}")[1]


def test_summary_and_accuracy_at_gmacs(report):
    out, md = report
    summary = _csv(out / "summary.csv")
    tome = next(r for r in summary if r["method"] == "tome" and r["column"] == "deit_small_cifar10 @ 0.7")
    assert float(tome["top1"]) == 77.0 and float(tome["d_top1"]) == pytest.approx(0.6) and tome["best"] == "True"
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
