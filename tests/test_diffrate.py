"""DiffRate: the pure pieces on hand cases, published schedules, and a tiny search end to end."""
import json
import math

import pytest
import timm
import torch

from harness.budget import parse_budget, resolve
from harness.data import EvalSet
from harness.errors import HarnessError
from harness.models import Transform
from harness.calibration import Calibration
from harness.schedule import Schedule, analytic_gmacs, arch_spec
from harness.methods.diffrate import (PUBLISHED_KEYS, DiffRate, Rates, closest_entry, kept_probability, land_on_target,
                              masked_softmax, uniform_rate_start,
                              match_similar, merge_mean, merge_size, model_key_for, parse_counts, prune_and_merge,
                              soft_gmacs, ste_ceil, step_mask, tokens_after)


def _arch(name, **kwargs):
    with torch.device("meta"):  # shapes only: ViT-H builds in a blink
        return arch_spec(timm.create_model(name, pretrained=False, **kwargs))


# ---------------------------------------------------------------- the differentiable pieces ----

def test_ste_ceil_rounds_up_and_passes_the_gradient():
    x = torch.tensor([1.2, 3.0, -0.5], requires_grad=True)
    y = ste_ceil(x)
    assert y.tolist() == [2.0, 3.0, -0.0]
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == [1.0, 2.0, 3.0]


def test_kept_probability_and_step_mask():
    # candidates 3, 1 patches kept (+1 class token) with probabilities 0.25, 0.75
    probs = torch.tensor([0.25, 0.75], requires_grad=True)
    keep = kept_probability(probs, torch.tensor([3.0, 1.0]), num_tokens=5, num_prefix=1)
    assert keep.tolist() == [1.0, 1.0, 0.25, 0.25, 0.0]
    mask = step_mask(2, 4, keep)  # keep 2 of the 4 tokens left: positions 2, 3 masked
    assert mask.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    mask[2].backward()
    assert probs.grad.tolist() == [1.0, 0.0]  # position 2 is kept only by the 3-patch candidate


def test_masked_softmax_values_and_official_gradient():
    logits = torch.tensor([[0.5, 1.0, -0.3, 0.2]])
    keep = torch.tensor([1.0, 0.6, 0.3, 0.1], requires_grad=True)
    attn = masked_softmax(logits, step_mask(2, 4, keep))
    e = logits[0].exp()
    z = e[:2].sum()
    torch.testing.assert_close(attn[0, :2], e[:2] / z)
    assert attn[0, 2:].max() < 1e-6
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    (attn[0] * w).sum().backward()
    # the official multiplicative mask: d/dm_j [sum_k w_k e_k m_k / sum_k e_k m_k] at m = (1, 1, 0, 0)
    inner = (e[:2] / z * w[:2]).sum()
    expected = e / z * (w - inner)
    torch.testing.assert_close(keep.grad, expected, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(keep.grad).all()


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_huge_patch14_224.mae"])
def test_soft_gmacs_equals_analytic_at_hard_counts(name):
    arch = _arch(name)
    full = arch.tokens_in
    prune = [full] + [full - 7 * i for i in range(1, arch.depth)]
    merge = [full] + [full - 9 * i + (5 if i % 3 == 0 else 0) for i in range(1, arch.depth)]
    schedule = Schedule(full, tokens_after(full, prune, merge))
    counts = [torch.tensor(float(c), requires_grad=True) for c in prune[1:] + merge[1:]]
    soft = soft_gmacs(arch, [full] + counts[:arch.depth - 1], [full] + counts[arch.depth - 1:])
    assert soft.item() == pytest.approx(analytic_gmacs(arch, schedule), rel=1e-6)
    soft.backward()
    # the straight-through min: each block's two counts get the gradient of the tokens leaving it
    assert all(c.grad is not None and c.grad > 0 for c in counts)


# ---------------------------------------------------------------- inference pieces ------------

def test_match_and_merge_protect_the_class_token():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]])  # cls, a, b~cls, c~a
    dst, sim = match_similar(x, kept=2, num_prefix=1)
    assert dst.tolist() == [[1, 1]]  # b is most like the class token but cannot merge into it
    merged = merge_mean(x, 2, dst)
    torch.testing.assert_close(merged[0, 1], (x[0, 1] + x[0, 2] + x[0, 3]) / 3)
    size, src = merge_size(torch.ones(1, 4, 1), 2, dst, sim)
    assert size[0, :, 0].tolist() == pytest.approx([1.0, 1.0 + sim[0, 0].item() + sim[0, 1].item()])


