"""MCTF's own step on tiny inputs, checked by hand: the clamp, the multi-criteria score, the
bidirectional matching and the attention-weighted fusion of tokens and attention map."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from harness.methods.mctf import (MCTF, bidirectional_matching, merge_with_attention, multi_criteria_scores,
                                  tokens_removed)
from harness.schedule import Schedule, arch_spec

INF = math.inf

# Six tokens (C = 2), token 0 the class token; A = tokens 0, 2, 4 (rows), B = tokens 1, 3, 5 (columns)
X6 = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]])
# every query attends alike: the attention each token receives is (0.1, 0.1, 0.2, 0.2, 0.2, 0.2)
ATTN6 = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.2, 0.2]).expand(1, 1, 6, 6)
SIZE6 = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 3.0]).view(1, 6, 1)
# (cos + 1) / 2 of A rows 2, 4 against B columns 1, 3, 5:
#   token 2 = (0, 1):     cos 0.8, 0, 1      -> 0.9,  0.5, 1.0
#   token 4 = (0.8, 0.6): cos 0.96, 0.8, 0.6 -> 0.98, 0.9, 0.8
# info = 1 / received, over its max 10: (1, 1, .5, .5, .5, .5); products: row 2 (.5): .5, .25, .25;
#   row 4 (.5): .5, .25, .25
# size' = 1 / size over its max 1: (1, 1, .5, 1, 1, 1/3); products: row 2 (.5): .5, .5, 1/6;
#   row 4 (1): 1, 1, 1/3
# with every temperature 1: row 2: .9*.5*.5 = .225, .5*.25*.5 = .0625, 1*.25/6 = .041667
#                           row 4: .98*.5*1 = .49, .9*.25*1 = .225, .8*.25/3 = .066667
SCORES6 = torch.tensor([[[-INF, -INF, -INF], [0.225, 0.0625, 0.25 / 6], [0.49, 0.225, 0.2 / 3]]])


def test_r_is_clamped_as_the_official_code():
    assert tokens_removed(16, 197, 1) == 16
    assert tokens_removed(16, 37, 1) == 16   # 37 - 16 = 21 >= 10
    assert tokens_removed(16, 21, 1) == 10   # 21 - 16 < 10: r = 11, then at most (21 - 1) // 2 = 10
    assert tokens_removed(16, 12, 1) == 2    # r = 12 - 10
    assert tokens_removed(16, 8, 1) == 0     # never negative
    assert tokens_removed(98, 197, 1) == 98 and tokens_removed(98, 197, 3) == 97


def test_multi_criteria_score_by_hand():
    scores = multi_criteria_scores(X6, ATTN6, SIZE6, num_prefix=1, tau_sim=1, tau_info=1, tau_size=1)
    torch.testing.assert_close(scores, SCORES6, atol=1e-6, rtol=0)


def test_temperatures_flatten_their_criterion_and_zero_leaves_it_out():
    scores = multi_criteria_scores(X6, ATTN6, SIZE6, num_prefix=1, tau_sim=1, tau_info=20, tau_size=40)
    # row 4, column 5: 0.8 * 0.25^(1/20) * (1/3)^(1/40) = 0.8 * 0.933033 * 0.972908 = 0.726211
    assert scores[0, 2, 2].item() == pytest.approx(0.8 * 0.25 ** 0.05 * (1 / 3) ** 0.025, abs=1e-6)
    sim_only = multi_criteria_scores(X6, ATTN6, None, num_prefix=1, tau_sim=1, tau_info=0, tau_size=40)
    torch.testing.assert_close(sim_only[0, 1:], torch.tensor([[0.9, 0.5, 1.0], [0.98, 0.9, 0.8]]))
    # no criterion at all: every pair scores 1 except the class token's row
    flat = multi_criteria_scores(X6, None, None, num_prefix=1, tau_sim=0, tau_info=20, tau_size=40)
    assert flat[0, 1:].eq(1).all() and flat[0, 0].eq(-INF).all()


def test_bidirectional_matching_by_hand():
    # r = 2: r1 = 1, r2 = 1. A to B: best of row 4 (.49, column 1) beats row 2 (.225): token 4 fuses
    # into token 1; A left: tokens 0, 2. B to A: token 1's best is .225 (token 2), token 3's .0625,
    # token 5's .0417: token 1 (holding token 4) fuses into token 2. Kept B: 3 then 5 (score order).
    merge = bidirectional_matching(SCORES6, r=2, num_prefix=1)
    x = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]).view(1, 6, 1)
    torch.testing.assert_close(merge(x), torch.tensor([[[1.0], [10110.0], [1000.0], [100000.0]]]))
    # the same merge on the key axis of a (B, H, Tq, T, 1) map
    cols = x.view(1, 1, 1, 6, 1).expand(1, 2, 3, 6, 1)
    torch.testing.assert_close(merge(cols)[0, 1, 2, :, 0], torch.tensor([1.0, 10110.0, 1000.0, 100000.0]))


def test_kept_b_tokens_follow_their_score_order_not_their_position():
    # only B to A (r = 1): B scores 0.1 (token 1), 0.3 (token 3), 0.2 (token 5) against token 2;
    # token 3 fuses into token 2, and the kept B tokens come as 5 then 1 (0.2 before 0.1)
    scores = torch.tensor([[[-INF, -INF, -INF], [0.1, 0.3, 0.2]]])
    x = torch.tensor([1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0]).view(1, 6, 1)
    out = bidirectional_matching(scores, r=1, num_prefix=1)(x)
    assert out.flatten().tolist() == [1.0, 100.0 + 1000.0, 100000.0, 10.0]


def test_fusion_weights_tokens_and_attention_by_attention_and_size():
    # 4 tokens, r = 1: the score makes token 1 (B) fuse into token 2 (A): out = [t0, t2 + t1, t3]
    merge = bidirectional_matching(torch.tensor([[[-INF, -INF], [0.9, 0.3]]]), r=1, num_prefix=1)
    attn = torch.tensor([[0.4, 0.2, 0.2, 0.2],
                         [0.0, 0.3, 0.5, 0.2],
                         [0.2, 0.5, 0.3, 0.0],
                         [0.2, 0.2, 0.2, 0.4]]).view(1, 1, 4, 4)  # received (column means): .2 .3 .3 .2
    size = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(1, 4, 1)     # over its max 2: .5 .5 1 1
    x = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(1, 4, 1)
    x_out, size_out, attn_out = merge_with_attention(merge, x, attn, size)
    # weights received * size / max size: .1, .15, .3, .2; the fused token's norm .15 + .3 = .45
    torch.testing.assert_close(x_out.flatten(), torch.tensor([1.0, (2 * 0.15 + 4 * 0.3) / 0.45, 8.0]))
    torch.testing.assert_close(size_out.flatten(), torch.tensor([1.0, 3.0, 2.0]))
    # keys summed: query rows become [.4 .4 .2], [0 .8 .2], [.2 .8 0], [.2 .4 .4]; fused query row:
    # (.15 [0 .8 .2] + .3 [.2 .8 0]) / .45 = [.06 .36 .03] / .45
    expected = torch.tensor([[0.4, 0.4, 0.2], [0.06 / 0.45, 0.8, 0.03 / 0.45], [0.2, 0.4, 0.4]])
    torch.testing.assert_close(attn_out[0, 0], expected)


def test_every_prefix_token_stays_first_and_untouched():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 4)
    attn = torch.rand(2, 3, 12, 12).softmax(-1)
    for num_prefix in (2, 3):
        scores = multi_criteria_scores(x, attn, None, num_prefix, 1, 20, 40)
        merge = bidirectional_matching(scores, r=4, num_prefix=num_prefix)
        out, size, attn_out = merge_with_attention(merge, x, attn, None)
        assert out.shape == (2, 8, 4) and attn_out.shape == (2, 3, 8, 8)
        torch.testing.assert_close(out[:, :num_prefix], x[:, :num_prefix])
        assert size[:, :num_prefix].eq(1).all() and size.sum(1).eq(12).all()
        torch.testing.assert_close(attn_out.sum(-1), torch.ones(2, 3, 8))  # still a distribution


def test_schedule_is_the_official_count():
    arch = arch_spec(timm.create_model("deit_tiny_patch16_224", num_classes=10))
    method = MCTF()
    # golden case mctf_r16: block 0 untouched, then 16 per block
    assert list(method.schedule(arch, 16).tokens_out) == [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]
    # r = 98: 197 - 98 = 99; then 99 - 49 = 50 (half), 50 - 24, 26 - 12, 14 - 4 (r = 14 - 10), then none
    assert list(method.schedule(arch, 98).tokens_out) == [197, 99, 50, 26, 14, 10, 10, 10, 10, 10, 10, 10]
    assert method.schedule(arch, 16).stage == "pre" and method.schedule(arch, 0) == Schedule.full(arch)
    assert method.resolved_options() == {"tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0}


@pytest.mark.parametrize("kw", [dict(), dict(class_token=False, global_pool="avg"),
                                dict(class_token=False, reg_tokens=4, global_pool="avg")])
def test_forward_leaves_the_schedule_with_any_prefix(kw):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, patch_size=8, embed_dim=32, depth=4,
                              num_heads=2, num_classes=10, **kw).eval()
    arch = arch_spec(model)
    method = MCTF()
    method.patch(model, 12, arch)
    model._seam_state.recording = True
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(logits).all()
    assert model._seam_state.observed == list(method.schedule(arch, 12).tokens_out)
