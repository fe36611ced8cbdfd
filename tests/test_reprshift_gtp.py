"""Representation Shift and GTP-ViT: their own steps on tiny inputs, checked by hand (issue 25)."""
from __future__ import annotations

import pytest
import timm
import torch

from harness.errors import HarnessError
from harness.methods.gtp import (mixed_attn_max, normalised, props_per_block, propagate, restrict, semantic_graph,
                                 spatial_graph, split_by_rank)
from harness.methods.reprshift import largest_shift, num_keep, representation_shift
from harness.registry import make_method
from harness.schedule import arch_spec


def test_shift_is_the_l2_norm_of_the_change():
    x_in = torch.zeros(1, 3, 2)
    x_out = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [-6.0, 8.0]]])
    torch.testing.assert_close(representation_shift(x_out, x_in), torch.tensor([[5.0, 1.0, 10.0]]))


def test_largest_shift_keeps_the_most_moved_in_original_order():
    shift = torch.tensor([[0.5, 3.0, 0.1, 2.0, 1.0]])
    assert largest_shift(shift, 3).tolist() == [[1, 3, 4]]
    assert num_keep(196, 0.3) == 138  # 196 - int(58.8)


def test_the_readme_setting_prunes_a_fifth_at_blocks_0_3_6():
    arch = arch_spec(timm.create_model("deit_tiny_patch16_224"))
    schedule = make_method("reprshift").schedule(arch, 0.2)  # --drop_r [0.2,0,0,0.2,0,0,0.2,0,0,0,0,0]
    assert schedule.stage == "post"
    assert schedule.tokens_out == (158,) * 3 + (127,) * 3 + (102,) * 6  # 196-39, 157-31, 126-25 (+1 class token)


@pytest.mark.parametrize("layer", ["mlp", "block"])
def test_reprshift_scores_what_the_layer_changed(layer):
    """In a real forward the pruned tokens are those whose output moved least from the MLP's input
    (the paper's shift) or from the block's input (``layer = "block"``), and the context's
    ``mlp_input`` is what the MLP branch really received."""
    from harness.seam import wrap_reducers

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=3).eval()
    arch = arch_spec(model)
    method = make_method("reprshift", {"reprshift": {"drop_loc": [1], "layer": layer}})
    method.patch(model, 0.5, arch)
    block, seen = model.blocks[1], {}
    block.register_forward_pre_hook(lambda _m, args: seen.setdefault("in", args[0].clone()))

    def spy(_index, inner):
        def reduce(x, ctx):
            seen.update(out=x.clone(), mid=ctx.mlp_input.clone(), block_input=ctx.block_input)
            return inner(x, ctx)
        return reduce

    wrap_reducers(model, spy)
    left = []
    block.register_forward_hook(lambda _m, _i, out: left.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        torch.testing.assert_close(seen["out"] - seen["mid"], block.ls2(block.mlp(block.norm2(seen["mid"]))))
    torch.testing.assert_close(seen["block_input"], seen["in"], rtol=0, atol=0)
    before = seen["mid"] if layer == "mlp" else seen["in"]
    shift = (seen["out"] - before)[:, 1:].norm(dim=-1)
    kept = shift.topk(8, dim=1).indices.sort(dim=1).values + 1
    expected = torch.cat([seen["out"][:, :1], seen["out"].gather(1, kept[..., None].expand(-1, -1, 192))], 1)
    torch.testing.assert_close(left[0], expected, rtol=0, atol=0)


def test_reprshift_refuses_an_unknown_layer():
    method = make_method("reprshift", {"reprshift": {"layer": "attn"}})
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=3).eval()
    with pytest.raises(HarnessError, match="reprshift layer 'attn'; choices: mlp, block"):
        method.patch(model, 0.5, arch_spec(model))


def test_spatial_graph_links_the_eight_grid_neighbours():
    g = spatial_graph(3, 3)
    assert g.sum(1).tolist() == [3, 5, 3, 5, 8, 5, 3, 5, 3]  # corners, edges, the centre
    assert g[4, 4] == 0 and g[0, 1] == 1 and g[0, 8] == 0
    assert spatial_graph(2, 3)[0].tolist() == [0, 1, 0, 1, 1, 0]  # rows x cols, not a square root


def test_semantic_graph_keeps_the_most_similar_tokens_without_self():
    # unit vectors at 0, 10, 90, 100 degrees: 0 and 1 are each other's nearest, 2 and 3 too
    angles = torch.tensor([0.0, 10.0, 90.0, 100.0]).deg2rad()
    x = torch.stack([angles.cos(), angles.sin()], -1)[None]
    g = semantic_graph(x, kth=3)  # entries >= the 3rd smallest of 4: self and the nearest
    assert g[0].tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]


def test_normalised_is_d_half_a_d_half():
    a = torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])  # degrees 2, 1, 1
    n = normalised(a)
    torch.testing.assert_close(n[0, 0, 1], torch.tensor(2 ** -0.5))
    torch.testing.assert_close(n[0, 1, 2], torch.tensor(0.0))


def test_mixed_attn_max_is_max_self_attention_times_max_received():
    probs = torch.tensor([[[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]],
                           [[0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [0.1, 0.8, 0.1]]]])  # B=1, H=2, N=3
    # prefix of one: tokens 1 and 2. Head 0: diag .6, .6; column sums 1.05, 1.15. Head 1: diag .3, .1;
    # column sums 1.5, .7. Max over heads: diag .6, .6; received 1.5, 1.15
    torch.testing.assert_close(mixed_attn_max(probs, 1), torch.tensor([[0.6 * 1.5, 0.6 * 1.15]]))


def test_propagation_adds_alpha_times_the_graph_weighted_removed_tokens():
    rank = torch.tensor([[0.3, 0.9, 0.1, 0.5]])
    kept, removed = split_by_rank(rank, 1)
    assert kept.tolist() == [[1, 3, 0]] and removed.tolist() == [[2]]  # kept by descending rank
    graph = torch.arange(16.0).view(1, 4, 4)
    weight, kept_graph = restrict(graph, kept, removed)
    assert weight[0, :, 0].tolist() == [6.0, 14.0, 2.0]  # rows 1, 3, 0 at column 2
    assert kept_graph[0, 0].tolist() == [5.0, 7.0, 4.0]  # row 1 at columns 1, 3, 0
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    out = propagate(x[:, [1, 3, 0]], x[:, [2]], weight, 0.5)
    assert out[0, :, 0].tolist() == [2 + 0.5 * 6 * 3, 4 + 0.5 * 14 * 3, 1 + 0.5 * 2 * 3]


def test_gtp_clamps_so_one_patch_token_stays():
    arch = arch_spec(timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3))  # 16 patches
    assert props_per_block(arch, 4) == [4, 4, 4]
    assert props_per_block(arch, 7) == [7, 7, 1]
    assert make_method("gtp").schedule(arch, 7).tokens_out == (10, 3, 2)
