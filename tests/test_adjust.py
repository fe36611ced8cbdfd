"""Adjusted p-values (Holm, Benjamini-Hochberg) against statsmodels, Newcombe's paired interval, the
"best" mark only after a significant adjusted test, and the README block generated from the report."""
import math
from pathlib import Path

import pytest
from statsmodels.stats.multitest import multipletests

from harness.measurement import stats
from harness.errors import HarnessError
from harness.reporting.report import environments, load_frame, mark_best, markdown_table, scored_envs, summary

P_FIXED = [0.01, 0.04, 0.03, 0.005, 0.5, 0.04, 0.2, 1.0, 0.0001, 0.049]


@pytest.mark.parametrize("ours,theirs", [(stats.holm, "holm"), (stats.benjamini_hochberg, "fdr_bh")])
def test_adjusted_p_equal_statsmodels(ours, theirs):
    for ps in (P_FIXED, [0.02], [0.3, 0.3, 0.3], [1e-12, 0.04, 0.06, 0.9]):
        expected = multipletests(ps, method=theirs)[1]
        assert ours(ps) == pytest.approx(list(expected), rel=1e-12, abs=1e-15)
    # an untested cell (None) stays None and does not count in the family
    with_gap = ours([0.01, None, 0.04])
    assert with_gap[1] is None and with_gap[::2] == pytest.approx(list(multipletests([0.01, 0.04], method=theirs)[1]))


def test_holm_by_hand():
    # m = 3: 0.01 * 3 = 0.03; 0.02 * 2 = 0.04; 0.04 * 1 = 0.04 (monotone)
    assert stats.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])


def test_newcombe_paired_interval():
    diff, low, high = stats.newcombe_paired(12, 9, 2, 21)
    assert diff == pytest.approx(7 / 44) and low < diff < high
    # swapping the two classifiers mirrors the interval
    d2, l2, h2 = stats.newcombe_paired(12, 2, 9, 21)
    assert (d2, l2, h2) == pytest.approx((-diff, -high, -low))
    # uncorrelated outcomes (phi = 0): the square-and-add of the two Wilson intervals (Newcombe's method 10)
    both, a, b, neither = 25, 25, 25, 25
    (l1, u1), (l2_, u2) = stats.wilson(50, 100), stats.wilson(50, 100)
    d, lo, hi = stats.newcombe_paired(both, a, b, neither)
    assert d == 0 and lo == pytest.approx(-math.hypot(0.5 - l1, u2 - 0.5)) and hi == pytest.approx(math.hypot(u1 - 0.5, 0.5 - l2_))
    # positively correlated outcomes (paired) give a narrower interval than independent ones
    _, lo_p, hi_p = stats.newcombe_paired(45, 5, 5, 45)
    assert hi_p - lo_p < hi - lo
    with pytest.raises(ValueError):
        stats.newcombe_paired(0, 0, 0, 0)


def _rows(top1s):
    return [{"budget": "0.7", "method": m, "top1": t, "top1_ci_low": t - 5, "top1_ci_high": t + 5, "knob": "-"}
            for m, t in top1s.items()]


def _pair(a, b, significant):
    return {"budget": "0.7", "method_a": a, "method_b": b, "significant": significant}


def test_best_bold_only_when_significantly_above_every_other():
    rows = _rows({"tome": 80.0, "evit": 70.0})
    mark_best(rows, [_pair("evit", "tome", True)])
    assert [r["best"] for r in rows] == [True, False] and "**80.00**" in markdown_table(rows)
    # the same numbers, the test not significant after adjustment: no bold, a tie
    rows = _rows({"tome": 80.0, "evit": 70.0})
    mark_best(rows, [_pair("evit", "tome", False)])
    table = markdown_table(rows)
    assert not any(r["best"] for r in rows) and "**" not in table and "80.00 ≈" in table and "70.00 ≈" in table
    # above one, tied with another: no best; the tie marks the two, not the one significantly below
    rows = _rows({"tome": 80.0, "evit": 70.0, "mctf": 79.0})
    mark_best(rows, [_pair("evit", "tome", True), _pair("mctf", "tome", False), _pair("evit", "mctf", True)])
    assert {r["method"]: (r["best"], r["tie"]) for r in rows} == {"tome": (False, True), "mctf": (False, True),
                                                                  "evit": (False, False)}
    # no test at all (no prediction files): never a best
    rows = _rows({"tome": 80.0, "evit": 70.0})
    mark_best(rows, [])
    assert not any(r["best"] for r in rows)


REFERENCE = Path(__file__).parents[1] / "results" / "reference"


def test_readme_block_rewritten_from_the_report(tmp_path):
    from harness.reporting.readme_block import END, START, results_block, rewrite

    envs = scored_envs(environments(load_frame(REFERENCE)))
    page = tmp_path / "README.md"
    page.write_text(f"# title\n\nbefore\n\n{START}\nhand-typed 0.053\n{END}\n\nafter\n")
    block = results_block(envs, tmp_path / "reports", page)
    assert rewrite(page, block) and not rewrite(page, block)  # a second run changes nothing
    text = page.read_text()
    assert text.startswith("# title\n\nbefore\n\n") and text.endswith("\n\nafter\n") and "0.053" not in text
    assert "(reports/figures/matched_budget.png)" in text
    # every cell carries its interval, and equals the report's own summary
    table = [line for line in text.splitlines() if line.startswith("| ")][1:]
    cells = [c.strip() for line in table for c in line.strip("|").split("|")[1:]]
    assert all(c == "-" or "[" in c for c in cells)
    cols, rows = summary(envs)
    tome = next(r for r in rows if r["method"] == "tome")["deit_small_cifar10 @ 0.7"]
    tome_line = next(line for line in table if line.startswith("| tome |"))
    assert f"{tome['top1']:.1f} [{tome['top1_ci_low']:.1f}, {tome['top1_ci_high']:.1f}]" in tome_line.split("|")[3]
    # the control claim is the adjusted one: no control test survives Holm on this run
    assert "0 significant after Holm" in text
    (tmp_path / "plain.md").write_text("no block here\n")
    with pytest.raises(HarnessError, match="no results block"):
        rewrite(tmp_path / "plain.md", block)


def test_committed_readme_block_is_the_generated_one():
    """README.md's block is what `report --readme` writes for the committed reference run."""
    from harness.reporting.readme_block import END, START_KEY, results_block

    root = Path(__file__).parents[1]
    envs = scored_envs(environments(load_frame(REFERENCE)))
    for page in (root / "README.md", root / "docs" / "reference-results.md"):
        text = page.read_text()
        committed = text[text.index(START_KEY):text.index(END) + len(END)]
        assert committed == results_block(envs, root / "reports", page), page


def test_readme_flag_refuses_a_page_without_the_block(capsys, tmp_path):
    from harness.cli import main

    page = tmp_path / "plain.md"
    page.write_text("no block here\n")
    code = main(["report", "--results", str(REFERENCE), "--out", str(tmp_path / "rep"), "--no-plots",
                 "--readme", str(page)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no results block" in err[0] and page.read_text() == "no block here\n"
