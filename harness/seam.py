"""The one seam: token reduction inside timm's ViT ``Block``, at one of three places.

ToMe, EViT, DiffRate and random pruning all act at the same place: after a block's attention
residual, before its MLP (stage ``"mid"``). The harness patches the block once; methods supply a
*reducer* ``(x, ctx) -> x`` per block and never copy a timm forward. Two other places
(:data:`STAGES`) serve methods whose papers reduce elsewhere:

 - ``"pre"``: before the block's attention (MCTF's one-step-ahead attention). The seam computes
   the block's attention on the entering tokens (``ctx.attn_probs``, (B, H, N, N)); the reducer
   reduces the tokens and must hand the block the attention map of the reduced tokens
   (``ctx.state.attn_probs``, (B, H, N', N'), e.g. MCTF's merged map), which the block's attention
   applies to their values instead of recomputing q@k.
 - ``"post"``: after the block's MLP residual (DCT's low-pass filter). ``ctx.qkv`` is the block's
   qkv projection as for ``"mid"``.

One method uses one stage (``Method.stage``); its schedule carries it (``Schedule.stage``), and
the GMACs convention follows it (:func:`harness.schedule.block_macs`).

What is kept from current timm: the block's own submodules run unchanged (LayerScale, q/k-norm,
fused ``scaled_dot_product_attention``, drop-path), prefix tokens (class, distillation, registers)
are handed to reducers as ``ctx.num_prefix`` so they are never dropped, and per-token sizes feed
proportional attention (log size added to every key's logits).

Proportional attention reaches timm's attention one of three ways, ``TokenState.prop_attn_impl``
(set by :func:`install` or :func:`set_prop_attn_impl`):

 - ``"mask"`` (default, the reference): log size as an additive float mask to timm's SDPA call.
   Exact and simple, but a float mask rules out the flash kernel.
 - ``"fold"``: log size folded into one extra head dimension (:func:`fold_attention`), so SDPA runs
   with no mask and flash-class kernels stay eligible; costs a head dim padded to a multiple of 8.
 - ``"flex"``: FlexAttention with a ``score_mod`` adding log size (:func:`flex_attention_bias`).

For ``fold`` and ``flex`` timm's attention forward still runs unchanged: a
:class:`torch.overrides.TorchFunctionMode` active during the block's attention swaps its one SDPA
call for the kernel (dynamo traces through it; in eager mode every op of the attention pays a few
microseconds of Python dispatch). timm's eager attention (``fused_attn=False``), a caller's own
``attn_mask`` and ``is_causal`` always take the mask path.

Every reducer is held to static shapes and no host syncs (``tests/test_compile.py``): the forward
must compile with ``torch.compile(fullgraph=True)``.

Reducers read what the block just computed through ``ctx``: ``ctx.keys()`` (keys averaged over
heads, ToMe's metric) and ``ctx.cls_attn()`` (the class token's attention row, EViT's and
DiffRate's score). Both are derived lazily from the qkv projection the block already ran, so only
blocks that ask pay: a 1 x N attention row, not the eager N x N matrix.
"""
from __future__ import annotations

import functools
import logging
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from harness.errors import UnsupportedModel

log = logging.getLogger(__name__)


@dataclass
class TokenState:
    """What a patched model carries from block to block during one forward pass.

    Attributes:
        size: (B, N, 1) number of patches each token stands for, or None while nothing merged.
        prop_attn: add log(size) to attention logits (proportional attention).
        prop_attn_impl: how the log-size bias reaches the attention kernel: "mask", "fold" or "flex".
        recording: append the tokens leaving each block to ``observed`` (tests, token maps).
        observed: tokens leaving each block in the last forward, when recording.
        attn_probs: (B, H, N, N) attention probabilities a ``"pre"`` reducer hands the block's
            attention (MCTF's merged one-step-ahead map); used once, then cleared.
    """

    prop_attn: bool = False
    prop_attn_impl: str = "mask"
    size: Optional[torch.Tensor] = None
    recording: bool = False
    observed: list = field(default_factory=list)
    attn_probs: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.size = None
        self.observed = []
        self.attn_probs = None


