"""The fine-tuning protocol (issue 27): resume, never twice, divergence, DDP, identity, what trains."""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.training import finetune
from harness.errors import HarnessError
from harness.training.recipes import OFF_THE_SHELF, Recipe, parse_protocol
from harness.registry import make_method, method_names

sys.path.insert(0, str(Path(__file__).parent))
import _finetune_job as job  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "_finetune_job.py"
RNG_RECIPE = dataclasses.replace(job.RECIPE, drop_path=0.1)  # drop path: the global RNG must come back on resume
AUG_RECIPE = dataclasses.replace(RNG_RECIPE, auto_augment=job.AUTO_AUGMENT, reprob=0.25)  # DeiT's


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


@pytest.mark.parametrize("recipe", [RNG_RECIPE, AUG_RECIPE], ids=["flips", "randaugment+erasing"])
def test_an_interrupted_fine_tune_resumes_to_the_same_weights(tmp_path, recipe):
    whole, fields, losses = job.train(tmp_path / "whole", 9, recipe)
    with pytest.raises(_Stop):  # stops after step 5, mid-epoch (6 steps an epoch), last checkpoint at 4
        job.train(tmp_path / "cut", 9, recipe, on_step=_stop_at(5))
    resumed, fields2, losses2 = job.train(tmp_path / "cut", 9, recipe)
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


def test_augmentation_is_drawn_per_image_and_step_and_leaves_the_global_rngs_alone():
    from harness.training import augment

    aug, images, idx = augment.augmenter(AUG_RECIPE), job.toy_set(), torch.arange(8)
    state = finetune.rng_state()
    a, y = aug(images, idx, 3, torch.device("cpu"))
    after = finetune.rng_state()
    assert torch.equal(after["torch"], state["torch"]) and after["python"] == state["python"]
    assert all(np.array_equal(u, v) for u, v in zip(after["numpy"], state["numpy"]))
    torch.manual_seed(99)  # another global state: the same draws
    assert torch.equal(aug(images, idx, 3, torch.device("cpu"))[0], a)
    assert torch.equal(aug(images, idx[4:], 3, torch.device("cpu"))[0], a[4:])  # per image: a rank's share is the same
    plain, y0 = images.take(idx, torch.device("cpu"))
    assert torch.equal(y, y0) and a.shape == plain.shape and not torch.equal(a, plain)
    assert not torch.equal(aug(images, idx, 4, torch.device("cpu"))[0], a)  # another step, other draws


def test_augmentation_changes_the_training_and_is_off_by_default(tmp_path):
    from harness.training import augment

    assert augment.augmenter(job.RECIPE) is None
    plain, _, _ = job.train(tmp_path / "plain", 3, RNG_RECIPE)
    augmented, _, _ = job.train(tmp_path / "aug", 3, AUG_RECIPE)
    assert _max_diff(plain.state_dict(), augmented.state_dict()) > 1e-6


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


@pytest.mark.parametrize("name", method_names())
def test_a_method_trains_with_its_reduction_or_is_unsupported_with_its_reason(name, tmp_path):
    """Where the paper trains: two updates in train mode (drop path on) through the reducers, a finite
    loss, a gradient into every parameter and every weight moved. Elsewhere: the cell is unsupported."""
    method = make_method(name)
    if method.cannot_train:
        _assert_unsupported(method)
        return
    before, method = job.tiny_model().state_dict(), job.calibrated(method)
    model, fields, losses = job.train(tmp_path, 2, RNG_RECIPE, method=method)
    assert fields["train_steps"] == 2 and len(losses) == 2 and all(map(math.isfinite, losses))
    # every weight moved, the method's own new ones too (DynamicViT's predictors, from their initial values)
    before = {**_patched_state(method), **before}
    moved = {k: (v.float() - before[k].float()).abs().max().item() for k, v in model.state_dict().items()}
    assert min(moved.values()) > 0, [k for k, v in moved.items() if v == 0]
    assert not model.training  # measured in eval mode after training
    model.train()
    if hasattr(model, "_seam_state"):
        model._seam_state.recording = True
    x, y = job.toy_set().take(torch.arange(4), torch.device("cpu"))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert all(g is not None and bool(torch.isfinite(g).all()) and g.abs().max() > 0 for g in grads.values()), \
        [k for k, g in grads.items() if g is None or not g.abs().max() > 0]
    # the training forward reduced at the cell's schedule (DiffRate: the searched one); a method that
    # learns its selection (DynamicViT) masks instead while training, static shapes, as its paper does
    if hasattr(model, "_seam_state") and method.needs_training is None:
        from harness.schedule import arch_spec

        planned = method.schedule(arch_spec(job.tiny_model()), job.knob_of(method)).tokens_out
        assert model._seam_state.observed == list(planned)


