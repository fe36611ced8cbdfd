import pytest
import timm

from harness.sweep.budget import parse_budget, resolve
from harness.errors import HarnessError
from harness.registry import get_method_class
from harness.schedule import arch_spec


@pytest.mark.parametrize("text,kind,value,knob", [("0.7", "fraction", 0.7, None), ("1", "fraction", 1.0, None),
                                                  ("gmacs=2.9", "gmacs", 2.9, None), ("r=13", "knob", 13, "r"),
                                                  ("keep_rate=0.7", "knob", 0.7, "keep_rate")])
def test_parse(text, kind, value, knob):
    b = parse_budget(text)
    assert (b.kind, b.value, b.knob) == (kind, value, knob)


@pytest.mark.parametrize("text", ["1.5", "-1", "0", "gmacs=-2", "abc", "r=x", "nan", "1 2=3"])
def test_bad_budgets_raise(text):
    with pytest.raises(HarnessError):
        parse_budget(text)


@pytest.fixture(scope="module")
def arch():
    return arch_spec(timm.create_model("deit_small_patch16_224"))


def test_gmacs_target_solved(arch):
    method = get_method_class("random")()
    r = resolve(method, arch, parse_budget("gmacs=2.9"))
    assert r.skip_reason is None and r.gmacs_target == 2.9
    assert abs(r.gmacs - 2.9) / 2.9 < 0.01
    assert 0 < r.knob_value < 1


def test_unreachable_target_is_a_skip(arch):
    r = resolve(get_method_class("random")(), arch, parse_budget("0.05"))
    assert r.skip_reason and "outside" in r.skip_reason


def test_knob_budget_checked(arch):
    method = get_method_class("random")()
    with pytest.raises(HarnessError):
        resolve(method, arch, parse_budget("r=13"))
    with pytest.raises(HarnessError):
        resolve(method, arch, parse_budget("keep_rate=1.5"))
    assert resolve(method, arch, parse_budget("keep_rate=0.5")).knob_value == 0.5


@pytest.mark.parametrize("side", ["below", "above"])
def test_reach_tolerance_is_two_percent(arch, side):
    """A GMACs target 1 % past what the knob reaches is solved at the end; 3 % past it is a skip."""
    from harness.sweep.budget import _gmacs_at

    method = get_method_class("random")()
    end = _gmacs_at(method, arch, method.knob.low if side == "below" else method.knob.high)
    sign = -1 if side == "below" else 1
    near = resolve(method, arch, parse_budget(f"gmacs={end * (1 + sign * 0.01)}"))
    far = resolve(method, arch, parse_budget(f"gmacs={end * (1 + sign * 0.03)}"))
    assert near.skip_reason is None and near.gmacs == pytest.approx(end)
    assert far.skip_reason and "outside what keep_rate reaches" in far.skip_reason