def test_prune_and_merge_keeps_by_class_attention():
    x = torch.arange(6.0).view(1, 6, 1).expand(1, 6, 2).clone() + torch.tensor([0.0, 1.0])
    cls_attn = torch.tensor([[0.5, 0.05, 0.2, 0.1, 0.15, 0.0]])
    out, size = prune_and_merge(x, None, cls_attn, prune=4, merge=4, num_prefix=1)
    assert out[0, :, 0].tolist() == [0.0, 2.0, 4.0, 3.0]  # class, then tokens by attention; 1 and 5 pruned
    assert size is None
    out, size = prune_and_merge(x, None, cls_attn, prune=4, merge=3, num_prefix=1)
    assert out.shape[1] == 3 and size.shape == (1, 3, 1)


# ---------------------------------------------------------------- published schedules ---------

@pytest.fixture
def published(shared):
    return json.loads((shared / "diffrate" / "compression_rate.json").read_text())


def test_published_schedule_runs_as_planned_on_deit_small(shared):
    torch.manual_seed(0)
    model = timm.create_model("deit_small_patch16_224").eval()
    arch = arch_spec(model)
    method = DiffRate(schedules="published")
    assert not method.needs_calibration
    resolved = resolve(method, arch, parse_budget("gmacs=2.9"))
    assert resolved.skip_reason is None
    assert method.describe(arch, resolved.knob_value)["published_gflops"] == "2.9"
    assert resolved.gmacs == pytest.approx(2.9, rel=0.01)
    method.patch(model, resolved.knob_value, arch)
    model._seam_state.recording = True
    with torch.no_grad():
        out = model(torch.randn(2, 3, 224, 224))
    assert model._seam_state.observed == list(resolved.schedule.tokens_out)
    assert model._seam_state.observed[-1] == 3 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(PUBLISHED_KEYS))
def test_published_schedules_load_for_every_model(name, published, shared):
    arch = _arch(name)
    key = PUBLISHED_KEYS[name]
    method = DiffRate(schedules="published", model_key=key)
    baseline = analytic_gmacs(arch, Schedule.full(arch))
    for flops in published[key]:
        value = float(flops) / baseline
        assert method.describe(arch, value)["published_gflops"] == flops
        gmacs = analytic_gmacs(arch, method.schedule(arch, value))
        print(f"{key} {flops} GFLOPs (file) -> {gmacs:.3f} GMACs (analytic)")
        # the file's keys are targets; the tiny model's lowest two are the only ones off by > 1.5 %
        assert gmacs == pytest.approx(float(flops), rel=0.10 if key == "ViT-T-DeiT" else 0.015)


def test_published_budget_picks_the_closest_entry(shared):
    arch = _arch("deit_tiny_patch16_224")
    method = DiffRate(schedules="published")
    # 0.7 x 1.254 = 0.877 GMACs: the "0.9" entry (0.902) is closer than "0.8" (0.809); the solver's
    # rounding of the knob at the step's edge must not flip the entry
    resolved = resolve(method, arch, parse_budget("0.7"))
    assert method.describe(arch, resolved.knob_value)["published_gflops"] == "0.9"
    assert resolved.gmacs > 0.877 > resolve(method, arch, parse_budget("0.6")).gmacs  # above the target, not below
    assert "outside what gmacs_ratio reaches" in resolve(method, arch, parse_budget("0.5")).skip_reason


def test_published_model_key_inference(shared):
    assert model_key_for(_arch("deit_tiny_patch16_224")) == "ViT-T-DeiT"
    assert model_key_for(_arch("vit_large_patch16_224.mae")) == "ViT-L-MAE"
    with pytest.raises(HarnessError, match="ambiguous"):
        model_key_for(_arch("deit_base_patch16_224"))
    with pytest.raises(HarnessError, match="not in the published file"):
        model_key_for(_arch("deit_tiny_patch16_224", depth=4))
    assert closest_entry({"2.3": 0, "2.5": 0}, 2.41) == "2.5"
    assert parse_counts("None") is None and parse_counts("[197, 3]") == [197, 3]


def test_identity_and_uncalibrated_search():
    arch = _arch("deit_tiny_patch16_224")
    method = DiffRate()
    assert method.needs_calibration
    assert method.schedule(arch, 1.0) == Schedule.full(arch)
    with pytest.raises(HarnessError, match="calibrate"):
        method.schedule(arch, 0.7)


