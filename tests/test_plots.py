"""Figures from the fixture records, the stable method styles, and token provenance for token maps."""
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from harness.reporting.plots import (FIGURES, FORMATS, KNOWN, WIDTHS, accuracy_vs_gmacs, method_style, paper_style,
                           speedup_vs_ideal, write_plots)
from harness.reporting.report import environments, load_frame
from harness.measurement.stats import wilson
from harness.registry import make_method
from harness.schedule import arch_spec
from harness.measurement.tokenmap import DROPPED, KEPT, MERGED, patch_roles, render, trace

FIXTURES = Path(__file__).parent / "fixtures"


HEADS = {".png": b"\x89PNG", ".pdf": b"%PDF", ".pgf": b"%% Creator: Matplotlib, PGF backend"}


def test_plots_written_from_fixtures(tmp_path):
    paths = write_plots(FIXTURES, tmp_path, widths=("double",))
    assert {p.name for p in paths} == {f"{n}.{ext}" for n in FIGURES for ext in FORMATS}
    for p in paths:
        assert p.stat().st_size > 5000 and p.read_bytes().startswith(HEADS[p.suffix])
    pgf = (tmp_path / "figures" / "accuracy_vs_gmacs.pgf").read_text()
    assert r"\begin{pgfpicture}" in pgf and "DeiT-T" in pgf  # titled from the card fields, not the identifier


@pytest.mark.slow
def test_every_width_and_format_and_byte_for_byte_again(tmp_path):
    paths = write_plots(FIXTURES, tmp_path)
    assert {p.name for p in paths} == {f"{n}{w}.{ext}" for n in FIGURES for w in WIDTHS.values() for ext in FORMATS}
    first = {p: p.read_bytes() for p in paths}
    write_plots(FIXTURES, tmp_path)
    # no dates in PNG, PDF or PGF: regenerated, every file is the same
    assert all(p.read_bytes() == data for p, data in first.items())


def _sweep(root):
    """The current-format sweep of tests/fixtures/sweep.py, plus an ok cell that names no image count."""
    spec = importlib.util.spec_from_file_location("sweep", FIXTURES / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    recs = mod.write_sweep(root)
    bare = {k: v for k, v in recs["topk"].items() if k not in ("n_images", "predictions", "speedup_rounds")}
    (root / "records" / "bare.json").write_text(json.dumps({**bare, "cell_id": "bare", "method": "random", "top1": 0.75}))


def _bars(ax):
    """Every error bar of a panel as ((x, low), (x, high)) segments."""
    return [seg for c in ax.containers for seg in c.lines[2][0].get_segments()]


def test_plots_draw_intervals_and_off_target_hollow(tmp_path):
    _sweep(tmp_path / "r")
    # every figure but the control one (no random@method stored here), in every format
    assert len(write_plots(tmp_path / "r", tmp_path / "rep", widths=("double",))) == len(FORMATS) * (len(FIGURES) - 1)
    envs = environments(load_frame(tmp_path / "r"))
    assert [e["label"] for e, _ in envs] == ["m (torch 2.4.0)", "m (torch 2.5.0)"]
    with paper_style() as plt:
        ax = accuracy_vs_gmacs(plt, envs).axes[0]
        # evit's off-target cell: hollow, at the 0.55 GMACs it reached (not its 0.5 budget)
        hollow = [ln for ln in ax.lines if ln.get_markerfacecolor() == "white" and len(ln.get_xdata())]
        assert [(list(ln.get_xdata()), list(ln.get_ydata())) for ln in hollow] == [([0.55], [70.0])]
        assert hollow[0].get_color() == method_style("evit")["color"]
        # 95 % Wilson bars: the baseline's 160/200 and tome's 158/200; the cell without n_images has none
        bars = _bars(ax)
        for x, k in ((1.0, 160), (0.7, 158)):
            low, high = wilson(k, 200)
            assert any(np.allclose(seg, [[x, 100 * low], [x, 100 * high]]) for seg in bars)
        assert not any(np.isclose(seg[0][1], 75.0) or np.isclose(seg[1][1], 75.0) for seg in bars)
        assert any(75.0 in ln.get_ydata() for ln in ax.lines)  # drawn all the same
        # tome's version 1 (50 %) is superseded: not drawn
        assert not any(50.0 in ln.get_ydata() for ln in ax.lines)
        ax = speedup_vs_ideal(plt, envs).axes[0]
        # tome's interleaved speed-up: median 1.4 at ideal 1 / 0.7, its quartiles 1.3 and 1.5 as the bar
        assert any(np.allclose(seg, [[1 / 0.7, 1.3], [1 / 0.7, 1.5]]) for seg in _bars(ax))
        plt.close("all")


def test_builtin_styles_fixed_and_distinct():
    assert method_style("tome")["color"] == KNOWN["tome"][0] and method_style("tome")["marker"] == "o"
    # every method has its own marker (greyscale), and its own colour except the black references
    assert len({method_style(m)["marker"] for m in KNOWN}) == len(KNOWN)
    colours = [method_style(m)["color"] for m in KNOWN if m not in ("none", "resolution")]
    assert len(set(colours)) == len(colours)
    # the methods being added already have theirs
    assert {"reprshift", "gtp", "dynamicvit"} <= set(KNOWN)


def test_okabe_ito_first_then_tol():
    from harness.reporting.style import OKABE_ITO, TOL

    reducing = [m for m in KNOWN if m not in ("none", "resolution", "random")]
    colours = [KNOWN[m][0] for m in reducing]
    assert colours[:len(OKABE_ITO)] == list(OKABE_ITO.values())
    assert set(colours[len(OKABE_ITO):]) <= set(TOL.values())


def test_follower_is_its_leaders_control():
    s = method_style("random@tome")
    assert s["color"] == method_style("tome")["color"] and s["marker"] == method_style("tome")["marker"]
    assert s["linestyle"] == "--" and s["markerfacecolor"] == "white"
    # never a new colour, for an outside plugin's method too
    assert method_style("random@mymethod")["color"] == method_style("mymethod")["color"]


def test_unknown_style_stable_across_processes():
    names = ["mymethod", "another-method", "zero-tprune-v2"]
    here = [method_style(n) for n in names]
    code = f"from harness.reporting.plots import method_style; print([method_style(n) for n in {names!r}])"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout
        assert out.strip() == str(here)
    assert all(s["color"] not in {c for c, *_ in KNOWN.values()} for s in here)
    assert all(s["marker"] not in {m for _, m, _ in KNOWN.values()} for s in here)


def test_patch_roles_by_hand():
    # 1 prefix token, 4 patches: token 1 = patch 0 alone, token 2 = patches 1 and 3, patch 2 gone
    src = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 1]], dtype=torch.bool)
    role, owner = patch_roles(src)
    assert role.tolist() == [KEPT, MERGED, DROPPED, MERGED] and owner.tolist() == [1, 2, -1, 2]
    img = render(torch.rand(8, 8, 3).numpy(), src, grid=2)
    assert img.shape == (8, 8, 3) and 0 <= img.min() and img.max() <= 1


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10).eval()
    return model, arch_spec(model), torch.randn(2, 3, 224, 224)


