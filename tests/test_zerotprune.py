"""Zero-TPrune's own steps on tiny inputs, checked by hand."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from harness.methods.zerotprune import (ZeroTPrune, aggregate_heads, kept_per_drop,
                                        select_tokens, split_removal, weighted_page_rank)
from harness.schedule import arch_spec
from harness.seam import BlockContext, TokenState, install


def test_weighted_page_rank_by_hand():
    # rows: who attends; columns: who is attended. Token 1 is attended by everyone.
    attn = torch.tensor([[0.2, 0.8, 0.0],
                         [0.0, 0.5, 0.5],
                         [0.0, 1.0, 0.0]]).expand(1, 1, 3, 3)
    # s0 = (1/3, 1/3, 1/3); s1(j) = sum_i s0(i) A(i, j) = column sums / 3 = (0.2, 2.3, 0.5) / 3
    s1 = torch.tensor([1 / 15, 23 / 30, 1 / 6])
    # s2(0) = 0.2 s1(0) = 1/75; s2(1) = 0.8/15 + 0.5 * 23/30 + 1/6 = 181/300; s2(2) = 0.5 * 23/30 = 23/60
    s2 = torch.tensor([1 / 75, 181 / 300, 23 / 60])
    torch.testing.assert_close(weighted_page_rank(attn, 1)[0, 0], s1)
    torch.testing.assert_close(weighted_page_rank(attn, 2)[0, 0], s2)
    assert weighted_page_rank(attn, 2).sum().item() == pytest.approx(1.0)  # stays a distribution
    # in-degree alone (one round) ranks token 2 above token 0; so does the second round, with token 0
    # losing further because the only token attending to it (itself) is unimportant
    assert weighted_page_rank(attn, 2)[0, 0].argsort(descending=True).tolist() == [1, 2, 0]


def test_rms_over_heads_emphasises_a_token_one_head_ranks_high():
    # token 0: (1.0, 0.0) over two heads; token 1: (0.3, 0.75)
    scores = torch.tensor([[[1.0, 0.3], [0.0, 0.75]]])  # (B=1, H=2, N=2)
    # mean: (0.5, 0.525) -> token 1 first; rms: (sqrt(0.5) = 0.7071, sqrt(0.32625) = 0.5712) -> token 0 first
    torch.testing.assert_close(aggregate_heads(scores, "mean")[0], torch.tensor([0.5, 0.525]))
    torch.testing.assert_close(aggregate_heads(scores, "rms")[0], torch.tensor([math.sqrt(0.5), math.sqrt(0.32625)]))


def _example():
    """A prefix token and four body tokens 1..4 with importance 0.4, 0.1, 0.3, 0.2."""
    importance = torch.tensor([[0.0, 0.4, 0.1, 0.3, 0.2]])  # the prefix token scores lowest of all
    metric = torch.tensor([[[0.0, 0.0],     # prefix (never compared)
                            [1.0, 0.0],     # 1
                            [1.0, -1.0],    # 2: unimportant but unlike the others (cos 0.71 to token 1)
                            [0.0, 1.0],     # 3
                            [1.0, 0.05]]])  # 4: nearly a copy of token 1 (cos 0.9988)
    return importance, metric


def test_i_stage_prunes_the_least_important_never_the_prefix():
    importance, metric = _example()
    assert select_tokens(importance, metric, 1, num_i=1, num_s=0).tolist() == [[0, 1, 3, 4]]
    assert select_tokens(importance, metric, 1, num_i=2, num_s=0).tolist() == [[0, 1, 3]]


def test_s_stage_prunes_the_unimportant_token_most_like_an_important_one():
    importance, metric = _example()
    # by importance: 1, 3 | 4, 2 (important | unimportant). Token 4's best cosine to {1, 3} is 0.9988,
    # token 2's is 0.7071: the S-stage prunes 4 where the I-stage alone would prune 2
    assert select_tokens(importance, metric, 1, num_i=0, num_s=1).tolist() == [[0, 1, 2, 3]]
    # I-stage first drops 2; survivors 1, 3, 4 -> groups {1, 3} | {4}; the S-stage drops 4
    assert select_tokens(importance, metric, 1, num_i=1, num_s=1).tolist() == [[0, 1, 3]]


def test_counts_are_fixed_python_ints():
    assert kept_per_drop(196, 0.7, 3) == [137, 96, 67]  # int(137.2), int(96.04), int(67.228)
    assert kept_per_drop(196, 1.0, 3) == [196, 196, 196]
    assert kept_per_drop(196, 0.01, 3) == [1, 1, 1]
    assert split_removal(59, 137, 0.5) == (29, 30)  # 29.5 rounds half up to 30
    assert split_removal(10, 3, 1.0) == (7, 3)      # the S-stage prunes at most what stays
    assert split_removal(10, 3, 0.0) == (10, 0)
    assert split_removal(5, 10, 0.5) == (2, 3)      # 2.5 rounds up too (Python's round would give 2)


def test_attention_probs_match_the_class_attention_row():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=1, img_size=32, patch_size=8, num_classes=3).eval()
    seen = {}

    def spy(x, ctx):
        seen["probs"], seen["cls"] = ctx.attention(), ctx.cls_attn()
        return x

    install(model, {0: spy})
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    probs = seen["probs"]
    assert probs.shape == (2, 3, 17, 17)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 17))
    torch.testing.assert_close(probs.mean(1)[:, 0], seen["cls"])


def test_schedule_and_forward_agree_and_sizes_travel():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10).eval()
    arch = arch_spec(model)
    method = ZeroTPrune(s_fraction=0.5)
    schedule = method.schedule(arch, 0.7)
    assert schedule.tokens_out == (197,) * 3 + (138,) * 3 + (97,) * 3 + (68,) * 3
    method.patch(model, 0.7, arch)
    model._seam_state.recording = True
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    assert model._seam_state.observed == list(schedule.tokens_out)

    # a size a previous merge left is gathered with the kept tokens
    block = model.blocks[3]
    state = TokenState(size=torch.arange(197.0).view(1, 197, 1).expand(2, -1, -1).clone())
    x = torch.randn(2, 197, 192)
    with torch.no_grad():
        qkv = block.attn.qkv(block.norm1(x))
        out = block._seam_reducer(x, BlockContext(3, 1, state, block, qkv))
    assert out.shape == (2, 138, 192) and state.size.shape == (2, 138, 1)
    assert state.size[:, 0, 0].tolist() == [0.0, 0.0]  # the class token stays first
    # each kept token's size is its original position: the rows of ``out`` are those of ``x``
    rows = state.size[0, :, 0].long()
    torch.testing.assert_close(out[0], x[0, rows])
    assert rows.tolist() == sorted(rows.tolist())  # original order kept