# ---------------------------------------------------------------- the search ------------------

def _tiny_model():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", depth=4, num_classes=10).eval()


def _data(cache_dir=None, force=False):
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(32, 3, 224, 224, generator=g), torch.randint(0, 10, (32,), generator=g)
    train = EvalSet("synthetic-labelled", images, labels, Transform(224, (0.0,) * 3, (1.0,) * 3, 1.0, "bilinear"))
    return Calibration(train, torch.device("cpu"), "fp32", {"model": "tiny-random"}, force, cache_dir)


@pytest.mark.slow
def test_search_lowers_gmacs_toward_target_and_caches(tmp_path):
    model = _tiny_model()
    arch = arch_spec(model)
    start = analytic_gmacs(arch, Schedule(arch.tokens_in, tokens_after(arch.tokens_in, *Rates(arch, [1, 2, 3], 4).hard())))
    official = dict(epochs=1, batch_size=4, lr=0.2, min_lr=0.2, init="uniform", land=False)
    searching = DiffRate(**official)
    found = searching.calibrate(model, 0.3, arch, _data(tmp_path))
    record, method = found.fields, searching.with_calibration(found.state)
    assert searching.calibration is None  # the search's state is returned, not stored on the instance
    assert not record["search_cached"] and record["search_images"] == 32 and record["search_steps"] == 8
    target = 0.3 * analytic_gmacs(arch, Schedule.full(arch))
    assert record["search_gmacs_target"] == pytest.approx(target, rel=1e-3)
    assert target < record["search_gmacs"] < start  # moved from the uniform start toward the target
    assert record["landing_shift"] == 0 and record["search_gmacs_learned"] == pytest.approx(record["search_gmacs"], abs=1e-3)
    schedule = method.schedule(arch, 0.3)
    assert schedule.tokens_out == tokens_after(arch.tokens_in, record["prune_kept"], record["merge_kept"])
    assert list(tmp_path.glob("*.json"))

    patched = _tiny_model()
    method.patch(patched, 0.3, arch)
    patched._seam_state.recording = True
    with torch.no_grad():
        assert torch.isfinite(patched(torch.randn(2, 3, 224, 224))).all()
    assert patched._seam_state.observed == list(schedule.tokens_out)

    again = DiffRate(**official)
    cached = again.calibrate(_tiny_model(), 0.3, arch, _data(tmp_path))
    assert cached.fields["search_cached"] and cached.fields["prune_kept"] == record["prune_kept"]
    assert again.with_calibration(cached.state).schedule(arch, 0.3) == schedule
    other = DiffRate(**{**official, "flops_weight": 50.0})
    assert other.cache_key({"model": "tiny-random"}, 0.3) != again.cache_key({"model": "tiny-random"}, 0.3)