def _patched_state(method) -> dict:
    """The tiny model's weights as patched by ``method`` before training (with any module the method adds)."""
    from harness.schedule import arch_spec

    model = job.tiny_model()
    if method.knob is not None:
        method.patch(model, job.knob_of(method), arch_spec(model))
    return model.state_dict()


def _assert_unsupported(method):
    from harness.errors import UnsupportedModel
    from harness.sweep.execute import Executor
    from harness.training.recipes import Protocol

    protocol = Protocol("finetune:x", "x", Recipe())
    executor = Executor.__new__(Executor)  # the refusal comes before anything is built or read
    with pytest.raises(UnsupportedModel, match=f"{method.name} cannot be fine-tuned: .+"):
        executor.measure_cell(None, method, None, protocol, "id")


def test_protocols_parse_and_unknown_recipes_are_named():
    recipes = {"cpu-smoke": Recipe()}
    assert parse_protocol(OFF_THE_SHELF, recipes).recipe is None
    assert parse_protocol("finetune:cpu-smoke", recipes).recipe == Recipe()
    with pytest.raises(HarnessError, match="did you mean 'cpu-smoke'"):
        parse_protocol("finetune:cpu-smok", recipes)
    with pytest.raises(HarnessError, match="finetune:<recipe>"):
        parse_protocol("fine-tune", recipes)


def _ids(tmp_path, protocols: str, recipe_lr: float = 5e-5, recipe_extra: str = "") -> dict:
    from harness.sweep.config import load_config
    from harness.sweep.plan import Machine, Plan, cell_id

    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(f'[suites.default]\nmodels = ["deit_tiny_patch16_224"]\nmethods = ["tome", "evit"]\n'
                   f'budgets = ["0.7"]\nprotocols = [{protocols}]\n[recipes.smoke]\nlr = {recipe_lr}\n{recipe_extra}\n'
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


def test_augmentation_enters_a_fine_tuned_cells_id_only_when_set(tmp_path):
    """The recipes written before RandAugment and random erasing existed keep their cells' ids."""
    from harness.sweep.config import load_config

    recipes = load_config(ROOT / "benchmark.toml").recipes
    assert not {"auto_augment", "reprob"} & set(recipes["cpu-smoke"].identity())
    assert recipes["paper"].identity()["auto_augment"] == "rand-m9-mstd0.5-inc1" and recipes["paper"].reprob == 0.25
    key = ("tome", "finetune:smoke")
    before = "46e43ddf561d274f"  # this cell's id on main at 861c835, before the two fields existed
    assert _ids(tmp_path, '"finetune:smoke"')[key] == before
    assert _ids(tmp_path, '"finetune:smoke"', recipe_extra='auto_augment = ""\nreprob = 0.0')[key] == before
    erasing = _ids(tmp_path, '"finetune:smoke"', recipe_extra="reprob = 0.25")
    augmented = _ids(tmp_path, '"finetune:smoke"', recipe_extra='auto_augment = "rand-m9-mstd0.5-inc1"')
    assert len({before, erasing[key], augmented[key]}) == 3 and erasing[(key[0], OFF_THE_SHELF)] == "860d473904063de5"


def test_a_bad_augmentation_is_refused_in_one_line():
    with pytest.raises(HarnessError, match="RandAugment string"):
        Recipe(auto_augment="autoaugment")
    with pytest.raises(HarnessError, match="probability"):
        Recipe(reprob=1.5)


def _worker(tmp_path: Path, name: str, steps: int, drop_path: float, sleep_s: float, torchrun: bool = False,
            augment: bool = False):
    cmd = [sys.executable, str(WORKER), str(tmp_path / name), str(steps), str(tmp_path / f"{name}.pt"),
           str(drop_path), str(sleep_s), str(int(augment))]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _rows(log: Path) -> int:
    return max(0, len(log.read_text().splitlines()) - 1) if log.is_file() else 0


@pytest.mark.slow
@pytest.mark.parametrize("augment", [False, True], ids=["flips", "randaugment+erasing"])
def test_kill_9_mid_epoch_then_restart_ends_with_the_same_weights(tmp_path, augment):
    """A process killed with SIGKILL mid-epoch (steps 5-6 of an epoch of 6) resumes from its last
    checkpoint and ends with the weights of a run never interrupted (CPU, to 1e-6)."""
    whole = _worker(tmp_path, "whole", 10, 0.1, 0.0, augment=augment)
    cut = _worker(tmp_path, "cut", 10, 0.1, 0.3, augment=augment)
    deadline = time.monotonic() + 120
    while _rows(tmp_path / "cut" / "log.csv") < 5 and time.monotonic() < deadline and cut.poll() is None:
        time.sleep(0.02)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert cut.returncode == -signal.SIGKILL and not (tmp_path / "cut.pt").exists()
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    again = _worker(tmp_path, "cut", 10, 0.1, 0.0, augment=augment)
    assert again.wait(timeout=300) == 0 and whole.wait(timeout=300) == 0, again.stdout.read().decode()[-2000:]
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "cut.pt")
    assert b["fields"]["train_resumed_at"] in (4, 6)  # the last checkpoint before the kill
    assert _max_diff(a["state"], b["state"]) <= 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("augment", [False, True], ids=["flips", "randaugment+erasing"])
