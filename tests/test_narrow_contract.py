"""The narrow plugin contract (issue 23): eight names, typed options, calibration returned as state.

A method says what it is (``name``, ``version``, ``knob``, ``Options``, ``premises``, ``stage``), how
many tokens each block keeps (``schedule``) and what reduces them (``reducers``); the harness installs
the reducers with the class's declarations. A plugin of the first contract still loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import timm
import torch

from harness.errors import HarnessError
from harness.paths import PROJECT_ROOT
from harness.registry import Calibrated, FollowSchedule, Knob, Method, Premises, make_method, method_names
from harness.schedule import Schedule, arch_spec
from harness.seam import install, keep_tokens, token_state

ADDING = PROJECT_ROOT / "docs" / "adding-a-method.md"


def test_the_documented_names_are_at_most_eight_and_exist():
    """The table of names a plugin author must learn lists at most eight, each declared on Method."""
    text = ADDING.read_text()
    table = text.split("## 1. The contract", 1)[1].split("| premise |", 1)[0]
    names = re.findall(r"^\| `(\w+)(?:\([^`]*\))?` \|", table, flags=re.M)
    assert 6 <= len(names) <= 8, names
    assert all(hasattr(Method, n) or n in Method.__annotations__ for n in names), names


@pytest.mark.parametrize("options, words", [
    ({"prop_attn": "yes"}, "option prop_attn must be bool, got 'yes'"),
    ({"inflection": "steep"}, "option inflection must be float"),
    ({"r_list": [1, "x"]}, "option r_list must be int"),
    ({"proportional": True}, r"has no option\(s\) \['proportional'\]; options: \['prop_attn', 'inflection', 'r_list'\]"),
])
def test_a_wrongly_typed_or_unknown_option_is_one_clear_error(options, words):
    with pytest.raises(HarnessError, match=words):
        make_method("tome", {"tome": options})


def test_options_are_cast_to_their_declared_type():
    tome = make_method("tome", {"tome": {"inflection": 1, "r_list": [4, 4.0]}})
    assert tome.options.inflection == 1.0 and isinstance(tome.options.inflection, float)
    assert tome.options.r_list == (4, 4) and all(type(v) is int for v in tome.options.r_list)
    assert tome.resolved_options()["r_list"] == [4, 4]  # hashed as JSON writes it
    assert make_method("random", {"random": {"seed": 2.0}}).options.seed == 2
    with pytest.raises(HarnessError, match="seed must be int, got 2.5"):
        make_method("random", {"random": {"seed": 2.5}})


def test_a_value_check_in_the_options_is_one_clear_error():
    with pytest.raises(HarnessError, match="atc linkage 'ward' unknown"):
        make_method("atc", {"atc": {"linkage": "ward"}})


@pytest.mark.parametrize("name", method_names())
def test_every_method_declares_premises_as_one_value(name):
    method = make_method(name)
    assert isinstance(method.premises, Premises)
    assert isinstance(method.stage, str) and isinstance(method.prop_attn, bool)


def _tiny():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=64, num_classes=4).eval()
    return model, arch_spec(model)


def test_calibration_is_returned_and_bound_to_a_copy():
    """DiffRate's search state is what calibrate returns; the harness binds it to a copy of the method."""
    _, arch = _tiny()
    method = make_method("diffrate")
    with pytest.raises(HarnessError, match="no searched schedule"):
        method.schedule(arch, 0.5)
    full = arch.tokens_in
    state = {"key": [arch.depth, full, 0.5], "prune_kept": [full, full - 3], "merge_kept": [full, full - 5]}
    bound = method.with_calibration(state)
    assert bound.schedule(arch, 0.5).tokens_out == (full, full - 5)
    assert method.calibration is None  # the instance that searched is unchanged
    with pytest.raises(HarnessError, match="no searched schedule"):
        bound.schedule(arch, 0.7)  # a state is for the knob it was searched at
    follow = make_method("random@diffrate").with_calibration(state)
    assert follow.schedule(arch, 0.5).tokens_out == (full, full - 5)


class _FirstContract(Method):
    """A plugin written for the first contract: option_defaults, premise booleans, patch + patch_schedule."""

    name = "first_contract"
    knob = Knob("keep", int, 1, 16, identity=16)
    tracks_positions = True
    option_defaults = {"offset": 0}

    def schedule(self, arch, value):
        return Schedule(arch.tokens_in, (arch.num_prefix + int(value),) * arch.depth)

    def patch(self, model, value, arch):
        self.patch_schedule(model, self.schedule(arch, value))

    def patch_schedule(self, model, schedule):
        def keep(x, ctx, n=round(schedule.tokens_out[0])):
            index = torch.arange(ctx.num_prefix, n, device=x.device).expand(x.shape[0], -1)
            return keep_tokens(ctx, x, index)

        install(model, {0: keep}, method=self.name, tracks_positions=self.tracks_positions)


def test_a_first_contract_plugin_still_loads_and_runs():
    plugin = _FirstContract(offset=1)
    assert plugin.options.offset == 1 and plugin.premises == Premises(tracks_positions=True)
    assert plugin.can_follow and plugin.identity_options() == {"offset": 1}
    model, arch = _tiny()
    follow = FollowSchedule(plugin, make_method("tome"))
    follow.patch(model, 2, arch)
    state = token_state(model)
    state.recording = True
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert state.observed[0] == round(follow.schedule(arch, 2).tokens_out[0])


@dataclass(frozen=True)
class _Checked:
    keep: int = 1

    def __post_init__(self):
        if self.keep < 1:
            raise ValueError(f"keep={self.keep}: at least one")


def test_a_post_init_value_error_becomes_a_harness_error():
    class WithCheck(_FirstContract):
        Options = _Checked

    with pytest.raises(HarnessError, match="method 'first_contract': keep=0: at least one"):
        WithCheck(keep=0)
