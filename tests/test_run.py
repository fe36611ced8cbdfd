"""End to end on the reference checkpoint: records, resume, report, and the baseline's accuracy."""
import json

import pytest

from harness.cli import main
from harness.sweep.store import ResultStore


def _records(results):
    return {r["method"] + "@" + r["budget"]: r for r in ResultStore(results).load_all()}


@pytest.mark.slow
def test_sweep_stores_resumes_and_reports(capsys, tmp_path, shared):
    results, reports = tmp_path / "results", tmp_path / "reports"
    argv = ["run", "--models", "deit_tiny_cifar10", "--methods", "none,random", "--budgets", "0.5,keep_rate=0.9",
            "--limit", "20", "--device", "cpu", "--results", str(results), "--no-report"]
    assert main(argv) == 0
    recs = _records(results)
    assert set(recs) == {"none@baseline", "random@0.5", "random@keep_rate=0.9"}
    base, half = recs["none@baseline"], recs["random@0.5"]
    for r in recs.values():
        assert r["status"] == "ok" and r["n_images"] == 20 and r["torch"] and r["timm"] and r["device"] == "cpu"
        assert 0 <= r["top1"] <= r["top5"] <= 1 and r["img_per_s"] > 0
    assert base["gmacs"] == pytest.approx(1.254, abs=1e-3) and base["tokens_per_block"] == [197] * 12
    assert abs(half["gmacs_ratio"] - 0.5) < 0.01 and half["gmacs_target"] == pytest.approx(0.5 * base["gmacs"], rel=1e-3)

    capsys.readouterr()
    assert main(argv) == 0  # resume: nothing runs twice
    out = capsys.readouterr().out
    assert "3 already done, 0 to run" in out
    before = {p.name: p.read_text() for p in (results / "records").glob("*.json")}

    assert main(["report", "--results", str(results), "--out", str(reports)]) == 0
    md = (reports / "results.md").read_text()
    assert "deit_tiny_cifar10" in md and f"{100 * half['top1']:.1f}" in md
    assert {p.name: p.read_text() for p in (results / "records").glob("*.json")} == before


def test_unsupported_model_is_a_record(capsys, tmp_path):
    cfg = tmp_path / "benchmark.toml"
    cfg.write_text("""
[run]
results_dir = "%s"
device = "cpu"
limit = 4
throughput_repeats = 1
throughput_warmup = 0
[suites.default]
models = ["resnet"]
methods = ["random"]
budgets = ["0.7"]
[models.resnet]
timm = "resnet18"
weights = "random"
data = "synthetic"
""" % (tmp_path / "r"))
    assert main(["run", "--config", str(cfg), "--no-report"]) == 0
    (rec,) = ResultStore(tmp_path / "r").load_all()
    assert rec["status"] == "unsupported" and "not a timm VisionTransformer" in rec["error"]


@pytest.mark.slow
def test_reference_baseline_accuracy_matches_card(tmp_path, shared):
    card = json.loads((shared / "models/deit_tiny_cifar10.json").read_text())
    assert main(["run", "--models", "deit_tiny_cifar10", "--methods", "none", "--limit", "500", "--device", "cpu",
                 "--results", str(tmp_path / "r"), "--no-report"]) == 0
    (rec,) = ResultStore(tmp_path / "r").load_all()
    # 500 class-balanced test images carry about 1.7 points of sampling noise
    assert abs(rec["top1"] - card["test_top1_fp16_weights"]) < 0.04
