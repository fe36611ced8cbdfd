"""The report never merges two configurations: a method stored with other options is its own,
labelled row, curve and pairwise partner; one configuration stored twice is reported once, flagged."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from harness.reporting.report import build_report, environments, load_frame, method_curve, variant_labels

N = 100
LABEL = np.arange(N) % 10
ENV = {"model": "m", "arch": "deit_tiny_patch16_224", "checkpoint_sha": "c0ffee12", "data": "cifar10", "limit": N,
       "eval_set_sha": "evalset-m", "device_name": "cpu (x86_64, 2 threads)", "dtype": "fp32", "batch_size": 64,
       "throughput_batch_size": 8, "throughput_batch_size_requested": 8, "torch": "2.4.0", "timm": "1.0.31",
       "attention": "fused", "sdpa_backend": "auto", "compile": False, "schema_version": 1, "git_sha": "aaa",
       "status": "ok", "error": None, "n_images": N, "gmacs_baseline": 1.0, "top5": 1.0, "method_version": "1"}


def _write(root: Path, cell_id: str, method: str, budget: str, right: int, options: dict, day: int = 1, **extra):
    pred = (LABEL + 1) % 10
    pred[:right] = LABEL[:right]
    (root / "predictions").mkdir(parents=True, exist_ok=True)
    np.savez(root / "predictions" / f"{cell_id}.npz", pred=pred.astype(np.int16), label=LABEL.astype(np.int16))
    gmacs = 1.0 if budget == "baseline" else float(budget)
    rec = {**ENV, "cell_id": cell_id, "method": method, "budget": budget, "method_options": options,
           "top1": right / N, "gmacs": gmacs, "gmacs_target": None if budget == "baseline" else gmacs,
           "img_per_s": 10.0 / gmacs, "knob": None, "knob_value": None, "predictions": f"predictions/{cell_id}.npz",
           "timestamp": f"2026-01-0{day}T00:00:00+00:00", **extra}
    (root / "records").mkdir(parents=True, exist_ok=True)
    (root / "records" / f"{cell_id}.json").write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    _write(root, "base", "none", "baseline", 90, {})
    for budget, right0, right1 in (("0.7", 80, 70), ("0.5", 60, 50)):
        _write(root, f"r0_{budget}", "random", budget, right0, {"seed": 0})
        _write(root, f"r1_{budget}", "random", budget, right1, {"seed": 1})
    _write(root, "tome", "tome", "0.7", 85, {})
    _write(root, "tome_noprop", "tome", "0.7", 84, {"prop_attn": False})
    # one configuration stored twice: 0.70 (an older spelling, day 1) and 0.7 (day 2)
    _write(root, "evit_old", "evit", "0.70", 70, {}, day=1)
    _write(root, "evit_new", "evit", "0.7", 75, {}, day=2)
    # the same method, model and budget off the shelf and fine-tuned: two configurations, paired
    _write(root, "topk_shelf", "topk", "0.7", 72, {})
    _write(root, "topk_tuned", "topk", "0.7", 78, {}, protocol="finetune:cpu-smoke", train_steps=5)
    rep = root / "rep"
    return root, rep, build_report(root, rep)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _table(rep):
    (path,) = (rep / "tables").glob("m*.csv")
    return _csv(path)


def test_variants_are_labelled_rows_never_merged(results):
    _, rep, md = results
    rows = {(r["method"], r["budget"]): r for r in _table(rep)}
    assert float(rows["random", "0.7"]["top1"]) == 80.0 and float(rows["random[seed=1]", "0.7"]["top1"]) == 70.0
    assert float(rows["tome", "0.7"]["top1"]) == 85.0 and float(rows["tome[prop_attn=False]", "0.7"]["top1"]) == 84.0
    assert "| random[seed=1] " in md and "| tome[prop_attn=False] " in md


def test_a_fine_tuned_cell_is_its_own_row_beside_its_off_the_shelf_partner(results):
    _, rep, md = results
    rows = {(r["method"], r["budget"]): r for r in _table(rep)}
    assert float(rows["topk", "0.7"]["top1"]) == 72.0
    assert float(rows["topk[protocol=finetune:cpu-smoke]", "0.7"]["top1"]) == 78.0
    (pair,) = _csv(rep / "protocol_pairs.csv")
    assert (pair["method"], pair["protocol"], pair["b"], pair["c"]) == ("topk", "finetune:cpu-smoke", "0", "6")
    assert "## Off the shelf vs fine-tuned" in md and "reported once" not in md.split("topk")[1][:200]


def test_pairwise_and_summary_keep_the_variants_apart(results):
    _, rep, _ = results
    pairs = {(r["budget"], r["method_a"], r["method_b"]) for r in _csv(rep / "pairwise.csv")}
    assert ("0.7", "random", "random[seed=1]") in pairs
    assert not any(a == b for _, a, b in pairs)  # never "random vs random"
    summary = {(r["column"], r["method"]): float(r["top1"]) for r in _csv(rep / "summary.csv")}
    assert summary["m @ 0.7", "random"] == 80.0 and summary["m @ 0.7", "random[seed=1]"] == 70.0
    assert summary["m @ 0.5", "random"] == 60.0 and summary["m @ 0.5", "random[seed=1]"] == 50.0


def test_each_configuration_has_its_own_curve(results):
    root, rep, _ = results
    (env, group), = environments(load_frame(root))
    assert method_curve(group, "random") == [(0.5, 60.0), (0.7, 80.0), (1.0, 90.0)]
    assert method_curve(group, "random[seed=1]") == [(0.5, 50.0), (0.7, 70.0), (1.0, 90.0)]
    header = _csv(rep / "accuracy_at_gmacs.csv")[0]
    assert {"random", "random[seed=1]"} <= set(header)


def test_a_rerun_of_one_configuration_is_reported_once_and_flagged(results):
    _, rep, md = results
    evit = [r for r in _table(rep) if r["method"] == "evit"]
    assert len(evit) == 1 and evit[0]["budget"] == "0.7" and float(evit[0]["top1"]) == 75.0  # the newer one
    assert evit[0]["records"] == "2"
    assert "| evit (2 records) " in md
    assert ("- evit @ 0.7: 2 records of one configuration (a re-run; cells evit_new, evit_old): reported once, "
            "from cell evit_new") in md
    pairs = [r for r in _csv(rep / "pairwise.csv") if "evit" in (r["method_a"], r["method_b"])]
    assert len(pairs) == len({(r["method_a"], r["method_b"]) for r in pairs})  # evit paired once per partner
    assert len(_csv(rep / "results.csv")) == 11  # every stored record is still listed


def test_labels_show_what_differs_and_not_defaults():
    recs = [{"method": "random", "method_options": {"seed": 0}}, {"method": "random", "method_options": {"seed": 2}},
            {"method": "tome", "method_options": {}}, {"method": "diffrate", "method_options": {}, "calib_limit": 400},
            {"method": "diffrate", "method_options": {}, "calib_limit": 1000},
            {"method": "random@tome", "method_options": {"random": {"seed": 1}, "tome": {}}},
            {"method": "random@tome", "method_options": {"random": {"seed": 0}, "tome": {}}}]
    assert variant_labels(recs) == ["random", "random[seed=2]", "tome", "diffrate[calib_limit=400]",
                                    "diffrate[calib_limit=1000]", "random@tome[random.seed=1]", "random@tome"]


def test_a_default_written_out_is_the_same_configuration():
    """Records from before defaults were filled in wrote some out (``{"prop_attn": true}``): still ``tome``."""
    recs = [{"method": "tome", "method_options": {"prop_attn": True}}, {"method": "tome", "method_options": {}},
            {"method": "tome", "method_options": {"prop_attn": False, "inflection": 0.0}}]
    assert variant_labels(recs) == ["tome", "tome", "tome[prop_attn=False]"]


def test_variant_styles_differ_from_their_method():
    from harness.reporting.plots import method_order, method_style

    assert method_style("random[seed=1]") != method_style("random")
    assert method_style("random[seed=1]")["marker"] == method_style("random")["marker"]
    # a variant sits beside its method in legends
    assert method_order(["random[seed=1]", "tome", "random", "none"]) == ["none", "random", "random[seed=1]", "tome"]


def test_figures_draw_each_configuration(results, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from harness.reporting import plots

    root, rep, _ = results
    drawn = []
    real = plots._line

    def spy(ax, pts, name, *a, **kw):
        drawn.append(name)
        return real(ax, pts, name, *a, **kw)

    monkeypatch.setattr(plots, "_line", spy)
    assert plots.write_plots(root, rep)
    assert {"random", "random[seed=1]", "tome", "tome[prop_attn=False]"} <= set(drawn)