@pytest.mark.parametrize("name,value", [("tome", 8), ("evit", 0.7), ("topk", 0.5), ("random", 0.6), ("none", None)])
def test_provenance_tracking(tiny, name, value):
    model, arch, x = tiny
    method = make_method(name)
    patched = []

    def make():
        m = copy.deepcopy(model)
        method.patch(m, value, arch)
        patched.append(m)
        return m

    tr = trace(make, x)  # also checks tracked logits == untracked logits
    schedule = method.schedule(arch, value).tokens_out
    assert [s.shape[1] for s in tr.sources] == list(schedule)
    last = tr.sources[-1]
    assert (last.sum(1) <= 1).all()  # a patch belongs to at most one token
    assert not last[:, 0].any()  # the class token stands for no patch
    per_token = last.sum(2)[:, 1:]
    if name == "tome":  # sources agree with the sizes ToMe itself carries
        assert torch.equal(per_token, patched[0]._seam_state.size[:, 1:, 0].round().long())
        assert last.sum() == 2 * 196
    elif name in ("topk", "random", "none"):  # pruning: one patch per token, the rest dropped
        assert (per_token == 1).all() and last.sum() == 2 * (schedule[-1] - 1)
    else:  # EViT: the fused (last) token holds everything dropped; an earlier fused token may survive
        assert (per_token[:, -1] > 1).all() and last.sum() == 2 * 196
        assert ((per_token > 1).sum(1) <= 3).all()  # at most one fused token per drop block


@pytest.mark.parametrize("name,value,words", [("dct", 0.9, "negative weights"), ("mctf", 8, "changed the logits")])
def test_methods_the_tracking_cannot_follow_are_refused(tiny, name, value, words):
    """DCT mixes tokens with negative weights (no groups of patches); MCTF's matching reads token
    values, so the extra channels change its choice: both refused, never drawn wrong."""
    model, arch, x = tiny
    method = make_method(name)

    def make():
        m = copy.deepcopy(model)
        method.patch(m, value, arch)
        return m

    with pytest.raises(RuntimeError, match=words):
        trace(make, x)
