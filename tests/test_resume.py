"""Sweeps that survive: kill -9 and restart, concurrent sweeps, old records, submitit, torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.sweep.store import SCHEMA_VERSION, ResultStore

FIXTURES = Path(__file__).parent / "fixtures" / "schema_v1"

SPEED_TOML = """
[run]
results_dir = "{results}"
device = "cpu"
limit = 0
throughput_batch_size = 2
throughput_repeats = {repeats}
throughput_warmup = 0
throughput_latency = false
flops = false
[suites.default]
models = ["tiny"]
methods = ["none", "random"]
budgets = ["0.9", "0.7", "0.5"]
[models.tiny]
timm = "deit_tiny_patch16_224"
weights = "random"
data = "synthetic"
"""


def _config(tmp_path, repeats=1) -> Path:
    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(SPEED_TOML.format(results=tmp_path / "results", repeats=repeats))
    return cfg


def _run(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "harness", "run", "--no-report", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _snapshot(records: Path) -> dict:
    return {p.name: p.read_bytes() for p in records.glob("[!.]*.json")}


@pytest.mark.slow
def test_kill_9_mid_cell_then_resume(tmp_path):
    cfg = _config(tmp_path, repeats=40)  # long enough cells to be killed inside one
    records = tmp_path / "results" / "records"
    proc = _run("--config", str(cfg))
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until one record is stored and the next cell holds its lock
        if _snapshot(records) and list(records.glob("*.lock")):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("sweep never reached a second cell")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _snapshot(records)
    assert before and all(json.loads(b)["status"] == "ok" for b in before.values())
    assert list(records.glob("*.lock"))  # the killed cell's lock is left behind

    out = _run("--config", str(cfg)).communicate(timeout=300)[0]
    after = _snapshot(records)
    assert f"{len(before)} already done, {4 - len(before)} to run" in out
    assert len(after) == 4 and not list(records.glob("*.lock"))
    assert {k: after[k] for k in before} == before  # finished cells untouched, not recomputed


@pytest.mark.slow
def test_concurrent_sweeps_share_a_directory(tmp_path):
    cfg = _config(tmp_path, repeats=3)
    a, b = _run("--config", str(cfg)), _run("--config", str(cfg))
    outs = [p.communicate(timeout=300)[0] for p in (a, b)]
    assert all(p.returncode == 0 for p in (a, b)), outs
    records = ResultStore(tmp_path / "results").load_all()
    assert len(records) == 4 and len({r["cell_id"] for r in records}) == 4
    ran = sum(o.count("img/s") for o in outs)  # every finished cell prints its throughput once
    assert ran == 4, outs


def test_old_records_keep_loading(tmp_path):
    store = ResultStore(tmp_path)
    shutil.copytree(FIXTURES, store.records_dir)
    (store.records_dir / "future.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    (store.records_dir / "torn.json").write_text('{"schema_version": 1, "cell')
    recs = store.load_all()
    assert len(recs) == len(list(FIXTURES.glob("*.json")))
    for r in recs:
        assert r["schema_version"] == 1 and r["status"] == "ok" and r["top1"] > 0


# fields that are timings or stamps, which differ between any two runs
TIMING = ("img_per_s", "latency_ms", "e2e_", "peak_mem", "eval_s", "cell_s", "search_s", "timestamp", "git_sha",
          "speedup_", "baseline_img_per_s")


def _comparable(results: Path) -> dict:
    return {r["cell_id"]: {k: v for k, v in r.items() if not k.startswith(TIMING)} for r in ResultStore(results).load_all()}


@pytest.mark.slow
def test_submitit_local_matches_plain_runner(tmp_path):
    pytest.importorskip("submitit", reason="needs the slurm extra: pip install -e '.[slurm]'")
    plain, sub = tmp_path / "plain", tmp_path / "sub"
    plain.mkdir(), sub.mkdir()
    p = _run("--config", str(_config(plain))).communicate(timeout=300)[0]
    s = _run("--config", str(_config(sub)), "--executor", "submitit-local", "--cells-per-job", "2").communicate(timeout=300)[0]
    a, b = _comparable(plain / "results"), _comparable(sub / "results")
    assert len(a) == 4 and a == b, (p, s)


@pytest.mark.slow
def test_torchrun_gloo_matches_single_process(tmp_path, shared):
    common = ["--models", "deit_tiny_cifar10", "--methods", "none,topk", "--budgets", "0.5", "--limit", "30",
              "--device", "cpu", "--no-report"]
    single = tmp_path / "single"
    assert subprocess.run([sys.executable, "-m", "harness", "run", *common, "--results", str(single)],
                          capture_output=True).returncode == 0
    dist = tmp_path / "dist"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "harness", "run", *common, "--results", str(dist)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, "\n".join(l for l in (res.stdout + res.stderr).splitlines() if "rank" in l or "rror" in l)[-3000:]
    one = {r["method"]: r for r in ResultStore(single).load_all()}
    two = {r["method"]: r for r in ResultStore(dist).load_all()}
    assert set(one) == set(two) == {"none", "topk"}  # deterministic methods: random draws per rank
    for m in one:
        assert two[m]["n_images"] == 30 and two[m]["eval_ranks"] == 2
        assert two[m]["top1"] == one[m]["top1"] and two[m]["top5"] == one[m]["top5"]
