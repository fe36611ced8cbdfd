"""The family matrix: timm ViT families x every registered method (issue 14).

Each cell either runs (bit-identical logits at the identity knob, observed tokens equal to the
schedule at a 0.7 GMACs budget, prefix tokens never changed by a reducer) or is refused with an
``UnsupportedModel`` whose reason is the premise the model cannot give. New methods are held to it
by parametrization over :func:`harness.registry.method_names`. Random weights, depth 2, small
images; each model is built once per module and deep-copied per cell.
"""
from __future__ import annotations

import copy

import pytest
import timm
import torch

from harness.budget import parse_budget, resolve
from harness.errors import HarnessError, UnsupportedModel
from harness.registry import get_method_class, method_names
from harness.schedule import Schedule, analytic_gmacs, arch_spec
from harness.seam import POSITION_FAMILIES, install, keep_tokens

# id -> (timm name, create kwargs, image size, seam family, class token, head pooling)
ARCHS = {
    "plain": ("deit_tiny_patch16_224", dict(img_size=112), 112, "vit", True, "token"),
    "layerscale": ("deit3_small_patch16_224", dict(img_size=112), 112, "vit", True, "token"),
    "qk-norm": ("vit_small_patch16_224", dict(img_size=112, qk_norm=True), 112, "vit", True, "token"),
    "registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=112), 112, "vit", True, "token"),
    "distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=112), 112, "vit", True, "token"),
    "norm_pre": ("vit_base_patch16_clip_224", dict(img_size=112), 112, "vit", True, "token"),
    "gap (no class token)": ("vit_medium_patch16_gap_256", dict(img_size=128), 128, "vit", False, "avg"),
    "map head (SigLIP)": ("vit_base_patch16_siglip_224", dict(img_size=112), 112, "vit", False, "map"),
    "hybrid": ("vit_small_r26_s32_224", dict(), 224, "vit", True, "token"),
    "flexivit": ("flexivit_small", dict(img_size=120), 120, "vit", True, "token"),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=112), 112, "eva", True, "avg"),
    "rope": ("vit_small_patch16_rope_224", dict(img_size=112), 112, "eva", True, "token"),
    "rope mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=112), 112, "eva", True, "token"),
    "rope reg gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=128), 128, "eva", False, "avg"),
    "beit": ("beit_base_patch16_224", dict(img_size=112), 112, "beit", True, "avg"),
    "relpos (no class token)": ("vit_relpos_base_patch16_224", dict(img_size=112), 112, "relpos", False, "avg"),
    "relpos cls": ("vit_relpos_medium_patch16_cls_224", dict(img_size=112), 112, "relpos", True, "token"),
}
METHODS = method_names()

_CACHE: dict = {}


def _template(arch_id: str):
    """(unpatched model, input, its logits), built once per architecture."""
    if arch_id not in _CACHE:
        name, kw, size, *_ = ARCHS[arch_id]
        torch.manual_seed(0)
        model = timm.create_model(name, depth=2, num_classes=10, **kw).eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            _CACHE[arch_id] = (model, x, model(x))
    return _CACHE[arch_id]


# a method's own premise beyond the seam's: method -> (families it refuses, words of its reason)
METHOD_PREMISES = {"resolution": (POSITION_FAMILIES, "position embeddings only")}
# ... and per architecture: method -> {architecture id: words of its reason}
METHOD_ARCH_PREMISES = {"resolution": {"hybrid": "hybrid stem"}}  # a CNN cell is not one patch of pixels


def _expected_refusals(arch_id: str, cls) -> list[str]:
    """The premises ``cls`` needs that the architecture cannot give: words its refusal must contain."""
    _, _, _, family, class_token, pool = ARCHS[arch_id]
    reasons = []
    own = METHOD_PREMISES.get(cls.name)
    if own is not None and family in own[0]:
        reasons.append(own[1])
    if arch_id in METHOD_ARCH_PREMISES.get(cls.name, {}):
        reasons.append(METHOD_ARCH_PREMISES[cls.name][arch_id])
    premises = cls().premises
    if premises.needs_class_token and not class_token:
        reasons.append("no class token")
    if premises.merges and pool not in ("token", "avg"):
        reasons.append("pooling")
    if family in POSITION_FAMILIES and not premises.tracks_positions:
        reasons.append("does not keep token positions")
    if family in POSITION_FAMILIES and cls.stage == "pre":
        reasons.append("stage 'pre'")
    return reasons


def _guard_prefix(model) -> list:
    """Wrap every installed reducer so it asserts the prefix tokens leave it unchanged and first."""
    calls = []
    for blk in model.blocks:
        inner = getattr(blk, "_seam_reducer", None)
        if inner is None:
            continue

        def guarded(x, ctx, inner=inner):
            before = x[:, :ctx.num_prefix].clone()
            out = inner(x, ctx)
            # element-wise within two roundings: MCTF (as its official code, whose golden logits it
            # matches) passes every token, the class token too, through x * w / w; a prefix token
            # merged with another or moved would be off by far more
            torch.testing.assert_close(out[:, :ctx.num_prefix], before, rtol=1e-6, atol=0,
                                       msg="a reducer changed or moved a prefix token")
            positions = ctx.state.positions
            if positions is not None:
                assert positions.shape == out.shape[:2]
                assert torch.equal(positions[:, :ctx.num_prefix],
                                   torch.arange(ctx.num_prefix).expand(out.shape[0], -1))
            calls.append(out.shape[1])
            return out

        blk._seam_reducer = guarded
    return calls


