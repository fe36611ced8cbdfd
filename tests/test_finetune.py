"""The fine-tuning protocol (issue 27): resume, never twice, divergence, DDP, identity, what trains."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import finetune
from harness.errors import HarnessError
from harness.recipes import OFF_THE_SHELF, Recipe, parse_protocol
from harness.registry import make_method, method_names

sys.path.insert(0, str(Path(__file__).parent))
import _finetune_job as job  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "_finetune_job.py"
RNG_RECIPE = dataclasses.replace(job.RECIPE, drop_path=0.1)  # drop path: the global RNG must come back on resume


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


class _Stop(Exception):
    pass


def _stop_at(n: int):
    def on_step(step, loss):
        if step + 1 == n:
            raise _Stop

    return on_step


def test_an_interrupted_fine_tune_resumes_to_the_same_weights(tmp_path):
    whole, fields, losses = job.train(tmp_path / "whole", 9, RNG_RECIPE)
    with pytest.raises(_Stop):  # stops after step 5, mid-epoch (6 steps an epoch), last checkpoint at 4
        job.train(tmp_path / "cut", 9, RNG_RECIPE, on_step=_stop_at(5))
    resumed, fields2, losses2 = job.train(tmp_path / "cut", 9, RNG_RECIPE)
    assert fields2["train_resumed_at"] == 4 and fields["train_resumed_at"] is None
    assert _max_diff(whole.state_dict(), resumed.state_dict()) <= 1e-6
    assert losses2 == pytest.approx(losses[4:], abs=1e-6)
    log = (tmp_path / "cut" / "log.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in log[1:]] == [str(s) for s in range(1, 10)]  # step 5 logged once


def test_resuming_without_the_rng_state_would_differ(tmp_path):
    """The check above can fail: drop path draws from the global RNG, which the checkpoint restores."""
    whole, _, _ = job.train(tmp_path / "whole", 6, RNG_RECIPE)
    with pytest.raises(_Stop):
        job.train(tmp_path / "cut", 6, RNG_RECIPE, on_step=_stop_at(3))
    (tmp_path / "cut" / "rng-0.pt").unlink()
    torch.save(finetune.rng_state() | {"torch": torch.manual_seed(123).get_state()}, tmp_path / "cut" / "rng-0.pt")
    resumed, _, _ = job.train(tmp_path / "cut", 6, RNG_RECIPE)
    assert _max_diff(whole.state_dict(), resumed.state_dict()) > 1e-6


def test_a_finished_fine_tune_is_never_repeated(tmp_path):
    first, fields, _ = job.train(tmp_path, 4)
    again, fields2, losses2 = job.train(tmp_path, 4)
    assert losses2 == [] and fields2["finetune_reused"] and not fields["finetune_reused"]
    assert fields2["finetuned_sha"] == fields["finetuned_sha"]
    assert _max_diff(first.state_dict(), again.state_dict()) == 0


def test_another_recipe_in_the_same_folder_trains_again(tmp_path):
    job.train(tmp_path, 4)
    _, fields, losses = job.train(tmp_path, 4, dataclasses.replace(job.RECIPE, lr=2e-3))
    assert len(losses) == 4 and not fields["finetune_reused"]


def test_a_nan_loss_stops_with_the_step(tmp_path):
    steps = []
    recipe = dataclasses.replace(job.RECIPE, lr=1e30, warmup_epochs=0.0, label_smoothing=0.0)  # blows up at once
    with pytest.raises(finetune.Diverged, match=r"loss is (nan|inf) at step (\d+) of 12") as err:
        job.train(tmp_path, 12, recipe, on_step=lambda step, loss: steps.append(step))
    assert f"at step {len(steps) + 1} of 12" in str(err.value)  # the first step whose loss was not finite
    assert not (tmp_path / "done.json").exists()


def test_the_log_has_loss_lr_and_img_per_s_each_step(tmp_path):
    job.train(tmp_path, 3)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].split(",") == list(finetune.LOG_FIELDS) and len(rows) == 4
    lrs = [float(r.split(",")[3]) for r in rows[1:]]
    assert lrs[0] == pytest.approx(1e-5)  # warm-up starts at warmup_lr (3 steps of warm-up: half of 6)


def test_evit_warms_its_keep_rate_up_from_one():
    evit = make_method("evit")
    start, end = evit.keep_rate_warmup
    rates = [evit.train_knob(0.5, d / 100) for d in range(101)]
    assert rates[0] == 1.0 and evit.train_knob(0.5, end) == 0.5 and rates[-1] == 0.5
    assert all(a >= b for a, b in zip(rates, rates[1:])) and 0.5 < evit.train_knob(0.5, (start + end) / 2) < 1.0


def test_evit_trains_with_its_warm_up_and_ends_at_its_knob(tmp_path):
    evit = make_method("evit")
    model, _, _ = job.train(tmp_path, 12, method=evit)
    rows = [r.split(",") for r in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    knobs = [float(r[5]) for r in rows]
    assert knobs[0] == 1.0 and knobs[-1] == pytest.approx(0.7) and model._keep_rate.value == pytest.approx(0.7)


@pytest.mark.parametrize("name", method_names())
def test_every_method_says_whether_it_trains(name):
    reason = make_method(name).cannot_train
    assert reason is None or (isinstance(reason, str) and reason)


@pytest.mark.parametrize("name", method_names())
def test_a_method_that_needs_training_can_train(name):
    """``needs_training`` (unsupported off the shelf) with ``cannot_train`` set would be unsupported everywhere."""
    method = make_method(name)
    assert method.needs_training is None or (method.cannot_train is None and isinstance(method.needs_training, str)
                                             and method.needs_training)


@pytest.mark.parametrize("name", ["none", "tome", "evit", "topk", "random", "dynamicvit"])
def test_the_papers_that_train_fine_tune_with_their_reduction(name, tmp_path):
    method = make_method(name)
    assert method.cannot_train is None
    _, fields, losses = job.train(tmp_path, 2, method=method)
    assert len(losses) == 2 and fields["train_steps"] == 2


@pytest.mark.parametrize("name", ["zerotprune", "mctf", "diffrate"])
def test_a_method_that_cannot_train_is_unsupported_with_its_reason(name):
    from harness.errors import UnsupportedModel
    from harness.execute import Executor
    from harness.recipes import Protocol

    protocol = Protocol("finetune:x", "x", Recipe())
    executor = Executor.__new__(Executor)  # the refusal comes before anything is built or read
    with pytest.raises(UnsupportedModel, match=f"{name} cannot be fine-tuned: .+"):
        executor.measure_cell(None, make_method(name), None, protocol, "id")


def test_protocols_parse_and_unknown_recipes_are_named():
    recipes = {"cpu-smoke": Recipe()}
    assert parse_protocol(OFF_THE_SHELF, recipes).recipe is None
    assert parse_protocol("finetune:cpu-smoke", recipes).recipe == Recipe()
    with pytest.raises(HarnessError, match="did you mean 'cpu-smoke'"):
        parse_protocol("finetune:cpu-smok", recipes)
    with pytest.raises(HarnessError, match="finetune:<recipe>"):
        parse_protocol("fine-tune", recipes)


def _ids(tmp_path, protocols: str, recipe_lr: float = 5e-5) -> dict:
    from harness.config import load_config
    from harness.plan import Machine, Plan, cell_id

    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(f'[suites.default]\nmodels = ["deit_tiny_patch16_224"]\nmethods = ["tome", "evit"]\n'
                   f'budgets = ["0.7"]\nprotocols = [{protocols}]\n[recipes.smoke]\nlr = {recipe_lr}\n'
                   f'[models.deit_tiny_patch16_224]\ntimm = "deit_tiny_patch16_224"\nweights = "random"\ndata = "synthetic"\n')
    plan = Plan(load_config(cfg), None)
    machine = Machine("fp32", "cpu", 8)
    return {(c.method, c.protocol): cell_id(plan.cell_key(c, None, machine)) for c in plan.cells}


def test_a_fine_tune_plans_its_off_the_shelf_partner_with_the_old_id(tmp_path):
    plain = _ids(tmp_path, '"off-the-shelf"')
    tuned = _ids(tmp_path, '"finetune:smoke"')
    assert set(tuned) == {(m, p) for m in ("tome", "evit") for p in ("off-the-shelf", "finetune:smoke")}
    assert {k: v for k, v in tuned.items() if k[1] == OFF_THE_SHELF} == plain
    assert len(set(tuned.values())) == 4


def test_the_recipe_is_part_of_a_fine_tuned_cells_id(tmp_path):
    a, b = _ids(tmp_path, '"finetune:smoke"'), _ids(tmp_path, '"finetune:smoke"', recipe_lr=1e-4)
    assert a[("tome", "finetune:smoke")] != b[("tome", "finetune:smoke")]
    assert a[("tome", OFF_THE_SHELF)] == b[("tome", OFF_THE_SHELF)]


def _worker(tmp_path: Path, name: str, steps: int, drop_path: float, sleep_s: float, torchrun: bool = False):
    cmd = [sys.executable, str(WORKER), str(tmp_path / name), str(steps), str(tmp_path / f"{name}.pt"),
           str(drop_path), str(sleep_s)]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _rows(log: Path) -> int:
    return max(0, len(log.read_text().splitlines()) - 1) if log.is_file() else 0


@pytest.mark.slow
def test_kill_9_mid_epoch_then_restart_ends_with_the_same_weights(tmp_path):
    """A process killed with SIGKILL mid-epoch (steps 5-6 of an epoch of 6) resumes from its last
    checkpoint and ends with the weights of a run never interrupted (CPU, to 1e-6)."""
    whole = _worker(tmp_path, "whole", 10, 0.1, 0.0)
    cut = _worker(tmp_path, "cut", 10, 0.1, 0.3)
    deadline = time.monotonic() + 120
    while _rows(tmp_path / "cut" / "log.csv") < 5 and time.monotonic() < deadline and cut.poll() is None:
        time.sleep(0.02)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert cut.returncode == -signal.SIGKILL and not (tmp_path / "cut.pt").exists()
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    again = _worker(tmp_path, "cut", 10, 0.1, 0.0)
    assert again.wait(timeout=300) == 0 and whole.wait(timeout=300) == 0, again.stdout.read().decode()[-2000:]
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "cut.pt")
    assert b["fields"]["train_resumed_at"] in (4, 6)  # the last checkpoint before the kill
    assert _max_diff(a["state"], b["state"]) <= 1e-6


@pytest.mark.slow
def test_ddp_on_two_gloo_ranks_follows_one_process_with_the_same_global_batch(tmp_path):
    """Two gloo ranks, 4 images each of every global batch of 8, give one process's loss curve
    (to 1e-5: the gradient all-reduce sums in another order) and its weights (to 1e-4)."""
    one = _worker(tmp_path, "one", 8, 0.0, 0.0)
    two = _worker(tmp_path, "two", 8, 0.0, 0.0, torchrun=True)
    assert one.wait(timeout=300) == 0 and two.wait(timeout=300) == 0, two.stdout.read().decode()[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert len(a["losses"]) == len(b["losses"]) == 8
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-5)
    assert _max_diff(a["state"], b["state"]) <= 1e-4


def _record(tmp_path: Path, cell: str, protocol: str, correct: list[int], **extra) -> dict:
    import numpy as np

    (tmp_path / "predictions").mkdir(exist_ok=True)
    label = np.arange(len(correct)) % 10
    np.savez(tmp_path / "predictions" / f"{cell}.npz", pred=np.where(correct, label, (label + 1) % 10), label=label)
    return {"cell_id": cell, "model": "m", "method": "tome", "budget": "0.7", "status": "ok", "protocol": protocol,
            "eval_set_sha": "e", "top1": sum(correct) / len(correct), "n_images": len(correct),
            "predictions": f"predictions/{cell}.npz", **extra}


def test_the_report_pairs_each_fine_tune_with_its_off_the_shelf_cell(tmp_path):
    from harness.protocol_report import pairs_markdown, protocol_pairs

    shelf = _record(tmp_path, "a", OFF_THE_SHELF, [1] * 10 + [0] * 10)
    tuned = _record(tmp_path, "b", "finetune:smoke", [1] * 10 + [1] * 8 + [0] * 2, train_steps=62)
    other = _record(tmp_path, "c", "finetune:smoke", [1] * 20, budget="0.5")  # no partner at 0.5
    old = {**shelf, "protocol": None, "cell_id": "d"}  # a record from before protocols: off the shelf
    rows = protocol_pairs([shelf, tuned, other], tmp_path)
    assert len(rows) == 1 and rows[0]["cells"] == ("a", "b")
    assert (rows[0]["b"], rows[0]["c"]) == (0, 8) and rows[0]["p"] == pytest.approx(2 / 2 ** 8)
    assert rows[0]["delta_top1"] == pytest.approx(0.4)
    assert protocol_pairs([old, tuned], tmp_path)[0]["cells"] == ("d", "b")
    assert "| +40.00 | 0 | 8 | 0.00781 | 62 |" in pairs_markdown(rows)


def test_ls_recipes_lists_both_shipped_recipes(capsys):
    from harness.cli import main

    assert main(["ls", "recipes", "--config", str(ROOT / "benchmark.toml")]) == 0
    out = capsys.readouterr().out
    assert "finetune:cpu-smoke 1 epoch(s) over 1000 training images" in out and "finetune:paper" in out
