"""The seam package: the context a reducer reads, the public reducer access, the shared operations,
and the house rules of the refactor (no method imports another; small files; old names kept)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import timm
import torch

from harness import seam
from harness.errors import UnsupportedModel
from harness.seam import BlockContext, TokenState, install

ROOT = Path(__file__).resolve().parents[1]

# every public name ``harness.seam`` had as one module: methods and outside plugins import them
OLD_NAMES = ["BlockContext", "FAMILIES", "POSITION_FAMILIES", "PROP_ATTN_IMPLS", "PROP_ATTN_KERNELS", "PrefixLayout",
             "Reducer", "SIZE_AWARE_POOLS", "STAGES", "TokenState", "attention_bias", "block_family", "check_blocks",
             "check_premises", "current_positions", "eager_attention", "flex_attention_bias", "fold_attention",
             "gather_pair_bias", "gather_rope", "gather_tokens", "install", "keep_tokens", "log_size",
             "merge_positions", "one_step_ahead_probs", "prefix_layout", "set_prop_attn_impl"]


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64, depth=3).eval()


def _context_of(model, index: int, x: torch.Tensor, **install_args) -> BlockContext:
    """The context block ``index`` of ``model`` hands its reducer on input ``x`` (the reducer keeps all)."""
    seen = {}

    def spy(tokens, ctx):
        seen["ctx"] = ctx
        return tokens

    install(model, {index: spy}, **install_args)
    with torch.no_grad():
        model(x)
    return seen["ctx"]


def test_every_old_name_is_still_importable():
    missing = [name for name in OLD_NAMES if not hasattr(seam, name)]
    assert not missing


def test_attention_is_the_blocks_softmax_computed_once():
    model = _vit()
    ctx = _context_of(model, 1, torch.randn(2, 3, 64, 64))
    probs = ctx.attention()
    assert probs.shape == (2, 3, 17, 17) and probs.dtype == torch.float32
    assert ctx.attention() is probs  # cached: a second reducer step pays nothing
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 17))
    torch.testing.assert_close(probs[:, :, 0].mean(1), ctx.cls_attn())  # row 0 is the class attention
    attn = ctx.block.attn  # the product Zero-TPrune recomputed from qkv, bit for bit
    qkv = seam.split_heads(ctx.qkv, 3, attn.num_heads)
    expected = ((attn.q_norm(qkv[0]) * attn.scale) @ attn.k_norm(qkv[1]).transpose(-2, -1)).float().softmax(-1)
    assert torch.equal(probs, expected)


def test_values_are_the_value_projection():
    model = _vit()
    ctx = _context_of(model, 0, torch.randn(2, 3, 64, 64))
    width = ctx.block.attn.num_heads * ctx.block.attn.head_dim
    assert torch.equal(ctx.values(), ctx.qkv[..., 2 * width:])
    assert torch.equal(ctx.v.transpose(1, 2).flatten(2), ctx.values())


def test_position_family_context_has_attention_but_no_qkv():
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, num_classes=10, img_size=64,
                              depth=2).eval()
    ctx = _context_of(model, 0, torch.randn(1, 3, 64, 64), tracks_positions=True)
    assert ctx.attention().shape[-1] == ctx.keys().shape[1] == 17
    torch.testing.assert_close(ctx.attention()[:, :, 0].mean(1), ctx.cls_attn())
    with pytest.raises(UnsupportedModel, match="qkv"):
        _ = ctx.qkv


def test_wrap_reducers_and_undo():
    model = _vit()
    calls = []

    def keep(x, ctx):
        return x

    install(model, {2: keep})
    assert seam.block_reducers(model) == {2: keep}
    undo = seam.wrap_reducers(model, lambda i, r: lambda x, ctx: calls.append(i) or r(x, ctx))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == [2]
    undo()
    assert seam.block_reducers(model) == {2: keep}
    seam.wrap_reducers(model, lambda i, r: lambda x, ctx: calls.append(i) or x, every_block=True)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert calls == [2, 0, 1, 2]


def test_wrap_attention_sees_the_blocks_the_seam_composes():
    model = _vit()
    def merge_last_two(x, ctx):  # tokens now carry sizes: the next blocks' attention needs them
        merge = seam.bipartite_soft_matching(ctx.keys(), 2, ctx.num_prefix)
        return seam.merge_tokens(ctx, merge, x)

    install(model, {1: merge_last_two}, prop_attn=True)
    composed = []
    seam.wrap_attention(model, lambda branch: lambda blk, *a: composed.append(blk) or branch(blk, *a))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert composed == [model.blocks[1], model.blocks[2]]  # block 0 ran timm's own forward, nothing reduced yet


@pytest.mark.parametrize("impl", ["fold", "flex"])
def test_attend_implementations_agree(impl):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    bias = torch.rand(2, 9).log()
    reference = seam.attend(q, k, v, bias, "mask")
    torch.testing.assert_close(seam.attend(q, k, v, bias, impl), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seam.eager_attention(q, k, v, bias[:, None, None, :]), reference, rtol=1e-5, atol=1e-5)


def test_no_method_imports_another():
    offenders = []
    for path in sorted((ROOT / "methods").rglob("*.py")):
        package = path.parent.name if path.parent != ROOT / "methods" else None
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                parts = name.split(".")
                inside = parts[:2] == ["harness", "methods"] or parts[0] == "methods"
                if inside and (len(parts) < 3 or parts[2] != package):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders


def test_seam_files_are_small():
    long = [p.name for p in (ROOT / "harness" / "seam").glob("*.py") if len(p.read_text().splitlines()) > 300]
    assert not long


def test_keep_tokens_carries_sizes_and_positions():
    state = TokenState(size=torch.tensor([[[1.0], [2.0], [3.0], [4.0]]]), needs_positions=True)
    ctx = BlockContext(0, 1, state, None, None)
    x = torch.arange(4.0).view(1, 4, 1)
    out = seam.keep_tokens(ctx, x, torch.tensor([[3, 1]]))
    assert out[0, :, 0].tolist() == [0.0, 3.0, 1.0]
    assert state.size[0, :, 0].tolist() == [1.0, 4.0, 2.0] and state.positions.tolist() == [[0, 3, 1]]
