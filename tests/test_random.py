import torch

from methods.random import RandomPruning, drop_blocks, random_keep_index
from harness.schedule import arch_spec
import timm


def test_random_keep_index_is_sorted_unique_seeded():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = random_keep_index(4, 10, 6, g1), random_keep_index(4, 10, 6, g2)
    assert torch.equal(a, b)
    assert a.shape == (4, 6)
    for row in a:
        assert row.tolist() == sorted(set(row.tolist())) and 0 <= row.min() and row.max() < 10
    assert len({tuple(r.tolist()) for r in a}) > 1  # images draw independently


def test_random_keep_index_uniform():
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(random_keep_index(20000, 8, 2, g).flatten(), minlength=8).float()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.01


def test_schedule_drops_at_evit_blocks():
    assert drop_blocks(12) == (3, 6, 9)
    arch = arch_spec(timm.create_model("deit_small_patch16_224"))
    s = RandomPruning().schedule(arch, 0.7)
    # ceil(0.7 * 196) = 138, ceil(0.7 * 138) = 97, ceil(0.7 * 97) = 68; plus the class token
    assert s.tokens_out == (197,) * 3 + (139,) * 3 + (98,) * 3 + (69,) * 3


def test_class_token_survives_and_kept_tokens_are_originals():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=4).eval()
    arch = arch_spec(model)
    seen = {}
    RandomPruning(seed=1).patch(model, 0.5, arch)
    blk = model.blocks[1]  # first drop block for depth 4
    orig = blk._seam_reducer

    def spy(x, ctx):
        out = orig(x, ctx)
        seen["in"], seen["out"] = x, out
        return out

    blk._seam_reducer = spy
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    x, out = seen["in"], seen["out"]
    assert out.shape[1] == 1 + 98
    assert torch.equal(out[:, 0], x[:, 0])
    for b in range(2):  # every kept token is one of the block's tokens, none repeated
        match = (out[b, 1:, None] == x[b, None, 1:]).all(-1)
        assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()
