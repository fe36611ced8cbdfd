"""Calibration once per configuration: rank 0 searches and the other ranks read; ``--recalibrate``
searches each configuration once per run (ranks, cells and submitit jobs of the run alike).

A counting method stands in for DiffRate (its search is one line); the process groups are real
(gloo, two processes on CPU), and a torchrun sweep counts DiffRate's own searches.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import multiprocessing as mp

from harness.sweep import calibration as calibration_mod
from harness.sweep.calibration import RUN_FIELD, Calibration, Calibrator
from harness.sweep.cell import CellSettings
from harness.sweep.distributed import Dist
from harness.errors import HarnessError, UnsupportedModel
from harness.loading.models import ModelSpec

SPEC = ModelSpec("m", "deit_tiny_patch16_224", "random", None, 10, "cifar10")


class Counting:
    """A searching method whose search counts itself and can be told to fail."""

    name = cache_name = "counting"
    needs_calibration = True

    def __init__(self, fail: Exception = None):
        self.searches, self.fail = 0, fail

    def calibration_identity(self) -> dict:
        return {"method": self.name}

    def calibrate(self, model, value, arch, data: Calibration) -> dict:
        name = f"value-{value}"
        found = data.cached(name)
        if found is None:
            data.train  # a search reads the training images
            self.searches += 1
            if self.fail is not None:
                raise self.fail
            found = {"value": value, "searched": True}
            data.store(name, found)
        return found


class FakeInputs:
    class _Set:
        name, has_labels = "train-4", True

    def eval_set(self, spec, transform):
        return self._Set()

    def calibration_set(self, spec, transform, limit):
        return self._Set()

    def checkpoint_sha(self, spec):
        return "sha"


@pytest.fixture(autouse=True)
def _no_transform(monkeypatch):
    monkeypatch.setattr(calibration_mod, "eval_transform", lambda spec, model: None)


def _calibrator(cache: Path, force=False, dist=None, run_id=None) -> Calibrator:
    return Calibrator(FakeInputs(), CellSettings(), cache, 4, force, dist, run_id)


def _call(calibrator, method, value=0.5):
    return calibrator(method, SPEC, torch.nn.Linear(1, 1), None, value)


def test_recalibrate_searches_each_configuration_once_per_run(tmp_path):
    method = Counting()
    _call(_calibrator(tmp_path), method)
    assert method.searches == 1  # the first run searches ...
    _call(_calibrator(tmp_path), method)
    assert method.searches == 1  # ... a later one reads it
    forced = _calibrator(tmp_path, force=True)
    for _ in range(3):  # three cells of one configuration (e.g. one search shared by two budgets' spellings)
        assert _call(forced, method)["searched"]
    assert method.searches == 2, "--recalibrate searched one configuration more than once in one run"
    _call(forced, method, value=0.7)
    assert method.searches == 3  # another configuration: its own search
    stored = json.loads((tmp_path / "counting" / "value-0.5.json").read_text())
    assert stored[RUN_FIELD] == forced.run_id and RUN_FIELD not in _call(forced, method)


def test_submitit_jobs_of_one_run_share_the_recalibration(tmp_path):
    method = Counting()
    _call(_calibrator(tmp_path), method)
    job1, job2 = (_calibrator(tmp_path, force=True, run_id="run-1") for _ in range(2))
    _call(job1, method), _call(job2, method)
    assert method.searches == 2  # the first search, then one for the recalibrating run
    _call(_calibrator(tmp_path, force=True, run_id="run-2"), method)
    assert method.searches == 3  # a new --recalibrate run searches again


def test_a_failed_search_leaves_no_lock_held(tmp_path):
    failing = Counting(fail=UnsupportedModel("unreachable"))
    with pytest.raises(UnsupportedModel):
        _call(_calibrator(tmp_path), failing)
    method = Counting()
    _call(_calibrator(tmp_path), method)  # would wait forever on a held lock
    assert method.searches == 1


def _rank(rank: int, world: int, init: str, cache: str, force: bool, mode: str, out: str) -> None:
    """One rank of a gloo group: a calibration call, its searches and its error written to ``out``."""
    import torch.distributed as td

    td.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calibration_mod.eval_transform = lambda spec, model: None
    method = Counting(fail=HarnessError("target out of reach") if mode == "fail" else None)
    own_cache = Path(cache) / (f"rank{rank}" if mode == "unshared" and rank else "")
    error = None
    try:
        _call(_calibrator(own_cache, force, Dist(rank, world), run_id=None), method)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    Path(out, f"{rank}.json").write_text(json.dumps({"searches": method.searches, "error": error}))
    td.destroy_process_group()


def _ranks(tmp_path, force: bool, mode: str = "ok", world: int = 2) -> list[dict]:
    n = len(list(tmp_path.glob("out-*")))  # one fresh group and output folder per run
    out = tmp_path / f"out-{n}"
    out.mkdir()
    init = f"file://{tmp_path / f'group-{n}'}"
    mp.spawn(_rank, args=(world, init, str(tmp_path / "cache"), force, mode, str(out)), nprocs=world)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_rank_0_searches_and_the_others_read_also_with_recalibrate(tmp_path):
    for force in (False, True, True):  # first search, then two recalibrating runs: one search each
        ranks = _ranks(tmp_path, force)
        assert [r["searches"] for r in ranks] == [1, 0] and all(r["error"] is None for r in ranks)
    ranks = _ranks(tmp_path, False)
    assert [r["searches"] for r in ranks] == [0, 0]  # cached: nobody searches


@pytest.mark.slow
def test_a_failure_on_one_rank_fails_the_cell_on_every_rank(tmp_path):
    ranks = _ranks(tmp_path, False, mode="fail")  # rank 0's search fails: rank 1 raises it too, never searches
    assert [r["searches"] for r in ranks] == [1, 0]
    assert all(r["error"] == "HarnessError: target out of reach" for r in ranks)
    ranks = _ranks(tmp_path, False, mode="unshared")  # rank 1 cannot see rank 0's cache: no second search
    assert [r["searches"] for r in ranks] == [1, 0]
    assert all("rank 1 found no calibration from rank 0" in r["error"] for r in ranks)


COUNTING_RUN = """
import sys
from pathlib import Path

