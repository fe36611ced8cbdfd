"""The lower-resolution baseline (``resolution``): its grid, schedule, GMACs and logits, checked by hand."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn

from harness.sweep.budget import off_target, parse_budget, resolve
from harness.errors import UnsupportedModel
from harness.methods.resolution import allowed_grids, grid_for_fraction, native_side
from harness.registry import get_method_class, make_method
from harness.schedule import Schedule, analytic_gmacs, arch_spec


def _deit_tiny(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", **kw).eval()


def test_allowed_grids_are_near_square_and_ordered_by_patches():
    # |h - w| <= 1, neither side above 3: 1, 2, 4, 6, 9 patches
    assert allowed_grids(3) == [(1, 1), (1, 2), (2, 2), (2, 3), (3, 3)]


@pytest.mark.parametrize("fraction, grid", [
    (1.0, (14, 14)),        # 196 patches: the native grid
    (0.99, (13, 14)),       # 194.04: 196 too many, 13 x 14 = 182 fits
    (182 / 196, (13, 14)),  # exactly 182 (not 181.99..., which would give 13 x 13)
    (0.9, (13, 13)),        # 176.4: 182 too many, 169 fits
    (0.7, (11, 12)),        # 137.2: 144 too many, 132 fits
    (0.5, (9, 10)),         # 98: 100 too many, 90 fits
    (0.005, (1, 1)),        # 0.98: below one patch, still one patch
    (0.0, (1, 1)),
])
def test_grid_for_a_fraction_by_hand(fraction, grid):
    assert grid_for_fraction(fraction, 14) == grid


def test_a_non_square_native_grid_is_unsupported():
    assert native_side(196) == 14
    with pytest.raises(UnsupportedModel, match="square"):
        native_side(14 * 16)


def test_schedule_is_the_grid_plus_the_class_token_in_every_block():
    arch = arch_spec(_deit_tiny())
    method = make_method("resolution")
    assert method.schedule(arch, 0.7) == Schedule(1 + 132, (133,) * 12)
    assert method.schedule(arch, 1.0) == Schedule.full(arch)
    assert get_method_class("resolution").baseline and not get_method_class("tome").baseline


def test_gmacs_at_12x12_by_hand():
    # DeiT-Ti: width 192, MLP 768, 12 blocks; N tokens, P patches:
    #   block = N (4 * 192^2 + 2 * 192 * 768) + 2 N^2 192 = 442368 N + 384 N^2
    #   stem = P * (3 * 16 * 16) * 192 = 147456 P, head = 192 * 1000
    # 14 x 14: N 197 -> 12 * (87146496 + 14902656) + 28901376 + 192000 = 1253683200
    # 12 x 12: N 145 -> 12 * (64143360 + 8073600) + 21233664 + 192000 = 888029184
    arch = arch_spec(_deit_tiny())
    method = make_method("resolution")
    full = analytic_gmacs(arch, Schedule.full(arch))
    at = analytic_gmacs(arch, method.schedule(arch, 144 / 196))
    assert full == pytest.approx(1.2536832) and at == pytest.approx(0.888029184)


@pytest.mark.parametrize("budget, grid, within", [
    # tiny's ratios: 13x14 0.9195, 13x13 0.8461; 12x12 0.7083, 11x12 0.6439; 10x11 0.5284, 10x10 0.4771
    ("0.9", (13, 14), False),  # +2.2 %: off target
    ("0.7", (12, 12), True),   # +1.2 %: the step above the target, which the solver must reach
    ("0.5", (10, 10), False),  # -4.6 %: off target
])
def test_budgets_solve_to_the_nearest_grid_and_say_when_off_target(budget, grid, within):
    arch = arch_spec(_deit_tiny())
    method = make_method("resolution")
    res = resolve(method, arch, parse_budget(budget))
    assert method.grid(arch, res.knob_value) == grid
    assert res.schedule == method.schedule(arch, res.knob_value)  # the stored knob gives the same grid again
    assert (off_target(res.gmacs, res.gmacs_target) is None) == within


def test_identity_patches_nothing():
    model = _deit_tiny()
    pos = model.pos_embed.detach().clone()
    make_method("resolution").patch(model, 1.0, arch_spec(model))
    assert not model.patch_embed._forward_pre_hooks
    assert torch.equal(model.pos_embed, pos)


def test_logits_equal_timms_own_model_at_that_size_fed_the_resized_image():
    model = _deit_tiny()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    arch = arch_spec(model)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        unpatched = model(x)
    make_method("resolution").patch(model, 182 / 196, arch)  # 13 x 14 patches: 208 x 224 pixels
    # timm's own model made at 208 x 224, the position embedding resampled by timm's checkpoint filter
    ref = timm.create_model("deit_tiny_patch16_224", img_size=(208, 224)).eval()
    ref.load_state_dict(checkpoint_filter_fn(weights, ref))
    small = F.interpolate(x, size=(208, 224), mode="bilinear", antialias=True, align_corners=False)
    model._seam_state.recording = True
    with torch.no_grad():
        got, want = model(x), ref(small)
    assert model.pos_embed.shape == ref.pos_embed.shape == (1, 1 + 182, 192)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert model._seam_state.observed == [183] * 12
    assert not torch.allclose(got, unpatched, atol=1e-3)  # a real change: another image, fewer tokens


def _sweep_with_resolution(root):
    """tests/fixtures/sweep.py's sweep plus a ``resolution`` cell at 0.7 (environment A, 150/200 right)."""
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("sweep", Path(__file__).parent / "fixtures" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recs = mod.write_sweep(root)
    res = {**recs["topk"], "cell_id": "res", "method": "resolution", "knob": "patches", "knob_value": 0.734693,
           "top1": 0.75, "predictions": None, "speedup_rounds": [1.38, 1.4, 1.42]}
    (root / "records" / "res.json").write_text(json.dumps(res))


def test_report_lists_the_reference_after_none_and_says_so(tmp_path):
    from harness.reporting.report import environments, is_reference, load_frame, markdown_table, method_rank, model_rows

    from harness.registry import _builtin_modules, _read_sources

    assert is_reference("resolution") and not is_reference("none") and not is_reference("random@resolution")
    # read from the source where the module is not imported yet (a report imports no torch)
    infos = {i.name: i for i in _read_sources(_builtin_modules())[0]}
    assert infos["resolution"].baseline and not infos["tome"].baseline
    assert sorted(["tome", "resolution", "none", "evit"], key=method_rank) == ["none", "resolution", "evit", "tome"]
    _sweep_with_resolution(tmp_path / "r")
    env_a = environments(load_frame(tmp_path / "r"))[0][1]
    rows = model_rows(env_a)
    assert [(r["budget"], r["method"]) for r in rows] == [("baseline", "none"), ("0.7", "resolution"),
                                                          ("0.7", "tome"), ("0.7", "topk")]
    assert "| resolution (baseline) |" in markdown_table(rows)


def test_plots_draw_the_reference_as_a_black_dashed_line(tmp_path):
    from harness.reporting.plots import accuracy_vs_gmacs, method_order, method_style, paper_style
    from harness.reporting.report import environments, load_frame

    assert method_style("resolution")["color"] == "#000000" and method_style("resolution")["linestyle"] == "--"
    assert method_style("tome")["linestyle"] == "-"
    assert method_order(["tome", "resolution (baseline)", "none"]) == ["none", "resolution (baseline)", "tome"]
    _sweep_with_resolution(tmp_path / "r")
    with paper_style() as plt:
        fig = accuracy_vs_gmacs(plt, environments(load_frame(tmp_path / "r")))
        line = next(ln for ln in fig.axes[0].lines if ln.get_label() == "resolution (baseline)")
        assert line.get_color() == "#000000" and line.get_linestyle() == "--"
        assert (0.7, 75.0) in zip(line.get_xdata(), line.get_ydata())
        assert "resolution (baseline)" in [t.get_text() for t in fig.legends[0].get_texts()]
        plt.close("all")


def test_a_hybrid_stem_is_refused_below_the_identity():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_r26_s32_224", num_classes=10).eval()
    with pytest.raises(UnsupportedModel, match="hybrid stem"):
        make_method("resolution").patch(model, 0.5, arch_spec(model))
