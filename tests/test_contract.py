"""Contract tests, parametrized over the registry: a new plugin is tested the moment it registers."""
import pytest
import timm
import torch

from harness.sweep.budget import parse_budget, resolve
from harness.registry import get_method_class, method_infos, method_names
from harness.schedule import Schedule, analytic_gmacs, arch_spec

KNOB_METHODS = [m for m in method_names() if get_method_class(m).knob is not None]
# a searching method (DiffRate) has no schedule before its search: its own tests cover it
SOLVABLE = [m for m in KNOB_METHODS if not get_method_class(m).needs_calibration]


def _deit_s():
    torch.manual_seed(0)
    return timm.create_model("deit_small_patch16_224").eval()


@pytest.fixture(scope="module")
def reference():
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        return x, _deit_s()(x)


@pytest.mark.parametrize("name", method_names())
def test_described_and_versioned(name):
    cls = get_method_class(name)
    assert cls.description() and cls.version
    if cls.knob is not None:
        assert cls.knob.low <= cls.knob.identity <= cls.knob.high


@pytest.mark.parametrize("name", method_names())
def test_listing_read_from_source_is_the_class(name):
    """``ls methods`` reads name, knob and description without importing: they must be the class's own."""
    info = next(i for i in method_infos() if i.name == name)
    cls = get_method_class(name)
    assert info.module == cls.__module__
    assert info.knob == (cls.knob.name if cls.knob else "")
    assert info.description == cls.description()


@pytest.mark.parametrize("name", KNOB_METHODS)
def test_identity_knob_gives_unpatched_logits(name, reference):
    x, ref = reference
    cls = get_method_class(name)
    model = _deit_s()
    arch = arch_spec(model)
    method = cls()
    assert method.schedule(arch, cls.knob.identity) == Schedule.full(arch)
    method.patch(model, cls.knob.identity, arch)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SOLVABLE)
@pytest.mark.parametrize("fraction", [0.7, 0.5])
def test_observed_tokens_equal_schedule(name, fraction):
    model = _deit_s()
    arch = arch_spec(model)
    method = get_method_class(name)()
    resolved = resolve(method, arch, parse_budget(str(fraction)))
    method.patch(model, resolved.knob_value, arch)
    model._seam_state.recording = True
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    assert model._seam_state.observed == list(resolved.schedule.tokens_out)
    assert resolved.gmacs == pytest.approx(fraction * analytic_gmacs(arch, Schedule.full(arch)), rel=0.03)


@pytest.mark.parametrize("name", SOLVABLE)
def test_schedule_monotone_in_knob(name):
    arch = arch_spec(_deit_s())
    cls = get_method_class(name)
    method = cls()
    lo, hi = cls.knob.low, cls.knob.high
    values = [lo + (hi - lo) * i / 6 for i in range(7)]
    if cls.knob.kind is int:
        values = sorted({int(v) for v in values})
    g = [analytic_gmacs(arch, method.schedule(arch, v)) for v in values]
    assert g == sorted(g) or g == sorted(g, reverse=True)
    assert g[0] != g[-1]


@pytest.mark.parametrize("leader", [m for m in SOLVABLE if m != "random" and not get_method_class(m).baseline])
def test_random_follows_another_methods_schedule(leader):
    from harness.registry import make_method

    arch = arch_spec(_deit_s())
    follow, lead = make_method(f"random@{leader}"), make_method(leader)
    resolved = resolve(follow, arch, parse_budget("0.6"))
    assert resolved.schedule != Schedule.full(arch)
    x = torch.randn(2, 3, 224, 224)
    observed = {}
    for name, method in (("follow", follow), ("lead", lead)):
        model = _deit_s()
        method.patch(model, resolved.knob_value, arch)
        model._seam_state.recording = True
        with torch.no_grad():
            model(x)
        observed[name] = model._seam_state.observed
    # the follower's forward drops what the leader's own forward drops, block by block, as planned
    assert observed["follow"] == observed["lead"] == list(resolved.schedule.tokens_out)


def test_a_baseline_cannot_be_followed():
    from harness.errors import HarnessError
    from harness.registry import make_method

    with pytest.raises(HarnessError, match="baseline that changes the model's input"):
        make_method("random@resolution")


def test_follow_needs_a_follower_and_a_leader():
    from harness.errors import HarnessError
    from harness.registry import make_method

    with pytest.raises(HarnessError, match="did you mean"):
        make_method("random@tomee")
    with pytest.raises(HarnessError, match="no knob"):
        make_method("random@none")