from harness.cli import main
from harness.methods.diffrate import DiffRate

search = DiffRate._search


def counted(self, *args, **kwargs):
    with open({count!r}, "a") as fh:
        fh.write("searched\\n")
    return search(self, *args, **kwargs)


DiffRate._search = counted
sys.exit(main(sys.argv[1:]))
"""

DIFFRATE_TOML = """
[run]
results_dir = "{results}"
device = "cpu"
dtype = "fp32"
limit = 8
calib_limit = 4
flops = false
throughput_repeats = 1
throughput_warmup = 0
throughput_batch_size = 1
throughput_latency = false
[suites.default]
models = ["deit_tiny_cifar10"]
methods = ["diffrate"]
budgets = ["0.7"]
[methods.diffrate]
epochs = 1
batch_size = 4
"""


@pytest.mark.slow
def test_torchrun_searches_once_also_with_recalibrate(tmp_path, shared):
    count = tmp_path / "searches.txt"
    script = tmp_path / "counting_run.py"
    script.write_text(COUNTING_RUN.format(count=str(count)))
    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(DIFFRATE_TOML.format(results=tmp_path / "r"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
                "run", "--config", str(cfg), "--no-report"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    for extra, searches in (([], 1), (["--recalibrate", "--overwrite"], 2)):
        res = subprocess.run(torchrun + extra, capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
        assert count.read_text().split() == ["searched"] * searches, f"{extra}: one search per run, not per rank"
    recs = list((tmp_path / "r" / "records").glob("*.json"))
    (rec,) = [json.loads(p.read_text()) for p in recs]
    assert rec["status"] in ("ok", "off_target") and rec["search_cached"] is False and rec["eval_ranks"] == 2