@dataclass
class BlockContext:
    """What a reducer sees of the block that just ran its attention."""

    index: int
    num_prefix: int
    state: TokenState
    block: torch.nn.Module
    qkv: Optional[torch.Tensor]
    attn_probs: Optional[torch.Tensor] = None  # stage "pre": the block's attention on the entering tokens

    def _split_qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qkv is None:
            raise RuntimeError("this block did not capture its qkv projection")
        attn = self.block.attn
        b, n, _ = self.qkv.shape
        qkv = self.qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])

    def keys(self) -> torch.Tensor:
        """Keys averaged over heads, (B, N, head_dim): ToMe's similarity metric."""
        return self._split_qk()[1].mean(1)

    def cls_attn(self) -> torch.Tensor:
        """The class token's attention over all tokens, averaged over heads: (B, N).

        Computed from the class query alone (B x H x 1 x N), with the same size bias the block's
        attention used, so it equals row 0 of the block's softmax attention.
        """
        q, k = self._split_qk()
        logits = (q[:, :, :1] * self.block.attn.scale) @ k.transpose(-2, -1)
        bias = attention_bias(self.state, logits.dtype)
        if bias is not None:
            logits = logits + bias
        return logits.float().softmax(-1).mean(1)[:, 0]


Reducer = Callable[[torch.Tensor, BlockContext], torch.Tensor]


PROP_ATTN_IMPLS = ("mask", "fold", "flex")

# where in a block a method's reducer runs: before attention, between attention and MLP, after the MLP
STAGES = ("pre", "mid", "post")


def log_size(state: TokenState) -> Optional[torch.Tensor]:
    """log(size) per token (B, N), or None when proportional attention is off or nothing merged."""
    if not state.prop_attn or state.size is None:
        return None
    return state.size.log()[..., 0]


