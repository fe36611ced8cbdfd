"""Figures from the fixture records, the stable method styles, and token provenance for token maps."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from harness.plots import FIGURES, KNOWN, _pareto, method_style, write_plots
from harness.registry import make_method
from harness.schedule import arch_spec
from harness.tokenmap import DROPPED, KEPT, MERGED, patch_roles, render, trace

FIXTURES = Path(__file__).parent / "fixtures"


def test_plots_written_from_fixtures(tmp_path):
    paths = write_plots(FIXTURES, tmp_path)
    assert {p.name for p in paths} == {f"{n}.{ext}" for n in FIGURES for ext in ("png", "pdf")}
    for p in paths:
        head = p.read_bytes()[:8]
        assert p.stat().st_size > 5000 and head.startswith(b"\x89PNG" if p.suffix == ".png" else b"%PDF")


def test_builtin_styles_fixed_and_distinct():
    assert method_style("tome")["color"] == KNOWN["tome"][0] and method_style("tome")["marker"] == "o"
    styles = {(method_style(m)["color"], method_style(m)["marker"]) for m in KNOWN}
    assert len(styles) == len(KNOWN)


def test_follower_takes_leader_colour():
    s = method_style("random@tome")
    assert s["color"] == method_style("tome")["color"] and s["marker"] == method_style("random")["marker"]
    assert s["linestyle"] == "--"


def test_unknown_style_stable_across_processes():
    names = ["mymethod", "pitome", "zero-tprune"]
    here = [method_style(n) for n in names]
    code = f"from harness.plots import method_style; print([method_style(n) for n in {names!r}])"
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout
        assert out.strip() == str(here)
    assert all(s["color"] not in {c for c, _ in KNOWN.values()} for s in here)


def test_pareto_front_by_hand():
    pts = [(10, 80), (20, 79), (15, 78), (30, 70), (25, 69)]
    assert _pareto(pts) == [(10, 80), (20, 79), (30, 70)]


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
