"""Zero-TPrune's own steps on tiny inputs, checked by hand."""
from __future__ import annotations

import math

import pytest
import timm
import torch

from harness.methods.zerotprune import (ZeroTPrune, aggregate_heads, head_weights, initial_scores,
                                        kept_per_drop, page_rank_iters, select_tokens, split_removal, subgraph,
                                        weighted_page_rank)
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


def test_initial_scores_weight_the_class_token_by_sqrt_n():
    like = torch.zeros(1)
    # N = 4: weights (2, 1, 1, 1) / 5
    torch.testing.assert_close(initial_scores(4, True, "sqrt", like), torch.tensor([0.4, 0.2, 0.2, 0.2]))
    torch.testing.assert_close(initial_scores(4, True, "uniform", like), torch.full((4,), 0.25))
    torch.testing.assert_close(initial_scores(4, False, "sqrt", like), torch.full((4,), 0.25))  # no class token


def test_page_rank_rounds_follow_the_papers_layers():
    assert [page_rank_iters(i, 12) for i in range(12)] == [30] * 3 + [5] * 6 + [1] * 3
    assert ZeroTPrune(iters=7).iters(0, 12) == 7


def test_head_filter_drops_heads_outside_the_variance_range():
    # N = 4; head 0 uniform (variance of 4 s: 0), head 1 (0.4, 0.2, 0.2, 0.2): 4 s = (1.6, .8, .8, .8),
    # variance 0.12; head 2 one-hot: 4 s = (4, 0, 0, 0), variance 3
    scores = torch.tensor([[[0.25] * 4, [0.4, 0.2, 0.2, 0.2], [1.0, 0.0, 0.0, 0.0]]])
    assert head_weights(scores, (0.01, 0.7)).tolist() == [[0.0, 1.0, 0.0]]
    torch.testing.assert_close(aggregate_heads(scores, "rms", (0.01, 0.7)), scores[:, 1])
    # no head in range: every head counts
    assert head_weights(scores, (5.0, 6.0)).tolist() == [[1.0, 1.0, 1.0]]
    assert head_weights(scores, None).tolist() == [[1.0, 1.0, 1.0]]


def test_subgraph_keeps_the_nodes_edges_rows_renormalised():
    attn = torch.tensor([[0.5, 0.25, 0.25],
                         [0.2, 0.2, 0.6],
                         [0.1, 0.3, 0.6]]).expand(1, 1, 3, 3)
    sub = subgraph(attn, torch.tensor([[0, 2]]))
    torch.testing.assert_close(sub[0, 0], torch.tensor([[0.5 / 0.75, 0.25 / 0.75], [0.1 / 0.7, 0.6 / 0.7]]))


def _example():
    """A prefix token and six body tokens; importance (row 0 of the graph) 1 > 2 > ... > 6."""
    row = torch.tensor([0.0, 0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
    attn = torch.full((7, 7), 1 / 7)
    attn[0] = row
    metric = torch.tensor([[[0.0, 0.0],     # prefix (never compared)
                            [1.0, 0.0],     # 1
                            [0.0, 1.0],     # 2
                            [-1.0, 0.0],    # 3
                            [0.7, 0.7],     # 4: cos 0.71 to tokens 1 and 2
                            [0.0, -1.0],    # 5: cos 0 at best
                            [1.0, 0.01]]])  # 6: nearly a copy of token 1
    calls = []

    def rank(graph, rounds):  # importance = the prefix token's row, whatever the rounds
        calls.append((graph.shape[-1], rounds))
        return graph[:, 0, 0, :]

    return attn.expand(1, 1, 7, 7), metric, rank, calls


def test_i_stage_prunes_the_least_important_never_the_prefix():
    attn, metric, rank, _ = _example()
    assert select_tokens(attn, metric, 1, num_s=0, num_i=2, iters=5, rank=rank).tolist() == [[0, 1, 2, 3, 4]]


def test_s_stage_prunes_the_unimportant_token_most_like_an_important_one():
    attn, metric, rank, _ = _example()
    # pre-ranked groups {1, 2, 3} | {4, 5, 6}; token 6's best cosine (0.99995) is the highest
    assert select_tokens(attn, metric, 1, num_s=1, num_i=0, iters=5, rank=rank).tolist() == [[0, 1, 2, 3, 4, 5]]


def test_similarity_stage_runs_before_the_importance_stage():
    attn, metric, rank, calls = _example()
    # S first: 6 goes (a copy of 1), then the I-stage drops the least important survivor, 5.
    # Importance first would drop 6, then the groups {1, 2, 3} | {4, 5} lose 4 (cos 0.71 beats 0)
    assert select_tokens(attn, metric, 1, num_s=1, num_i=1, iters=5, rank=rank).tolist() == [[0, 1, 2, 3, 4]]
    # a one-round pre-ranking of all 7 tokens, then the I-stage's rounds on the 6 survivors' graph
    assert calls == [(7, 1), (6, 5)]


def test_counts_are_fixed_python_ints():
    assert kept_per_drop(196, 0.7, 3) == [137, 96, 67]  # int(137.2), int(96.04), int(67.228)
    assert kept_per_drop(196, 1.0, 3) == [196, 196, 196]
    assert kept_per_drop(196, 0.01, 3) == [1, 1, 1]
    assert split_removal(59, 196, 0.5) == (30, 29)  # 29.5 rounds half up to 30
    assert split_removal(10, 13, 1.0) == (6, 4)     # the S-stage prunes at most half the tokens
    assert split_removal(10, 13, 0.0) == (0, 10)
    assert split_removal(5, 15, 0.5) == (3, 2)      # 2.5 rounds up too (Python's round would give 2)


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
    assert schedule.stage == "post"  # between blocks, after the MLP
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
