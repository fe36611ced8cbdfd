"""Premises are checked where they are used, not only where a method declares them.

A method that reads the class token's attention, hands merged tokens (with sizes) to a head that
ignores sizes, or changes the token count without keeping token positions on a model that needs
them, is refused at that point (``UnsupportedModel``: the cell is stored ``unsupported``), whatever
it declared. Then, over every registered method, the declared premises (``needs_class_token``,
``merges``, ``tracks_positions``) must equal what the method is seen to need with the declaration
checks switched off: declarations document, the seam enforces.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from harness import seam
from harness.budget import parse_budget, resolve
from harness.errors import UnsupportedModel
from harness.seam import bipartite_soft_matching, merge_wavg
from harness.registry import get_method_class, method_names
from harness.schedule import arch_spec
from harness.seam import gather_tokens, install

# premise -> (timm name, create kwargs, image size): a model that lacks exactly that premise
LACKS = {
    "class token": ("vit_medium_patch16_gap_256", dict(img_size=128), 128),
    "size-aware pooling": ("deit_tiny_patch16_224", dict(img_size=112, global_pool="avgmax"), 112),
    "positions": ("vit_small_patch16_rope_224", dict(img_size=112), 112),
}
_MODELS: dict = {}


def _model(premise: str):
    if premise not in _MODELS:
        name, kw, size = LACKS[premise]
        torch.manual_seed(0)
        _MODELS[premise] = (timm.create_model(name, depth=2, num_classes=10, **kw).eval(),
                            torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)))
    model, x = _MODELS[premise]
    return copy.deepcopy(model), x


def _forward(model, x):
    with torch.no_grad():
        return model(x)


def _cls_ranker(x, ctx):  # reads the class token's attention, declares nothing
    return seam.keep_tokens(ctx, x, ctx.cls_attn()[:, ctx.num_prefix:].topk(4, dim=1).indices + ctx.num_prefix)


def _merger(x, ctx):  # merges with sizes, declares nothing
    x, ctx.state.size = merge_wavg(bipartite_soft_matching(ctx.keys(), 4, ctx.num_prefix), x, ctx.state.size)
    return x


def _forgetful_pruner(x, ctx):  # drops tokens with a plain gather: positions left behind
    return gather_tokens(x, torch.arange(x.shape[1] - 4).expand(x.shape[0], -1))


@pytest.mark.parametrize("premise, reducer, words", [
    ("class token", _cls_ranker, "has no class token"),
    ("size-aware pooling", _merger, "pooling counts a merged token once"),
    ("positions", _forgetful_pruner, "without keeping token positions in sync"),
])
def test_an_undeclared_premise_is_refused_where_it_is_used(premise, reducer, words):
    model, x = _model(premise)
    install(model, {0: reducer}, method="outsider", tracks_positions=True)  # declares no other premise
    with pytest.raises(UnsupportedModel, match=words) as refusal:
        _forward(model, x)
    assert "outsider" in str(refusal.value)


def test_a_premise_the_model_gives_runs():
    model, x = _model("size-aware pooling")  # it has a class token
    install(model, {0: _cls_ranker}, method="outsider")
    assert _forward(model, x).shape == (2, 10)


def test_a_refusal_at_use_is_an_unsupported_record(monkeypatch):
    from harness import execute

    def measure(self, *args):
        model, x = _model("class token")
        install(model, {0: _cls_ranker}, method="outsider")
        _forward(model, x)

    monkeypatch.setattr(execute.Executor, "measure_cell", measure)
    executor = execute.Executor.__new__(execute.Executor)
    executor.run = type("Run", (), {"attention": "fused", "sdpa_backend": "auto", "prop_attn": "mask"})()
    executor.env = {}
    record = executor.run_cell(None, None, None, {}, "cell")
    assert record["status"] == "unsupported" and "no class token" in record["error"]


# ----------------------------------------------------------------------------- declared == observed

def _observed_refusal(name: str, premise: str, monkeypatch) -> str:
    """What ``name`` is refused for on the model that lacks ``premise``, with the declared checks off."""
    monkeypatch.setattr(seam, "check_premises", lambda model, *a, **k: seam.prefix_layout(model))
    model, x = _model(premise)
    cls = get_method_class(name)
    method = cls()
    arch = arch_spec(model)
    try:
        method.patch(model, resolve(method, arch, parse_budget("0.7")).knob_value, arch)
        _forward(model, x)
    except UnsupportedModel as exc:
        return str(exc)
    return ""


REDUCING = [n for n in method_names() if get_method_class(n).knob is not None
            and not get_method_class(n).needs_calibration and not get_method_class(n).baseline]


@pytest.mark.slow
@pytest.mark.parametrize("name", REDUCING)
def test_declared_premises_equal_the_observed_ones(name, monkeypatch):
    declared = get_method_class(name)().premises
    needs_cls = "has no class token" in _observed_refusal(name, "class token", monkeypatch)
    assert needs_cls == declared.needs_class_token, f"{name}: needs_class_token declared {declared.needs_class_token}"
    merges = "counts a merged token once" in _observed_refusal(name, "size-aware pooling", monkeypatch)
    assert merges == declared.merges, f"{name}: merges declared {declared.merges}"
    positions = _observed_refusal(name, "positions", monkeypatch)
    if "stage 'pre'" in positions or "fused qkv projection" in positions:
        # refused on position families before positions matter (it attends before the block's
        # attention, or reads a projection these blocks lack): it must not claim to track them
        assert not declared.tracks_positions, f"{name} declares tracks_positions but cannot run there: {positions}"
        return
    assert ("token positions" not in positions) == declared.tracks_positions, \
        f"{name}: tracks_positions declared {declared.tracks_positions}, observed: {positions or 'runs'}"
