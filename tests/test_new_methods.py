"""Each new method's own step on a tiny input, checked by hand (issue 15)."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from harness.errors import UnsupportedModel
from harness.registry import make_method
from harness.schedule import arch_spec
from harness.methods.pitome import energy_scores, pitome_match, tokens_merged
from harness.methods.tofu import fuse_mlerp, tokens_removed


def test_tofu_counts_follow_the_reference_arithmetic():
    assert tokens_removed(197, 0.9, 1) == 19  # floor(197 - 177.3)
    assert tokens_removed(178, 0.9, 1) == 17
    assert tokens_removed(197, 1.0, 1) == 0
    assert tokens_removed(11, 0.1, 1) == 5  # clamped to half the non-prefix tokens


def test_mlerp_is_the_mean_rescaled_to_the_largest_norm_over_the_partners_old_norm():
    b = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # norms 1 and 2
    moved = torch.tensor([[[0.0, 3.0]]])          # norm 3, fused into row 0
    index = torch.zeros(1, 1, 2, dtype=torch.long)
    out = fuse_mlerp(b, index, moved)
    # row 0: mean (0.5, 1.5), divided by its old norm 1, times max(1, 3) = 3
    torch.testing.assert_close(out[0, 0], torch.tensor([1.5, 4.5]))
    torch.testing.assert_close(out[0, 1], torch.tensor([0.0, 2.0]))  # nothing fused: unchanged


def test_pitome_energy_by_hand():
    metric = torch.tensor([[[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]])  # unit vectors: cos 0.8, 0, 0.6
    sim, energy = energy_scores(metric, margin=0.5)
    elu = lambda v: v if v > 0 else math.exp(v) - 1  # noqa: E731
    rows = [[1.0, 0.8, 0.0], [0.8, 1.0, 0.6], [0.0, 0.6, 1.0]]
    hand = [sum(elu(v - 0.5) for v in row) / 3 for row in rows]  # 0.1355, 0.3, 0.0688
    torch.testing.assert_close(sim[0], torch.tensor(rows), atol=1e-6, rtol=0)
    torch.testing.assert_close(energy[0], torch.tensor(hand), atol=1e-6, rtol=0)
    assert energy[0].argsort(descending=True).tolist() == [1, 0, 2]  # the middle token is the most redundant


def test_pitome_merges_the_2r_most_redundant_and_protects_the_rest():
    # 4 tokens ranked 2, 0, 3, 1 by energy; r = 1: token 2 (A) merges into token 0 (B, its only
    # partner); tokens 3 and 1 are protected and come first, in energy order
    order = torch.tensor([[2, 0, 3, 1]])
    sim = torch.eye(4).unsqueeze(0)
    x = torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]])
    out = pitome_match(sim, order, r=1, bipartite=False)(x)
    torch.testing.assert_close(out, torch.tensor([[[1000.0], [10.0], [101.0]]]))
    assert tokens_merged(196, 0.9) == 19 and tokens_merged(10, 0.1) == 5


def _deit_tiny_arch():
    return arch_spec(timm.create_model("deit_tiny_patch16_224", num_classes=10))


@pytest.mark.parametrize("name, undefined, defined", [
    # ToFu: the reference's matching takes the class token at ratio 0.5 exactly (block 2: T = 50)
    ("tofu", [0.5], [0.5001, 0.6, 0.9, 0.999]),
    # PiToMe: a late block with nothing to merge (IndexError in the official code): <= 0.63 and near 1
    ("pitome", [0.5, 0.6, 0.63, 0.995], [0.64, 0.7, 0.9, 0.99]),
])
def test_ratios_where_the_reference_is_undefined_are_refused(name, undefined, defined):
    arch, method = _deit_tiny_arch(), make_method(name, {})
    assert [v for v in undefined + defined if method.undefined_at(arch, v)] == undefined
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10)
    with pytest.raises(UnsupportedModel, match="undefined"):
        method.patch(model, undefined[0], arch)