@pytest.mark.parametrize("method_name", METHODS)
@pytest.mark.parametrize("arch_id", list(ARCHS))
def test_identity_knob_is_bit_identical(arch_id, method_name):
    cls = get_method_class(method_name)
    template, x, ref = _template(arch_id)
    model = copy.deepcopy(template)
    arch = arch_spec(model)
    method = cls()
    value = None if cls.knob is None else cls.knob.identity
    if cls.knob is not None:
        assert method.schedule(arch, value) == Schedule.full(arch)
    method.patch(model, value, arch)
    assert all(getattr(b, "_seam_reducer", None) is None for b in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.slow
@pytest.mark.parametrize("method_name", [m for m in METHODS if get_method_class(m).knob is not None])
@pytest.mark.parametrize("arch_id", list(ARCHS))
def test_reduced_runs_to_schedule_or_is_refused_with_its_reason(arch_id, method_name):
    cls = get_method_class(method_name)
    template, x, _ = _template(arch_id)
    model = copy.deepcopy(template)
    reasons = _expected_refusals(arch_id, cls)
    undefined = None  # the method itself undefined at the knob this budget needs (its undefined_at), not a premise
    try:
        arch = arch_spec(model)
        method = cls()
        if cls.needs_calibration:  # no schedule before its search on data: the premises alone here
            from harness.seam import check_premises

            p = method.premises
            check_premises(model, method_name, p.needs_class_token, p.merges, p.tracks_positions)
            if not reasons:
                pytest.skip(f"{method_name} searches its schedule on data first (its own tests run it)")
        else:
            resolved = resolve(method, arch, parse_budget("0.7"))
            undefined = getattr(method, "undefined_at", lambda *_: None)(arch, resolved.knob_value)
            method.patch(model, resolved.knob_value, arch)
    except UnsupportedModel as e:
        if undefined is not None:  # e.g. ToFu at ratio 0.5 on a 50-token model: refused with its own reason
            assert str(e) == undefined, f"{method_name} refused {arch_id} with {e!r}, not its undefined_at reason"
            return
        assert reasons, f"{method_name} refused {arch_id} with no premise failing: {e}"
        assert any(r in str(e) for r in reasons), f"refusal {e!r} gives none of {reasons}"
        return
    except HarnessError as e:  # e.g. a knob value the solver cannot reach on so few tokens
        pytest.fail(f"{method_name} on {arch_id}: {e}")
    assert not reasons, f"{method_name} ran on {arch_id} although {reasons}"
    calls = _guard_prefix(model)
    model._seam_state.recording = True
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all()
    assert model._seam_state.observed == list(resolved.schedule.tokens_out)
    assert resolved.schedule.tokens_out[-1] < arch.tokens_in  # something was reduced
    if any(getattr(b, "_seam_reducer", None) is not None for b in model.blocks):
        assert calls  # the guard saw the reducers run (a method that reduces the input, e.g. its resolution, has none)


# --- position-aware families: the derived keys / class attention are the block's own, at the
# tokens' positions. Block 0 permutes the patch tokens (keep_tokens with a shuffled index): with
# positions following the tokens, block 1 must see exactly the reference's attention, permuted.

POSITION_ARCHS = [a for a in ARCHS if ARCHS[a][3] in POSITION_FAMILIES] + ["plain"]


def _sdpa_recorder(monkeypatch):
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def record(q, k, v, attn_mask=None, **kw):
        seen.append((q, k, attn_mask))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", record)
    return seen


@pytest.mark.parametrize("arch_id", POSITION_ARCHS)
def test_derived_attention_follows_the_tokens_positions(arch_id, monkeypatch):
    template, x, ref_logits = _template(arch_id)
    ref, model = copy.deepcopy(template), copy.deepcopy(template)
    p = ref.num_prefix_tokens
    n = arch_spec(ref).tokens_in
    perm = torch.stack([torch.randperm(n - p, generator=torch.Generator().manual_seed(i)) for i in range(2)]) + p
    seen = _sdpa_recorder(monkeypatch)
    with torch.no_grad():
        ref(x)
    q, k, mask = seen[1]  # block 1's attention in the reference
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    probs = logits.softmax(-1).mean(1)  # (B, N, N), the reference's attention averaged over heads
    ref_keys = k.mean(1)
    full = torch.cat([torch.arange(p).expand(2, -1), perm], 1)  # where each permuted token came from
    # row 0 of the permuted model is the query full[:, 0] (a patch when there is no prefix token)
    ref_cls = probs[torch.arange(2), full[:, 0]]
    got = {}

    def shuffle(t, ctx):
        return keep_tokens(ctx, t, perm)

    def grab(t, ctx):
        got["keys"] = ctx.keys()
        try:
            got["cls"] = ctx.cls_attn()
        except UnsupportedModel as exc:  # no class token: refused where it is read
            got["cls"] = exc
        got["positions"] = ctx.state.positions
        return t

    install(model, {0: shuffle, 1: grab}, tracks_positions=True)
    with torch.no_grad():
        out = model(x)
    if ARCHS[arch_id][3] in POSITION_FAMILIES:
        assert torch.equal(got["positions"], full)
    torch.testing.assert_close(got["keys"], ref_keys.gather(1, full[..., None].expand(-1, -1, ref_keys.shape[-1])),
                               rtol=1e-4, atol=1e-5)
    if ARCHS[arch_id][4]:
        torch.testing.assert_close(got["cls"], ref_cls.gather(1, full), rtol=1e-4, atol=1e-6)
    else:
        assert isinstance(got["cls"], UnsupportedModel) and "no class token" in str(got["cls"])
    # a permutation with positions kept: every later block and the head see the same tokens
    torch.testing.assert_close(out, ref_logits, rtol=1e-4, atol=1e-4)


def test_positions_are_gathered_by_pruning_and_kept_by_merge_destinations():
    """random pruning gathers the kept tokens' positions; a ToMe merge keeps each destination's."""
    from harness.seam import bipartite_soft_matching
    from harness.seam import BlockContext, TokenState, merge_positions

    state = TokenState(needs_positions=True)
    ctx = BlockContext(0, 1, state, None, None)
    x = torch.arange(7.0).view(1, 7, 1)  # token i carries the value i
    out = keep_tokens(ctx, x, torch.tensor([[5, 2, 3]]))
    assert out[0, :, 0].tolist() == [0, 5, 2, 3]
    assert state.positions.tolist() == [[0, 5, 2, 3]]
    # tokens 0 (prefix), 5, 2, 3 as A=[0, 2], B=[5, 3]: metric makes A token 2 (value 2) match B token 3
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]]])
    merge = bipartite_soft_matching(metric, 1, num_prefix=1)
    merge_positions(ctx, merge, out)
    # the A token at index 2 (position 2) merged into B index 3 (position 3): [prefix, B...] remain
    assert state.positions.tolist() == [[0, 5, 3]]