def test_search_keeps_gradients_finite():
    model = _tiny_model()
    arch = arch_spec(model)
    from harness.seam import install

    model.requires_grad_(False)
    rates = Rates(arch, [1, 2, 3], 4)
    install(model, {i: rates.reducer(i) for i in rates.blocks}, prop_attn=True)
    x, y = _data().train.batch(0, 4, torch.device("cpu"))
    loss = torch.nn.functional.cross_entropy(model(x), y) + soft_gmacs(arch, *rates.per_block())
    loss.backward()
    grads = [p.grad for p in rates.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # masked, not removed: shapes stay static, masked tokens weigh ~nothing in attention
    assert model._seam_state.size.shape[1] == arch.tokens_in
    assert math.isclose(float((rates.mask[0] > 0).sum()), float(tokens_after(arch.tokens_in, *rates.hard())[-1]))


def test_search_on_unlabelled_data_uses_the_unpatched_predictions(tmp_path):
    model = _tiny_model()
    arch = arch_spec(model)
    train = EvalSet("synthetic", None, None, Transform(224, (0.0,) * 3, (1.0,) * 3, 1.0, "bilinear"), num_synthetic=4)
    data = Calibration(train, torch.device("cpu"), "fp32", {"model": "tiny-random", "data": "synthetic"}, cache_dir=tmp_path)
    record = DiffRate(epochs=1, batch_size=4).calibrate(model, 0.5, arch, data).fields
    assert record["search_steps"] == 1 and len(record["prune_kept"]) == arch.depth


@pytest.mark.parametrize("ratio", [0.9, 0.7, 0.5])
def test_uniform_rate_start_meets_the_budget(ratio):
    arch = _arch("deit_small_patch16_224")
    blocks = list(range(1, arch.depth))
    target = ratio * analytic_gmacs(arch, Schedule.full(arch))
    start = uniform_rate_start(arch, blocks, target)
    steps = [a - b for a, b, in zip([arch.num_patches] + start, start) if b > 1]  # 1: the floor, reached at 0.5
    assert max(steps) - min(steps) < 1e-6 and steps[0] > 0  # the same number removed by every block
    counts = [arch.tokens_in] + [c + arch.num_prefix for c in start]
    assert float(soft_gmacs(arch, counts, counts)) == pytest.approx(target, rel=1e-4)


def test_landing_shifts_the_searched_shape_onto_the_target():
    arch = _arch("deit_tiny_patch16_224")
    full = arch.tokens_in
    prune = [full] + [150 - 10 * i for i in range(arch.depth - 1)]  # 150, 140, ..., 40
    merge = [full] + [160 - 10 * i for i in range(arch.depth - 1)]
    blocks = list(range(1, arch.depth))
    target = 0.7 * analytic_gmacs(arch, Schedule.full(arch))
    p2, m2, shift = land_on_target(arch, prune, merge, blocks, target)
    landed = analytic_gmacs(arch, Schedule(full, tokens_after(full, p2, m2)))
    assert shift > 0 and abs(landed / target - 1) < 0.005  # one token a block is well under 1 %
    assert p2[0] == m2[0] == full and [b - a for a, b in zip(prune, p2)][1:] == [shift] * (arch.depth - 1)
    # a schedule already on target is not moved
    assert land_on_target(arch, p2, m2, blocks, landed)[2] == 0


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [0.9, 0.5])
def test_default_search_lands_within_two_percent(tmp_path, ratio):
    model = _tiny_model()
    arch = arch_spec(model)
    record = DiffRate(epochs=1, batch_size=8).calibrate(model, ratio, arch, _data(tmp_path)).fields
    assert abs(record["search_gmacs"] / record["search_gmacs_target"] - 1) <= 0.02


def test_unknown_init_is_refused():
    with pytest.raises(HarnessError, match="init must be one of budget, uniform"):
        DiffRate(init="ones")


UNREACHABLE_TOML = """
[run]
results_dir = "{results}"
device = "cpu"
limit = 4
flops = false
[suites.default]
models = ["tiny"]
methods = ["diffrate"]
budgets = ["0.01", "gmacs=999"]
[models.tiny]
timm = "deit_tiny_patch16_224"
weights = "random"
data = "synthetic"
"""


def test_unreachable_search_budget_is_a_stored_skip_not_retried(tmp_path, capsys):
    """A fraction below the knob's 0.05 and a target above the baseline: skipped with the reason, done on resume."""
    from harness.cli import main
    from harness.store import ResultStore

    cfg = tmp_path / "benchmark.toml"
    cfg.write_text(UNREACHABLE_TOML.format(results=tmp_path / "results"))
    assert main(["run", "--config", str(cfg), "--no-report"]) == 0
    first = capsys.readouterr().out
    records = ResultStore(tmp_path / "results").load_all()
    assert sorted(r["budget"] for r in records) == ["0.01", "gmacs=999"]
    for r in records:
        assert r["status"] == "skipped", r
        assert "outside what gmacs_ratio reaches" in r["error"] and r.get("search_s") is None
    assert "0 failed" in first
    assert main(["run", "--config", str(cfg), "--no-report"]) == 0
    assert "2 cells, 2 already done, 0 to run" in capsys.readouterr().out


def test_search_reach_tolerance_matches_other_methods():
    """Within budgets.REACH_TOLERANCE of the knob's range the search runs at the range's end; beyond, a skip."""
    from harness.cell import calibration_knob, search_skip

    arch, method = _arch("deit_tiny_patch16_224"), DiffRate()
    base = analytic_gmacs(arch, Schedule.full(arch))
    near = parse_budget(f"gmacs={1.01 * base:.6f}")
    assert search_skip(method, arch, near) is None and calibration_knob(method, arch, near) == 1.0
    assert search_skip(method, arch, parse_budget("0.049")) is None
    assert calibration_knob(method, arch, parse_budget("0.049")) == 0.05
    far = search_skip(method, arch, parse_budget("0.04"))
    assert far.skip_reason.startswith("target") and far.gmacs_target == pytest.approx(0.04 * base)