def attention_bias(state: TokenState, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """log(size) as a (B, 1, 1, N) additive mask, or None when nothing was merged."""
    bias = log_size(state)
    return None if bias is None else bias.to(dtype)[:, None, None, :]


def fold_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                   attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: Optional[float] = None, **kwargs) -> torch.Tensor:
    """SDPA of (B, H, N, d) ``q``, ``k``, ``v`` with ``bias`` (B, N) added to every key's logits, no mask.

    softmax(s q kᵀ + bias) == softmax(s [q, 1] [k, bias / s]ᵀ): the bias rides in one extra head
    dimension and ``scale=s`` is passed explicitly (SDPA's default would be 1/sqrt of the wider
    dim). Heads are zero-padded to a multiple of 8 (v too), as flash-class kernels want, and the
    output is cut back to v's width. Other arguments are SDPA's and pass through.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    width = -(-(q.shape[-1] + 1) // 8) * 8
    key_bias = (bias / scale).to(k.dtype)[:, None, :, None].expand(*k.shape[:-1], 1)
    q = F.pad(torch.cat([q, torch.ones_like(q[..., :1])], -1), (0, width - q.shape[-1] - 1))
    k = F.pad(torch.cat([k, key_bias], -1), (0, width - k.shape[-1] - 1))
    out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, width - v.shape[-1])), attn_mask=attn_mask,
                                         dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)
    return out[..., : v.shape[-1]]


@torch.compiler.disable(reason="dynamo (torch 2.14.1) drops attribute writes made after a traced flex_attention")
def flex_attention_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                        attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                        scale: Optional[float] = None) -> torch.Tensor:
    """FlexAttention of (B, H, N, d) ``q``, ``k``, ``v`` with a ``score_mod`` adding ``bias`` (B, N).

    On CUDA the flex kernel is compiled on its own, once (flex is only fused when compiled); on CPU
    it runs flex's unfused reference, which materialises the scores: right, but no faster than the
    mask. Never traced into a model's graph: dynamo (torch 2.14.1) silently drops attribute writes
    made after a traced flex call in the same graph, such as the next reducer's ``state.size``. A
    compiled model graph-breaks around it instead, and ``fullgraph=True`` fails.
    """
    from torch.nn.attention.flex_attention import flex_attention

    if attn_mask is not None or dropout_p or is_causal:
        raise ValueError("flex proportional attention takes no attn_mask, dropout or is_causal")

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, kv_idx]

    kernel = _compiled_flex() if q.device.type == "cuda" else flex_attention
    return kernel(q, k, v, score_mod=add_bias, scale=scale)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


PROP_ATTN_KERNELS = {"fold": fold_attention, "flex": flex_attention_bias}


class _BiasedSDPA(TorchFunctionMode):
    """While active, SDPA calls run ``kernel`` with ``bias``; every other torch call runs as is."""

    def __init__(self, kernel: Callable, bias: torch.Tensor):
        super().__init__()
        self.kernel, self.bias = kernel, bias

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return self.kernel(*args, self.bias, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _check_impl(impl: str) -> None:
    if impl not in PROP_ATTN_IMPLS:
        raise ValueError(f"unknown prop_attn_impl {impl!r}; choices: {', '.join(PROP_ATTN_IMPLS)}")


def set_prop_attn_impl(model: torch.nn.Module, impl: str) -> None:
    """Choose how a patched ``model`` feeds proportional attention: "mask", "fold" or "flex".

    An unpatched model has no proportional attention: nothing to set. The choice changes kernels,
    not results (to float rounding).
    """
    _check_impl(impl)
    state = getattr(model, "_seam_state", None)
    if state is not None:
        state.prop_attn_impl = impl


def _attention_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast q/k are in the autocast dtype while the residual stream x stays fp32; SDPA
    # wants a float mask in the query's dtype.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Tokens of ``x`` (B, N, C) at ``index`` (B, K): (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def one_step_ahead_probs(block: torch.nn.Module, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """The block's attention probabilities on the entering tokens ``x`` (B, N, C): (B, H, N, N).

    Stage "pre" (MCTF's one-step-ahead attention): ``norm1``, the q and k rows of the block's qkv
    projection (v is left for the reduced tokens), q/k-norm, the scale and the size bias, as the
    block's own attention computes them. Run by the seam, not the reducer, so it counts as the
    block's work (GMACs convention "pre").
    """
    attn = block.attn
    width = attn.num_heads * attn.head_dim
    bias = None if attn.qkv.bias is None else attn.qkv.bias[: 2 * width]
    qk = F.linear(block.norm1(x), attn.qkv.weight[: 2 * width], bias)
    b, n, _ = qk.shape
    qk = qk.reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qk[0]), attn.k_norm(qk[1])
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    size_bias = attention_bias(state, logits.dtype)
    if size_bias is not None:
        logits = logits + size_bias
    return logits.softmax(-1)


def _attention_from_probs(attn: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` on ``x`` with its softmax replaced by given ``probs`` (B, H, N, N).

    The value rows of the block's qkv projection, ``probs @ v``, then the attention's own output
    norm, gate, projection and dropout, as ``Attention.forward`` runs them after its softmax.
    """
    b, n, _ = x.shape
    width = attn.num_heads * attn.head_dim
    bias = None if attn.qkv.bias is None else attn.qkv.bias[2 * width:]
    v = F.linear(x, attn.qkv.weight[2 * width:], bias).reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    out = (attn.attn_drop(probs.to(v.dtype)) @ v).transpose(1, 2).reshape(b, n, width)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _attention(block: torch.nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool):
    """``block.attn(x)`` with the size bias fed as the state's ``prop_attn_impl`` says."""
    state: TokenState = block._seam_state
    if state.attn_probs is not None:  # a "pre" reducer's merged attention map (MCTF)
        probs, state.attn_probs = state.attn_probs, None
        return _attention_from_probs(block.attn, x, probs)
    bias = log_size(state)
    if bias is None:
        return block.attn(x, attn_mask=attn_mask, is_causal=is_causal)
    if state.prop_attn_impl == "mask" or attn_mask is not None or is_causal or not block.attn.fused_attn:
        mask = bias.to(_attention_dtype(x))[:, None, None, :]
        return block.attn(x, attn_mask=mask if attn_mask is None else attn_mask + mask, is_causal=is_causal)
    with _BiasedSDPA(PROP_ATTN_KERNELS[state.prop_attn_impl], bias):
        return block.attn(x)


def _seam_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    # The seam: timm's Block.forward with the reduction before, between or after its two residual
    # branches (the block's stage)
    state: TokenState = self._seam_state
    if self._seam_index == 0:
        state.reset()
    reducer, stage = self._seam_reducer, self._seam_stage
    if reducer is not None and stage == "pre":
        probs = one_step_ahead_probs(self, x, state)
        x = reducer(x, BlockContext(self._seam_index, self._seam_num_prefix, state, self, None, probs))
        if state.attn_probs is None:
            raise RuntimeError("a 'pre' reducer must hand the block the attention of its reduced tokens "
                               "(ctx.state.attn_probs, (B, H, N', N'))")
    x = x + self.drop_path1(self.ls1(_attention(self, self.norm1(x), attn_mask, is_causal)))
    qkv = self.attn.qkv._seam_output
    self.attn.qkv._seam_output = None  # let go here, whether a reducer reads it or not
    if reducer is not None and stage == "mid":
        x = reducer(x, BlockContext(self._seam_index, self._seam_num_prefix, state, self, qkv))
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    if reducer is not None and stage == "post":
        x = reducer(x, BlockContext(self._seam_index, self._seam_num_prefix, state, self, qkv))
    if state.recording:
        state.observed.append(x.shape[1])
    return x


def _capture_output(module: torch.nn.Module, _inputs, output) -> None:
    # kept on the projection itself (not in a closure over the block), so a deep copy of a
    # patched model captures into its own modules
    module._seam_output = output


@dataclass(frozen=True)
class PrefixLayout:
    """The tokens a timm ViT puts before its patches, in timm's order: class, registers, distillation.

    Attributes:
        num_prefix: how many (``model.num_prefix_tokens``).
        class_token: token 0 is a class token (``model.cls_token``); without one, row 0 of the
            attention is a register's or the top-left patch's, not a class token's.
        registers: register tokens (``model.num_reg_tokens``).
        distillation: a distillation token (DeiT's distilled models).
        pool: the head's pooling (``model.global_pool``; "map" is an attention-pool head).
    """

    num_prefix: int
    class_token: bool
    registers: int
    distillation: bool
    pool: str


# poolings the seam makes size-aware (a merged token counted ``size`` times, as the blocks'
# proportional attention counts it): "token" reads the class token alone, which no method merges,
# and "avg" is weighted by size in :func:`_size_weighted_head`
SIZE_AWARE_POOLS = ("token", "avg")


def prefix_layout(model: torch.nn.Module) -> PrefixLayout:
    """The model's prefix tokens and pooling, read off the timm attributes that define them."""
    cls = getattr(model, "cls_token", None) is not None
    regs = int(getattr(model, "num_reg_tokens", 0) or 0)
    dist = getattr(model, "dist_token", None) is not None
    pool = "map" if getattr(model, "attn_pool", None) is not None else str(getattr(model, "global_pool", ""))
    layout = PrefixLayout(int(model.num_prefix_tokens), cls, regs, dist, pool)
    if layout.num_prefix != cls + regs + dist:
        raise UnsupportedModel(f"{type(model).__name__} has {layout.num_prefix} prefix tokens but class/registers/"
                               f"distillation account for {cls + regs + dist}: unknown prefix layout")
    return layout


def check_premises(model: torch.nn.Module, method: str, needs_class_token: bool = False,
                   merges: bool = False) -> PrefixLayout:
    """Raise :class:`UnsupportedModel` when ``model`` cannot give what ``method`` assumes.

    A method that ranks tokens by the class token's attention needs a class token at index 0; a
    merging method needs a head whose pooling counts a merged token by its size.
    """
    layout = prefix_layout(model)
    if needs_class_token and not layout.class_token:
        raise UnsupportedModel(f"{method} ranks tokens by the class token's attention and "
                               f"{type(model).__name__} has no class token (pooling {layout.pool!r}, "
                               f"{layout.registers} register tokens): row 0 would be another token's")
    if merges and layout.pool not in SIZE_AWARE_POOLS:
        raise UnsupportedModel(f"{method} merges tokens and the head's {layout.pool!r} pooling would count a "
                               f"merged token once where the blocks count it by its size "
                               f"(size-aware pooling: {', '.join(SIZE_AWARE_POOLS)})")
    return layout


def check_blocks(model: torch.nn.Module) -> None:
    """Raise :class:`UnsupportedModel` unless every block is timm's ``Block`` with timm's ``Attention``
    forward (a subclass that changes the attention, e.g. adds a bias, would not match the keys and
    class attention the seam derives from the qkv projection)."""
    from timm.models.vision_transformer import Attention, Block

    if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
        raise UnsupportedModel(f"unsupported model {type(model).__name__}: not a timm VisionTransformer")
    for blk in model.blocks:
        if not isinstance(blk, Block) or type(blk).forward is not Block.forward:
            raise UnsupportedModel(f"unsupported block {type(blk).__name__}: the seam needs timm's vision_transformer.Block")
        attn = blk.attn
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
            raise UnsupportedModel(f"unsupported attention {type(attn).__name__}: the seam needs timm's "
                                   f"vision_transformer.Attention forward (the keys and class attention it derives)")
        if not isinstance(getattr(attn, "qkv", None), torch.nn.Linear):
            raise UnsupportedModel(f"unsupported attention {type(attn).__name__}: the seam needs a fused qkv projection")


def _check_supported(model: torch.nn.Module) -> None:
    check_blocks(model)
    if hasattr(model, "_seam_state"):
        raise RuntimeError("model is already patched; patch a fresh model")


def _size_weighted_forward_head(self, x: torch.Tensor, pre_logits: bool = False):
    """The model class's own ``forward_head``, with average pooling weighted by token size.

    Module-level and reaching the head through ``self`` (no closure over a bound method), so a
    deep copy of a patched model runs its own head.
    """
    size = self._seam_state.size
    if size is not None and self.global_pool == "avg" and getattr(self, "attn_pool", None) is None:
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        w = size[:, start:]
        # mean(x * w * n / sum(w)) == sum(x * w) / sum(w): timm's own pooling then does the rest
        x = torch.cat([x[:, :start], x[:, start:] * (w * w.shape[1] / w.sum(1, keepdim=True)).to(x.dtype)], 1)
    return type(self).forward_head(self, x, pre_logits=pre_logits)


def _size_weighted_head(model: torch.nn.Module) -> None:
    """Make average pooling weight each token by its size (MAE-style heads after merging)."""
    model.forward_head = types.MethodType(_size_weighted_forward_head, model)


def install(model: torch.nn.Module, reducers: dict[int, Reducer], prop_attn: bool = False,
            capture_qkv: bool = True, prop_attn_impl: str = "mask", needs_class_token: bool = False,
            merges: bool = False, method: str = "this method", stage: str = "mid") -> TokenState:
    """Patch ``model`` in place so ``reducers[i]`` runs in block i at ``stage`` (between attention and MLP).

    Args:
        model: a fresh timm VisionTransformer (or subclass such as DeiT's distilled model).
        reducers: block index -> reducer; blocks without one run as in timm.
        prop_attn: add log(token size) to attention logits once tokens carry sizes.
        capture_qkv: keep each block's qkv projection until its reducer ran, so ``ctx.keys()`` /
            ``ctx.cls_attn()`` work.
        prop_attn_impl: how log(size) reaches the attention kernel ("mask", "fold", "flex"; see the
            module docstring); :func:`set_prop_attn_impl` changes it later.
        needs_class_token: the reducers read ``ctx.cls_attn()``: refuse a model without a class token.
        merges: the reducers merge tokens (sizes above 1): refuse a head that pools without sizes.
        method: the method's name, for the refusal's message.
        stage: where every reducer runs (:data:`STAGES`): "pre" (before the attention), "mid"
            (between attention and MLP, the default) or "post" (after the MLP).

    Returns:
        The TokenState the patched model carries (sizes, observed counts).

    Raises:
        UnsupportedModel: the model is not a timm ViT made of standard Blocks, or cannot give what
            the method assumes (:func:`check_premises`).
    """
    _check_supported(model)
    if reducers:  # the identity knob patches nothing a premise could fail
        check_premises(model, method, needs_class_token, merges)
    _check_impl(prop_attn_impl)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choices: {', '.join(STAGES)}")
    depth = len(model.blocks)
    bad = [i for i in reducers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"reducer block indices {bad} outside 0..{depth - 1}")
    state = TokenState(prop_attn=prop_attn, prop_attn_impl=prop_attn_impl)
    model._seam_state = state
    for i, blk in enumerate(model.blocks):
        _patch_block(blk, i, state, reducers.get(i), model.num_prefix_tokens, capture_qkv, stage)
    _size_weighted_head(model)
    return state


def _patch_block(blk, index: int, state: TokenState, reducer: Optional[Reducer], num_prefix: int,
                 capture_qkv: bool, stage: str = "mid") -> None:
    """Route block ``index``'s forward through the seam with ``reducer`` at ``stage``."""
    blk._seam_state = state
    blk._seam_stage = stage
    blk._seam_index = index
    blk._seam_num_prefix = num_prefix
    blk._seam_reducer = reducer
    blk.attn.qkv._seam_output = None
    if capture_qkv:
        # every block alike, reducer or not: dynamo does not guard on hooks, so a graph compiled
        # for a block without the hook could be reused for one with it (the capture then lost)
        blk.attn.qkv.register_forward_hook(_capture_output)
    blk.forward = types.MethodType(_seam_forward, blk)