def test_methods_that_do_not_track_positions_are_refused_on_rope_models():
    template, _, _ = _template("rope")
    model = copy.deepcopy(template)
    with pytest.raises(UnsupportedModel, match="does not keep token positions"):
        install(model, {0: lambda t, ctx: t}, method="blind")
    install(copy.deepcopy(template), {}, method="blind")  # the identity knob installs nothing: runs


@pytest.mark.slow
@pytest.mark.parametrize("arch_id", list(ARCHS))
@pytest.mark.parametrize("method_name", ["none", "random", "tome"])
def test_analytic_gmacs_match_fvcore(arch_id, method_name):
    from harness.flops import count_gmacs

    cls = get_method_class(method_name)
    model = copy.deepcopy(_template(arch_id)[0])
    arch = arch_spec(model)
    method = cls()
    value = None if cls.knob is None else {"random": 0.7, "tome": 8}[method_name]
    try:
        method.patch(model, value, arch)
    except UnsupportedModel:
        assert _expected_refusals(arch_id, cls)
        return
    schedule = Schedule.full(arch) if value is None else method.schedule(arch, value)
    assert analytic_gmacs(arch, schedule) == pytest.approx(count_gmacs(model).gmacs, rel=0.005)


# --- the kernel asked for is the kernel every block runs: ``--attention eager`` reaches the
# position-aware families' reduced blocks too (their attention is the seam's, not timm's forward)

@pytest.mark.parametrize("arch_id", ["beit", "eva02", "relpos cls"])
def test_eager_attention_runs_no_sdpa_on_reduced_position_blocks(arch_id, monkeypatch):
    from harness.measure import attention_kernel, set_attention

    template, x, _ = _template(arch_id)
    fused, eager = copy.deepcopy(template), copy.deepcopy(template)
    for model in (fused, eager):
        arch = arch_spec(model)
        method = get_method_class("topk")()
        method.patch(model, resolve(method, arch, parse_budget("0.7")).knob_value, arch)
    set_attention(eager, "eager")
    assert attention_kernel(eager) == "eager" and attention_kernel(fused) == "fused"
    seen = _sdpa_recorder(monkeypatch)
    with torch.no_grad():
        want = fused(x)
        assert len(seen) == len(fused.blocks)  # the recorder sees every fused block's call
        got = eager(x)
    assert len(seen) == len(fused.blocks), "an eager model called scaled_dot_product_attention"
    assert any(b._seam_reducer is not None for b in eager.blocks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_eager_attention_equals_sdpa_with_mask_and_causal():
    from harness.seam import eager_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    mask = torch.randn(2, 1, 1, 7, generator=g)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(eager_attention(q, k, v, mask), sdpa(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager_attention(q, k, v, is_causal=True), sdpa(q, k, v, is_causal=True),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eager_attention(q, k, v, scale=0.1), sdpa(q, k, v, scale=0.1), rtol=1e-5, atol=1e-6)