def test_ddp_on_two_gloo_ranks_follows_one_process_with_the_same_global_batch(tmp_path, augment):
    """Two gloo ranks, 4 images each of every global batch of 8, give one process's loss curve
    (to 1e-5: the gradient all-reduce sums in another order) and its weights (to 1e-4); an image's
    augmentation is drawn from its own key, so it is the same on either rank count."""
    one = _worker(tmp_path, "one", 8, 0.0, 0.0, augment=augment)
    two = _worker(tmp_path, "two", 8, 0.0, 0.0, torchrun=True, augment=augment)
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
    from harness.reporting.protocol_report import pairs_markdown, protocol_pairs

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


def test_a_fine_tune_whose_off_the_shelf_cell_was_refused_shows_the_refusal(tmp_path):
    """DynamicViT off the shelf is ``unsupported`` (its predictors need training): the fine-tuned row
    still appears, the partner's status and reason where its top-1 would be, no difference or test."""
    from harness.reporting.protocol_report import pairs_markdown, protocol_pairs

    tuned = _record(tmp_path, "b", "finetune:smoke", [1] * 18 + [0] * 2, method="dynamicvit")
    refused = {"cell_id": "a", "model": "m", "method": "dynamicvit", "budget": "0.7", "status": "unsupported",
               "protocol": OFF_THE_SHELF, "error": "dynamicvit needs training"}  # refused before reading images
    (row,) = protocol_pairs([refused, tuned], tmp_path)
    assert row["cells"] == ("a", "b") and row["top1_off_the_shelf"] is None and row["p"] is None
    assert row["off_the_shelf_status"] == "unsupported: dynamicvit needs training"
    assert "| unsupported: dynamicvit needs training | 90.00 [69.9, 97.2] | - | - | - | - |" in pairs_markdown([row])
    assert protocol_pairs([{**refused, "method": "tome"}, tuned], tmp_path) == []  # another method: no partner


def test_ls_recipes_lists_both_shipped_recipes(capsys):
    from harness.cli import main

    assert main(["ls", "recipes", "--config", str(ROOT / "benchmark.toml")]) == 0
    out = capsys.readouterr().out
    assert "finetune:cpu-smoke 1 epoch(s) over 1000 training images" in out and "finetune:paper" in out
