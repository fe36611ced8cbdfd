"""DCT's own step on tiny inputs, checked by hand (methods/dct.py)."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from harness.methods.dct import (dct_fft, dct_lowpass, dct_lowpass_fft, dct_matrix, idct_fft, lowpass_matrix,
                                 lowpass_reducer, tokens_kept)
from harness.registry import make_method
from harness.schedule import Schedule, arch_spec
from harness.seam import BlockContext, TokenState

C1, C3 = math.cos(math.pi / 8), math.cos(3 * math.pi / 8)  # 0.92388, 0.38268
R = math.sqrt(0.5)


def test_dct_matrix_of_length_4_by_hand():
    # C[k, n] = s_k cos(pi (2n + 1) k / 8), s_0 = 1/2, s_k = sqrt(1/2)
    hand = torch.tensor([
        [0.5, 0.5, 0.5, 0.5],
        [R * C1, R * C3, -R * C3, -R * C1],       # cos(pi/8), cos(3pi/8), cos(5pi/8), cos(7pi/8)
        [0.5, -0.5, -0.5, 0.5],                   # sqrt(1/2) cos(pi/4) = 1/2, ...
        [R * C3, -R * C1, R * C1, -R * C3],       # cos(3pi/8), cos(9pi/8), cos(15pi/8), cos(21pi/8)
    ])
    torch.testing.assert_close(dct_matrix(4), hand, atol=1e-6, rtol=0)


def test_dct_of_1_2_3_4_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # X0 = 10 / 2 = 5; X1 = R C1 (1 - 4) + R C3 (2 - 3) = -2.2304; X2 = (1 - 2 - 3 + 4) / 2 = 0;
    # X3 = R C3 (1 - 4) - R C1 (2 - 3) = -0.1585
    hand = torch.tensor([5.0, -3 * R * C1 - R * C3, 0.0, -3 * R * C3 + R * C1])
    torch.testing.assert_close(dct_matrix(4) @ x, hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(dct_fft(x), hand, atol=1e-6, rtol=0)  # the reference's FFT arithmetic
    torch.testing.assert_close(idct_fft(hand), x, atol=1e-6, rtol=0)


def test_lowpass_4_to_2_by_hand():
    # keep X0 = 5, X1 = -2.2304; the length-2 DCT is [[R, R], [R, -R]], so the inverse gives
    # R (5 - 2.2304) = 1.9584 and R (5 + 2.2304) = 5.1124: the low half first, a smoothed ramp
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])  # (B=1, T=4, C=1)
    x1 = -3 * R * C1 - R * C3
    hand = torch.tensor([[[R * (5 + x1)], [R * (5 - x1)]]])
    torch.testing.assert_close(dct_lowpass(x, 2), hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(dct_lowpass_fft(x, 2), hand, atol=1e-6, rtol=0)
    # the orthonormal DC term makes the mean grow by sqrt(T / K): 2.5 -> 2.5 sqrt(2)
    assert dct_lowpass(x, 2).mean().item() == pytest.approx(2.5 * math.sqrt(2), abs=1e-6)


@pytest.mark.parametrize("length", [1, 7, 8, 196])
def test_keeping_every_coefficient_returns_the_input(length):
    torch.testing.assert_close(lowpass_matrix(length, length), torch.eye(length), atol=1e-5, rtol=0)
    x = torch.randn(2, length, 3)
    torch.testing.assert_close(dct_lowpass(x, length), x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dct_lowpass_fft(x, length), x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens_in, tokens_out", [(7, 4), (8, 5), (196, 177), (65, 59)])
def test_matrix_and_fft_paths_agree(tokens_in, tokens_out):
    x = torch.randn(3, tokens_in, 5, dtype=torch.float64)
    torch.testing.assert_close(dct_lowpass_fft(x.float(), tokens_out).double(),
                               lowpass_matrix(tokens_in, tokens_out, dtype=torch.float64) @ x, atol=1e-5, rtol=1e-5)


def test_counts_follow_the_reference_arithmetic():
    assert tokens_kept(196, 0.9) == 177  # ceil(176.4)
    assert tokens_kept(177, 0.9) == 160  # ceil(159.3)
    assert tokens_kept(10, 0.5) == 5 and tokens_kept(1, 0.5) == 1 and tokens_kept(196, 1.0) == 196


def _deit_tiny(**kw):
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", num_classes=10, **kw).eval()


def test_schedule_is_the_official_forwards_counts_after_the_mlp():
    arch = arch_spec(_deit_tiny(depth=12))
    schedule = make_method("dct").schedule(arch, 0.9)
    # tokens_per_block_observed of the golden case dct_ratio0.9 (the official forward)
    assert list(schedule.tokens_out) == [178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60]
    assert schedule.stage == "post"
    assert make_method("dct").schedule(arch, 1.0) == Schedule.full(arch)


def _ctx(num_prefix: int) -> BlockContext:
    return BlockContext(0, num_prefix, TokenState(), torch.nn.Identity(), None)


@pytest.mark.parametrize("half", [False, True])
def test_reducer_keeps_prefix_tokens_first_and_untouched(half):
    x = torch.randn(2, 2 + 10, 4)  # two prefix tokens (class + distillation), ten patches
    out = lowpass_reducer(lambda t: tokens_kept(t, 0.75), half)(x, _ctx(2))
    assert out.shape == (2, 2 + 8, 4) and out.dtype == x.dtype
    assert torch.equal(out[:, :2], x[:, :2])
    torch.testing.assert_close(out[:, 2:], dct_lowpass(x[:, 2:], 8), atol=2e-3 if half else 1e-6, rtol=1e-3 if half else 0)
    # half_tokens: every patch token is an fp16 value, as the reference's .type(torch.half) leaves it
    assert torch.equal(out[:, 2:].half().float(), out[:, 2:]) == half


def test_without_half_tokens_a_block_keeping_everything_is_the_identity():
    x = torch.randn(1, 1 + 3, 4)
    assert lowpass_reducer(lambda t: t, False)(x, _ctx(1)) is x


@pytest.mark.parametrize("kw", [dict(class_token=False, global_pool="avg"), dict(class_token=False, global_pool="map"),
                                dict(class_token=False, reg_tokens=4, global_pool="avg")])
def test_dct_needs_no_class_token_and_no_size_aware_pool(kw):
    """merges is False (uniform resampling: no unequal sizes to weigh), needs_class_token False:
    DCT runs on average-pool, register and attention-pool (MAP) heads, and filters the patches only."""
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", depth=2, num_classes=10, **kw).eval()
    arch = arch_spec(model)
    method = make_method("dct")
    method.patch(model, 0.7, arch)
    model._seam_state.recording = True
    with torch.no_grad():
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 10)
    assert model._seam_state.observed == list(method.schedule(arch, 0.7).tokens_out)
    assert model._seam_state.size is None  # DCT tracks no sizes (as the reference)


def test_identity_patches_no_reducer():
    model = _deit_tiny(depth=2)
    make_method("dct", {"dct": {"half_tokens": True}}).patch(model, 1.0, arch_spec(model))
    assert all(b._seam_reducer is None for b in model.blocks)


def test_dct_follows_another_schedule():
    model = _deit_tiny(depth=3)
    arch = arch_spec(model)
    follow = make_method("dct@tome")
    schedule = follow.schedule(arch, 16)
    follow.patch(model, 16, arch)
    model._seam_state.recording = True
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert schedule.stage == "post" and model._seam_state.observed == list(schedule.tokens_out) == [181, 165, 149]


def test_each_blocks_lowpass_matrix_is_built_once_at_patch_time():
    """The (kept, entering) matrix of every block is a buffer made by ``patch`` (it follows the model
    to its device, stays out of the weights); the forward with it equals the forward building it."""
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=3, num_classes=10).eval()
    arch = arch_spec(model)
    method = make_method("dct")
    method.patch(model, 0.9, arch)
    schedule = method.schedule(arch, 0.9)
    shapes = [tuple(b._dct_lowpass.shape) for b in model.blocks]
    assert shapes == [(schedule.tokens_out[i] - 1, schedule.tokens_entering(i) - 1) for i in range(3)]
    assert not any("_dct_lowpass" in k for k in model.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        cached = model(x)
        for blk in model.blocks:
            del blk._dct_lowpass  # the reducer then builds the matrix in the forward
        built = model(x)
    torch.testing.assert_close(cached, built, rtol=0, atol=0)
