"""DynamicViT (methods/dynamicvit.py): its placement and counts, its pure pieces on hand-made
tensors, its predictors as model submodules, masks while training and top-k at eval, its losses,
and its protocol (unsupported off the shelf, trains under ``finetune``)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import timm
import torch

from harness.training import finetune
from harness.errors import UnsupportedModel
from harness.training.recipes import Protocol, Recipe
from harness.registry import make_method
from harness.schedule import arch_spec
from harness.seam import policy_attention

sys.path.insert(0, str(Path(__file__).parent))
import _finetune_job as job  # noqa: E402

dv = pytest.importorskip("harness.methods.dynamicvit")


def _deit_t(depth: int = 12):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=depth, num_classes=10).eval()


def _patched(rho: float = 0.7, seed: int = 0, depth: int = 12):
    model = _deit_t(depth)
    make_method("dynamicvit", {"dynamicvit": {"seed": seed}}).patch(model, rho, arch_spec(model))
    return model


# ----------------------------------------------------------------------------- placement and counts

def test_predictors_sit_before_the_official_blocks_at_every_depth():
    assert dv.stage_blocks(12) == {3: 1, 6: 2, 9: 3}    # DeiT (main.py: PRUNING_LOC = [3, 6, 9])
    assert dv.stage_blocks(16) == {4: 1, 8: 2, 12: 3}   # LV-ViT-S ([4, 8, 12])
    assert dv.stage_blocks(20) == {5: 1, 10: 2, 15: 3}  # LV-ViT-M ([5, 10, 15])
    assert dv.stage_blocks(3) == {1: 2, 2: 3}           # stage 1 would sit before block 0
    assert dv.stage_blocks(2) == {1: 3}


def test_schedule_counts_as_the_official_int_n_ratio():
    arch = arch_spec(_deit_t())
    out = make_method("dynamicvit").schedule(arch, 0.7).tokens_out
    # int(196 * 0.7) = 137, int(196 * 0.49) = 96, int(196 * 0.343) = 67, plus the class token, leaving blocks 2 / 5 / 8
    assert out == (197, 197, 138, 138, 138, 97, 97, 97, 68, 68, 68, 68)
    assert make_method("dynamicvit").schedule(arch, 0.2).tokens_out[-1] == 1 + 1  # int(196 * 0.008) = 1


def test_keep_order_is_descending_score():
    scores = torch.tensor([[0.1, 0.9, -0.5, 0.4, 0.8]])
    assert dv.keep_order(scores, 3).tolist() == [[1, 4, 3]]


def test_predictor_global_feature_is_the_policy_weighted_mean():
    torch.manual_seed(0)
    pred = dv.PredictorLG(8)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(pred(x), pred(x, torch.ones(2, 5, 1)))
    half = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0]).view(1, 5, 1).expand(2, -1, -1)
    kept = pred(x[:, [0, 1, 3]])  # the global half averages the kept tokens alone
    torch.testing.assert_close(pred(x, half)[:, [0, 1, 3]], kept)
    assert torch.allclose(pred(x).exp().sum(-1), torch.ones(2, 5))  # log-probabilities of (keep, drop)


# ----------------------------------------------------------------------------- the predictors are the model's

def test_predictors_are_seeded_submodules_initialised_as_the_official_code():
    model = _patched()
    keys = [k for k in model.state_dict() if k.startswith("score_predictor.")]
    assert len({k.split(".")[1] for k in keys}) == 3 and "score_predictor.0.in_conv.1.weight" in keys
    assert all(p.requires_grad for p in model.score_predictor.parameters())
    weight = model.score_predictor[0].in_conv[1].weight
    assert weight.std().item() == pytest.approx(0.02, rel=0.05) and model.score_predictor[0].in_conv[1].bias.abs().max() == 0
    same, other = _patched(seed=0).score_predictor, _patched(seed=1).score_predictor
    assert torch.equal(weight, same[0].in_conv[1].weight)
    assert not torch.equal(weight, other[0].in_conv[1].weight)


def test_identity_adds_no_predictor():
    model = _patched(rho=1.0)
    assert not hasattr(model, "score_predictor")


# ----------------------------------------------------------------------------- training masks, eval top-k

def test_masks_while_training_then_the_schedules_counts_at_eval():
    model = _patched()
    state, x = model._seam_state, torch.randn(2, 3, 224, 224)
    state.recording = True
    model.train()
    model(x)
    assert state.observed == [197] * 12  # static shapes: masked, not dropped
    masks = model.score_predictor.decisions
    assert len(masks) == 3 and all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)
    assert all(bool((later <= earlier).all()) for earlier, later in zip(masks, masks[1:]))  # a dropped token stays out
    assert state.policy.shape == (2, 197, 1) and bool((state.policy[:, 0] == 1).all())
    model.eval()
    with torch.no_grad():
        model(x)
    assert state.observed == list(make_method("dynamicvit").schedule(arch_spec(model), 0.7).tokens_out)
    assert state.policy is None


def test_policy_attention_ignores_masked_keys_but_each_token_sees_itself():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    ones = torch.ones(1, 5, 1)
    plain = torch.softmax(q @ k.transpose(-2, -1) * 0.5, -1) @ v
    torch.testing.assert_close(policy_attention(q, k, v, ones), plain, rtol=0, atol=1e-5)
    keep = [0, 1, 3]
    policy = torch.zeros(1, 5, 1)
    policy[:, keep] = 1
    out = policy_attention(q, k, v, policy)
    kept = torch.softmax(q[:, :, keep] @ k[:, :, keep].transpose(-2, -1) * 0.5, -1) @ v[:, :, keep]
    torch.testing.assert_close(out[:, :, keep], kept, rtol=0, atol=1e-5)
    seen = [0, 1, 2, 3]  # a masked token attends to the kept ones and itself, not to the other masked one
    row = torch.softmax(q[:, :, 2:3] @ k[:, :, seen].transpose(-2, -1) * 0.5, -1) @ v[:, :, seen]
    torch.testing.assert_close(out[:, :, 2:3], row, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- losses

def test_ratio_loss_is_zero_at_the_target_and_squared_off_it():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])  # kept fraction 0.5 in both images
    assert dv.ratio_loss([mask, mask * 0], [0.5, 0.0]).item() == 0.0
    off = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # 0.75 and 0.25: (0.25^2 + 0.25^2) / 2
    assert dv.ratio_loss([off], [0.5]).item() == pytest.approx(0.0625)


def test_token_distillation_counts_the_kept_tokens_only():
    tokens, teacher = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert dv.token_distill_loss(tokens, teacher, mask).item() == pytest.approx((1 + 1 + 9 + 9) / 4)
    assert dv.token_distill_loss(tokens, teacher, mask * 0).item() == 0.0


def test_training_loss_reaches_the_predictors():
    model, teacher = _patched(depth=4), _deit_t(4)
    model.train()
    x = torch.randn(2, 3, 224, 224)
    logits = model(x)
    with torch.no_grad():
        t_tokens = teacher.forward_features(x)
    step = finetune.TrainingStep(x, logits, teacher.forward_head(t_tokens), t_tokens)
    loss = make_method("dynamicvit").training_loss(model, step)
    loss.backward()
    grads = [p.grad for p in model.score_predictor.parameters()]
    assert torch.isfinite(loss) and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- protocol

def test_off_the_shelf_it_is_unsupported_with_the_reason():
    from harness.sweep.execute import Executor

    executor = Executor.__new__(Executor)  # the refusal comes before anything is built or read
    with pytest.raises(UnsupportedModel, match=r"dynamicvit needs training: its prediction modules are learned "
                                               r"\(run it with --protocol finetune:<recipe>\)"):
        executor.measure_cell(None, make_method("dynamicvit"), None, Protocol(), "id")


def test_a_fine_tune_step_trains_the_predictors(tmp_path):
    method = make_method("dynamicvit")
    before = _tiny_predictors(method)
    recipe = dataclasses.replace(job.RECIPE, distill="soft")
    model, fields, losses = _train_with_teacher(tmp_path, method, recipe)
    after = {k: v for k, v in model.state_dict().items() if k.startswith("score_predictor.")}
    assert before.keys() == after.keys() and len(losses) == 2
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 0
    model._seam_state.recording = True
    with torch.no_grad():
        model(job.toy_set().take(torch.arange(4), torch.device("cpu"))[0])
    assert model._seam_state.observed == list(method.schedule(arch_spec(model), 0.7).tokens_out)


def _tiny_predictors(method) -> dict:
    model = job.tiny_model()
    method.patch(model, 0.7, arch_spec(model))
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("score_predictor.")}


def _train_with_teacher(tmp_path, method, recipe: Recipe):
    model, teacher = job.tiny_model(), job.tiny_model()
    method.patch(model, 0.7, arch_spec(model))
    fields = finetune.finetune(finetune.Trainee(model, method, 0.7, teacher), job.toy_set(),
                               dataclasses.replace(recipe, steps=2), finetune.Where(tmp_path))
    losses = [float(r.split(",")[2]) for r in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    return model, fields, losses


# ----------------------------------------------------------------------------- the official training path

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "deit_tiny_cifar10_dynamicvit_golden"


def _reference_model_and_inputs(n: int):
    """deit_tiny_cifar10 (unpatched) from the shared data, and the first ``n`` shared golden images."""
    import json

    import numpy as np

    from harness.errors import HarnessError
    from harness.loading.models import load_checkpoint, resolve_model
    from harness.paths import data_root

    try:
        root = data_root()
    except HarnessError as exc:
        pytest.skip(str(exc))
    meta = json.loads(GOLDEN.with_suffix(".json").read_text())
    with np.load(root / meta["inputs_from"]) as g:
        images, mean, std = g["images_uint8"][:n], g["mean"], g["std"]
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - torch.from_numpy(mean).view(1, 3, 1, 1)) \
        / torch.from_numpy(std).view(1, 3, 1, 1)
    spec = resolve_model(meta["model"], {}, root)
    return spec, load_checkpoint(spec), x, meta["training"]


@pytest.mark.slow
def test_the_training_forward_and_losses_are_the_official_ones():
    """The official training forward (scripts/dynamicvit_golden.py) with the same predictor weights and
    the same Gumbel draws (torch.manual_seed before the forward): the same masks, the logits to 1e-4,
    and the official DistillDiffPruningLoss_dynamic less its cross entropy equal to training_loss.
    A mask decision is a Gumbel draw against a score: a draw another CPU rounds 1 ulp away flips it
    only at a tie of that size."""
    import numpy as np

    from harness.sweep.cell import build_unpatched, prepare_cell

    spec, state_dict, x, case = _reference_model_and_inputs(8)
    method = make_method("dynamicvit")
    model = prepare_cell(spec, method, knob_value=case["rho"], state_dict=state_dict).model
    dv.init_uniform_(model.score_predictor, case["predictor_init"]["seed"])
    assert dv.state_sha256(model.score_predictor) == case["predictor_init"]["sha256"]
    teacher = build_unpatched(spec, state_dict)
    model.train()
    with torch.random.fork_rng():
        torch.manual_seed(case["seed"])
        logits = model(x)
    with np.load(GOLDEN.with_suffix(".npz")) as g:
        golden_logits, golden_masks = torch.from_numpy(g["training_logits"]), torch.from_numpy(g["training_masks"])
    assert torch.equal(torch.stack(model.score_predictor.decisions).to(torch.uint8), golden_masks)
    torch.testing.assert_close(logits, golden_logits, rtol=0, atol=1e-4)
    with torch.no_grad():
        tokens = teacher.forward_features(x)
        step = finetune.TrainingStep(x, logits, teacher.forward_head(tokens), tokens)
        extra = method.training_loss(model, step)
    assert extra.item() == pytest.approx(case["loss_less_cross_entropy"], rel=1e-4)
