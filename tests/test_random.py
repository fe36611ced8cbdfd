import copy

import pytest
import torch

from harness.methods.random import RandomPruning, block_key, drop_blocks, mix32, random_keep_index, random_scores
from harness.schedule import arch_spec
import timm


def test_random_keep_index_is_sorted_unique_seeded():
    a, b = (random_keep_index(random_scores(4, 10, block_key(3, 1)), 6) for _ in range(2))
    assert torch.equal(a, b)  # the same key, the same draw: nothing else enters it
    assert a.shape == (4, 6)
    for row in a:
        assert row.tolist() == sorted(set(row.tolist())) and 0 <= row.min() and row.max() < 10
    assert len({tuple(r.tolist()) for r in a}) > 1  # images draw independently
    assert not torch.equal(a, random_keep_index(random_scores(4, 10, block_key(4, 1)), 6))  # another seed
    assert not torch.equal(a, random_keep_index(random_scores(4, 10, block_key(3, 2)), 6))  # another block


def test_mix32_is_the_same_on_ints_and_tensors():
    values = [0, 1, 7, 2**31 - 1, 2**32 - 1, 123456789]
    assert torch.tensor([mix32(v) for v in values]).tolist() == mix32(torch.tensor(values)).tolist()
    assert len({mix32(v) for v in range(1000)}) == 1000  # a bijection on 32 bits: no collisions
    assert all(0 <= mix32(v) < 2**32 for v in values)


def test_random_keep_index_uniform():
    # every token equally likely to be kept (sd of each frequency ~ 0.0008 here)
    counts = torch.bincount(random_keep_index(random_scores(20000, 8, block_key(0, 0)), 2).flatten(), minlength=8).float()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.01
    # every kept pair equally likely: 28 pairs, ~714 draws each (sd ~ 26)
    pairs = torch.bincount((lambda i: i[:, 0] * 8 + i[:, 1])(random_keep_index(random_scores(20000, 8, block_key(1, 0)), 2)))
    pairs = pairs[pairs > 0].float()
    assert len(pairs) == 28 and (pairs / 20000 * 28 - 1).abs().max() < 0.15


def test_images_draw_independently():
    # the kept sets of two images overlap as two independent draws do: E|A & B| = k^2 / n
    idx = random_keep_index(random_scores(4000, 20, block_key(5, 2)), 10)
    keep = torch.zeros(4000, 20).scatter(1, idx, 1.0)
    overlap = (keep[0::2] * keep[1::2]).sum(1).mean()
    assert overlap == pytest.approx(10 * 10 / 20, abs=0.1)


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


def test_the_same_seed_keeps_the_same_tokens_whatever_ran_before():
    torch.manual_seed(0)
    base = timm.create_model("deit_tiny_patch16_224", depth=4).eval()
    arch = arch_spec(base)
    x = torch.randn(3, 3, 224, 224)

    def logits(seed, warmup=0):
        model = copy.deepcopy(base)
        RandomPruning(seed=seed).patch(model, 0.5, arch)
        with torch.no_grad():
            for _ in range(warmup):
                model(torch.randn(3, 3, 224, 224))
            return model(x)

    a = logits(1)
    assert torch.equal(a, logits(1, warmup=2))  # earlier forwards do not move the draws
    assert not torch.allclose(a, logits(2))
