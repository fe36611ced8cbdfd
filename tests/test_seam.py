"""The seam keeps timm's behaviour exactly when nothing is removed, across ViT families."""
import copy

import pytest
import timm
import torch

from harness.errors import UnsupportedModel
from harness.seam import install

FAMILIES = [
    ("deit_tiny_patch16_224", dict(depth=3), 224),                    # plain DeiT
    ("deit3_small_patch16_224", dict(depth=3), 224),                  # LayerScale
    ("deit_tiny_distilled_patch16_224", dict(depth=3), 224),          # distillation token
    ("vit_small_patch14_reg4_dinov2", dict(depth=3, img_size=112), 112),  # register tokens + LayerScale
    ("vit_little_patch16_reg4_gap_256", dict(depth=3), 256),          # registers + average pooling
    ("vit_base_patch16_224.mae", dict(depth=2, global_pool="avg"), 224),  # MAE-style average pooling
]


def _fresh(name, kw):
    torch.manual_seed(0)
    return timm.create_model(name, **kw).eval()


@pytest.mark.parametrize("name,kw,size", FAMILIES)
def test_identity_reducers_give_unpatched_logits(name, kw, size):
    x = torch.randn(2, 3, size, size)
    ref_model, model = _fresh(name, kw), _fresh(name, kw)
    with torch.no_grad():
        ref = ref_model(x)
    # reducers that read keys and the class attention (where there is a class token) but keep every token
    has_cls = model.cls_token is not None
    state = install(model, {0: lambda t, ctx: t, 1: lambda t, ctx: (ctx.keys(), has_cls and ctx.cls_attn(), t)[-1]},
                    prop_attn=True)
    state.recording = True
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, ref)
    assert state.observed == [ref_model.patch_embed.num_patches + ref_model.num_prefix_tokens] * len(model.blocks)


def test_cls_attn_equals_eager_attention_row():
    model = _fresh("deit3_small_patch16_224", dict(depth=2))
    seen = {}

    def grab(t, ctx):
        seen["cls"] = ctx.cls_attn()
        seen["keys"] = ctx.keys()
        return t

    install(model, {1: grab})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        h = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        blk = model.blocks[1]
        a = blk.attn
        qkv = a.qkv(blk.norm1(h)).reshape(2, 197, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(qkv[0]), a.k_norm(qkv[1])
        eager = ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0].mean(1)
        model(x)
    torch.testing.assert_close(seen["cls"], eager)
    torch.testing.assert_close(seen["cls"].sum(-1), torch.ones(2))
    torch.testing.assert_close(seen["keys"], k.mean(1))


def test_size_bias_changes_attention_only_when_sizes_differ():
    model = _fresh("deit_tiny_patch16_224", dict(depth=2))
    ref = _fresh("deit_tiny_patch16_224", dict(depth=2))

    def set_sizes(t, ctx):
        ctx.state.size = torch.full((t.shape[0], t.shape[1], 1), 3.0)  # equal sizes: softmax unchanged
        return t

    install(model, {0: set_sizes}, prop_attn=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_non_vit_is_unsupported():
    with pytest.raises(UnsupportedModel):
        install(timm.create_model("resnet18"), {})
    with pytest.raises(UnsupportedModel):
        install(timm.create_model("vit_small_patch16_224", depth=2, no_embed_class=True, class_token=True,
                                  block_fn=timm.models.vision_transformer.ResPostBlock), {})


def test_unequal_sizes_reach_the_attention():
    model = _fresh("deit_tiny_patch16_224", dict(depth=2))
    ref = _fresh("deit_tiny_patch16_224", dict(depth=2))

    def set_sizes(t, ctx):
        size = torch.ones(t.shape[0], t.shape[1], 1)
        size[:, 1:50] = 4.0
        ctx.state.size = size
        return t

    install(model, {0: set_sizes}, prop_attn=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref(x))


def test_a_deep_copy_of_a_patched_model_runs_on_its_own():
    # the qkv capture lives on the copied modules, not in a closure over the original block
    model = _fresh("deit_tiny_patch16_224", dict(depth=2))
    seen = []
    install(model, {1: lambda t, ctx: (seen.append(ctx.keys().shape), t)[-1]})
    twin = copy.deepcopy(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
    assert seen == [(1, 197, 64)] * 2
    assert twin._seam_state is not model._seam_state


def _maps_seen(monkeypatch, model, x, **install_kw):
    """The maps the blocks formed (through ``attend_explicitly``) and the maps reducer 1 read."""
    from harness.seam import forward

    formed, read = [], []

    def recording(*args, **kwargs):
        out, probs = explicitly(*args, **kwargs)
        formed.append(probs)
        return out, probs

    explicitly = forward.attend_explicitly
    monkeypatch.setattr(forward, "attend_explicitly", recording)
    install(model, {1: lambda t, ctx: (read.append(ctx.attention()), t)[-1]}, **install_kw)
    with torch.no_grad():
        logits = model(x)
    return formed, read, logits


@pytest.mark.parametrize("how", ["eager", "attention_map"])
def test_a_block_that_forms_its_attention_map_hands_the_reducer_that_map(how, monkeypatch):
    x = torch.randn(2, 3, 224, 224)
    lazy_model, model = _fresh("deit3_small_patch16_224", dict(depth=2)), _fresh("deit3_small_patch16_224", dict(depth=2))
    lazy = []
    install(lazy_model, {1: lambda t, ctx: (lazy.append(ctx.attention()), t)[-1]})
    with torch.no_grad():
        ref = lazy_model(x)  # fused kernel: the reducer's map is computed from q and k
    if how == "eager":
        for blk in model.blocks:
            blk.attn.fused_attn = False
    formed, read, logits = _maps_seen(monkeypatch, model, x, attention_map=how == "attention_map")
    assert len(formed) == 1 and read[0] is formed[0]  # block 1 formed its map once; block 0 has no reducer
    torch.testing.assert_close(read[0], lazy[0])
    torch.testing.assert_close(logits, ref)


def test_eager_blocks_that_keep_their_map_give_the_eager_logits_bit_for_bit():
    x = torch.randn(2, 3, 224, 224)
    ref_model, model = _fresh("deit_tiny_patch16_224", dict(depth=3)), _fresh("deit_tiny_patch16_224", dict(depth=3))
    for blk in [*ref_model.blocks, *model.blocks]:
        blk.attn.fused_attn = False
    install(model, {0: lambda t, ctx: (ctx.attention(), t)[-1], 1: lambda t, ctx: t}, prop_attn=True)
    with torch.no_grad():
        assert torch.equal(model(x), ref_model(x))
