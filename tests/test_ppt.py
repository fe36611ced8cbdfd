"""PPT's own step on tiny inputs, checked by hand, and its importance variance against the official code."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch

from harness.errors import HarnessError, UnsupportedModel
from harness.methods.ppt import importance, pools, prune, prune_or_pool, tokens_after
from harness.registry import make_method
from harness.schedule import arch_spec


def test_importance_and_its_variance_by_hand():
    # class token first; non-prefix tokens attended 0.2, 0.3, 0.1 with value norms 1, 2, 3
    cls_attn = torch.tensor([[0.4, 0.2, 0.3, 0.1]])
    values = torch.tensor([[[5.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    scores = importance(cls_attn, values, num_prefix=1)
    # 0.2 x 1, 0.3 x 2, 0.1 x 3 = 0.2, 0.6, 0.3, sum 1.1 -> 2/11, 6/11, 3/11 (the class token's value is unread)
    torch.testing.assert_close(scores, torch.tensor([[2 / 11, 6 / 11, 3 / 11]]))
    # deviations from the mean 1/3: -5/33, 7/33, -2/33; unbiased: (25 + 49 + 4) / 33² / 2 = 39/1089 = 0.035813
    torch.testing.assert_close(scores.var(dim=1), torch.tensor([39 / 1089]))
    assert pools(scores, 0.036).tolist() == [True]   # about equally important: pool
    assert pools(scores, 0.035).tolist() == [False]  # uneven: prune
    # the head factor cancels: summed over 3 heads or averaged, the same importance
    torch.testing.assert_close(importance(3 * cls_attn, values, 1), scores)


def test_prune_keeps_the_most_important_in_descending_order_with_their_sizes():
    x = torch.tensor([[[0.0], [10.0], [20.0], [30.0], [40.0]]])
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [2.0]]])
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3]])  # tokens 1..4
    out, out_size = prune(x, size, scores, r=2, num_prefix=1)
    # keep 2 of 4: token 2 (0.4), then token 4 (0.3); the class token stays first
    assert out[0, :, 0].tolist() == [0.0, 20.0, 40.0]
    assert out_size[0, :, 0].tolist() == [1.0, 3.0, 2.0]


def test_each_image_takes_its_own_branch():
    # two copies of one image of 5 tokens (class + 4); keys: token 2 = (1, 1) is closest to B token
    # 3 = (1, 1.1) (cos 0.9989), token 4 = (1, -1) to B token 3 too (cos -0.048): ToMe (r = 1) merges
    # A token 2 into B token 3
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.1], [1.0, -1.0]]]).expand(2, -1, -1)
    x = torch.tensor([[[0.0], [10.0], [20.0], [30.0], [40.0]]]).expand(2, -1, -1)
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0], [1.0]]]).expand(2, -1, -1)
    # image 0: variance of (0.1, 0.4, 0.2, 0.3) = (2 x 0.15² + 2 x 0.05²) / 3 = 0.01667 > 0.01: prune
    # image 1: all equal, variance 0 < 0.01: pool
    scores = torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.25, 0.25, 0.25, 0.25]])
    out, out_size = prune_or_pool(x, size, metric, scores, r=1, threshold=0.01, num_prefix=1)
    # pruned: tokens 2 (0.4), 4 (0.3), 3 (0.2) after the class token, sizes gathered
    assert out[0, :, 0].tolist() == [0.0, 20.0, 40.0, 30.0]
    assert out_size[0, :, 0].tolist() == [1.0, 3.0, 1.0, 1.0]
    # pooled: [class, unmerged A (token 4), B (token 1, token 3 + 2)]: (3 x 20 + 1 x 30) / 4 = 22.5, size 4
    assert out[1, :, 0].tolist() == [0.0, 40.0, 10.0, 22.5]
    assert out_size[1, :, 0].tolist() == [1.0, 1.0, 1.0, 4.0]


def test_r_is_clamped_to_half_the_non_prefix_tokens_and_zero_does_nothing():
    x = torch.arange(5.0).view(1, 5, 1)
    out, out_size = prune_or_pool(x, None, torch.randn(1, 5, 2), torch.full((1, 4), 0.25), r=9, threshold=0.0,
                                  num_prefix=1)
    assert out.shape[1] == 3 and out_size.shape[1] == 3  # min(9, 4 // 2) = 2 removed
    same, no_size = prune_or_pool(x, None, torch.randn(1, 5, 2), torch.full((1, 4), 0.25), r=0, threshold=0.0,
                                  num_prefix=1)
    assert same is x and no_size is None


def test_schedule_as_the_official_forward_left_it():
    # r = 50 at blocks 3, 6, 9 of DeiT (197 tokens): 147, 97, then min(50, 96 // 2) = 48 -> 49
    assert tokens_after(197, 50, (3, 6, 9), 12, 1) == (197,) * 3 + (147,) * 3 + (97,) * 3 + (49,) * 3
    assert tokens_after(197, 0, (3, 6, 9), 12, 1) == (197,) * 12


def test_pp_blocks_scale_with_depth_or_follow_the_option():
    method = make_method("ppt")
    assert method.pp_blocks(12) == (3, 6, 9)
    assert method.pp_blocks(24) == (6, 12, 18)
    assert method.pp_blocks(4) == (1, 2, 3)
    assert make_method("ppt", {"ppt": {"pp_loc_list": [9, 3]}}).pp_blocks(12) == (3, 9)
    with pytest.raises(HarnessError, match="outside blocks"):
        make_method("ppt", {"ppt": {"pp_loc_list": [3, 6, 9]}}).pp_blocks(6)


def _vit(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", depth=2, num_classes=10, **kw).eval()


@pytest.mark.parametrize("kw, words", [(dict(class_token=False, global_pool="avg"), "no class token"),
                                       (dict(global_pool="avgmax"), "merges tokens")])
def test_premises_class_token_and_size_aware_pool(kw, words):
    model = _vit(**kw)
    with pytest.raises(UnsupportedModel, match=words):
        make_method("ppt").patch(model, 16, arch_spec(model))


def test_identity_patches_nothing_so_checks_nothing():
    model = _vit(class_token=False, global_pool="avg")
    make_method("ppt").patch(model, 0, arch_spec(model))
    assert all(blk._seam_reducer is None for blk in model.blocks)


@pytest.mark.slow
def test_importance_variance_and_branch_match_the_official_code(shared, monkeypatch):
    """S_op per image at each pp block and the branch it picks, as the official forward recorded them."""
    import harness.methods.ppt as ppt
    from harness.sweep.cell import prepare_cell
    from harness.loading.models import load_checkpoint, resolve_model

    meta = json.loads((shared / "fidelity" / "deit_tiny_cifar10_newmethods_golden.json").read_text())
    case = meta["cases"]["ppt_r50_thr7e-05"]
    with np.load(shared / "fidelity" / "deit_tiny_cifar10_newmethods_golden.npz") as npz:
        u8, mean, std = npz["images_uint8"], npz["mean"], npz["std"]
    x = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - torch.from_numpy(mean).view(1, 3, 1, 1)) \
        / torch.from_numpy(std).view(1, 3, 1, 1)
    spec = resolve_model(meta["model"], {}, shared)
    knob = dict(case["knob"])
    method = make_method("ppt", {"ppt": {k: v for k, v in knob.items() if k != "r"}})
    model = prepare_cell(spec, method, knob_value=knob["r"], state_dict=load_checkpoint(spec)).model

    variances = []
    real = ppt.importance

    def spy(*args):
        scores = real(*args)
        variances.append(scores.var(dim=1))
        return scores

    monkeypatch.setattr(ppt, "importance", spy)
    with torch.inference_mode():
        model(x)
    assert len(variances) == 3
    for block, got in zip(("3", "6", "9"), variances):
        want = torch.tensor(case["s_op_per_pp_block"][block], dtype=torch.float64)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0)
        branches = ["pool" if v < knob["threshold"] else "prune" for v in got.tolist()]
        assert branches == case["branch_per_pp_block"][block]
