"""The seam's three stages: reduce before the attention ("pre"), between attention and MLP ("mid"),
after the MLP ("post"); each exact against a hand-run block, and its GMACs convention against fvcore."""
from __future__ import annotations

import pytest
import timm
import torch

from harness.measurement.flops import count_gmacs
from harness.schedule import Schedule, analytic_gmacs, arch_spec
from harness.seam import install


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                             num_classes=10).eval()


def _keep_first(n: int):
    """A "pre" reducer: keep the first n tokens and the attention among them, renormalised."""
    def reduce(x, ctx):
        probs = ctx.attn_probs[:, :, :n, :n]
        ctx.state.attn_probs = probs / probs.sum(-1, keepdim=True)
        return x[:, :n]

    return reduce


def _tokens(model, x):
    return model.norm_pre(model._pos_embed(model.patch_embed(x)))


def _block_from_probs(blk, h, probs):
    """A block on tokens h whose attention softmax is replaced by probs, written out by hand."""
    a = blk.attn
    b, n, c = h.shape
    v = (blk.norm1(h) @ a.qkv.weight[2 * c:].T + a.qkv.bias[2 * c:]).reshape(b, n, a.num_heads, -1).transpose(1, 2)
    h = h + a.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
    return h + blk.mlp(blk.norm2(h))


def test_pre_stage_keeping_every_token_is_the_block():
    ref, model = tiny_vit(), tiny_vit()
    install(model, {0: _keep_first(17), 1: _keep_first(17)}, stage="pre")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


def test_pre_stage_applies_the_handed_attention_to_the_kept_tokens():
    ref, model = tiny_vit(), tiny_vit()
    state = install(model, {1: _keep_first(9)}, stage="pre")
    state.recording = True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        h = ref.blocks[0](_tokens(ref, x))
        blk = ref.blocks[1]
        a = blk.attn
        qk = blk.norm1(h) @ a.qkv.weight[:64].T + a.qkv.bias[:64]
        q, k = qk.reshape(2, 17, 2, 2, 16).permute(2, 0, 3, 1, 4)
        probs = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, :9, :9]
        h = _block_from_probs(blk, h[:, :9], probs / probs.sum(-1, keepdim=True))
        expected = ref.forward_head(ref.norm(h))
    assert state.observed == [17, 9]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_pre_stage_reducer_must_hand_the_attention():
    model = tiny_vit()
    install(model, {0: lambda x, ctx: x[:, :9]}, stage="pre")
    with pytest.raises(RuntimeError, match="attn_probs"):
        model(torch.randn(1, 3, 32, 32))


def test_post_stage_reduces_after_the_mlp():
    ref, model = tiny_vit(), tiny_vit()
    state = install(model, {0: lambda x, ctx: x[:, :11]}, stage="post")
    state.recording = True
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        h = ref.blocks[1](ref.blocks[0](_tokens(ref, x))[:, :11])
        expected = ref.forward_head(ref.norm(h))
    assert state.observed == [11, 11]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("stage,reducer", [("pre", _keep_first(9)), ("post", lambda x, ctx: x[:, :9]),
                                           ("mid", lambda x, ctx: x[:, :9])])
def test_each_stage_gmacs_convention_is_what_fvcore_counts(stage, reducer):
    model = tiny_vit()
    arch = arch_spec(model)
    install(model, {0: reducer}, stage=stage, capture_qkv=False)
    measured = count_gmacs(model, torch.randn(2, 3, 32, 32), batch_size=2)
    schedule = Schedule(arch.tokens_in, (9, 9), stage=stage)
    assert measured.gmacs == pytest.approx(analytic_gmacs(arch, schedule), rel=1e-9)
    others = {s: analytic_gmacs(arch, Schedule(arch.tokens_in, (9, 9), stage=s)) for s in ("pre", "mid", "post")}
    assert len(set(others.values())) == 3  # the convention depends on the stage
    assert others["pre"] < others["mid"] < others["post"]


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="stage"):
        install(tiny_vit(), {0: lambda x, ctx: x}, stage="after")
    with pytest.raises(ValueError, match="stage"):
        Schedule(17, (17, 17), stage="after")
