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
        positions: (B, N) long, each current token's index in the original token sequence (prefix
            tokens included), or None while nothing was reduced. Kept in sync by reducers (through
            :func:`keep_tokens` / :func:`merge_positions`) only on models whose blocks need it.
        needs_positions: the model's blocks need each token's position (rotary embeddings,
            relative-position bias): reducers must keep ``positions`` in sync.
        class_token, pool: the model's prefix layout (:func:`prefix_layout`), which the seam checks
            where a premise is used, whatever the method declared.
        method: the method's name, for those refusals.
    """

    prop_attn: bool = False
    prop_attn_impl: str = "mask"
    size: Optional[torch.Tensor] = None
    recording: bool = False
    observed: list = field(default_factory=list)
    attn_probs: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    needs_positions: bool = False
    class_token: bool = True
    pool: str = "token"
    method: str = "this method"

    def reset(self) -> None:
        self.size = None
        self.observed = []
        self.attn_probs = None
        self.positions = None


@dataclass
class BlockContext:
    """What a reducer sees of the block that just ran its attention."""

    index: int
    num_prefix: int
    state: TokenState
    block: torch.nn.Module
    captured_qkv: Optional[torch.Tensor]  # timm Block's fused qkv projection output (B, N, 3 x H x d): ``qkv``
    attn_probs: Optional[torch.Tensor] = None  # stage "pre": the block's attention on the entering tokens
    # position-aware families (EVA / rope, BEiT, relpos): the block's own q and k (B, H, N, d), after
    # q/k-norm and rotary embedding, and the positional bias its attention added, (1 or B, H, N, N)
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    position_bias: Optional[torch.Tensor] = None
    # the tokens that entered the block, (B, N, C) (before any reduction of this block): what a
    # reducer needs to score a token by how much the block changed it, ||x_out - x_in||
    block_input: Optional[torch.Tensor] = None

    @property
    def qkv(self) -> torch.Tensor:
        """The block's fused qkv projection output (B, N, 3 x H x d), where the block has one.

        EVA / rope, BEiT and relpos blocks expose q and k through ``keys()`` / ``cls_attn()`` instead
        (their projections differ): reading ``qkv`` there refuses the cell, declared or not.
        """
        if self.captured_qkv is None and self.q is not None:
            raise UnsupportedModel(f"{self.state.method} reads the block's fused qkv projection (ctx.qkv), which this "
                                   f"model's blocks do not expose (use ctx.keys() or ctx.cls_attn())")
        return self.captured_qkv

    def _split_qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q is not None:
            return self.q, self.k
        if self.captured_qkv is None:
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
        if not self.state.class_token:  # the premise checked where it is used, declared or not
            raise UnsupportedModel(f"{self.state.method} reads the class token's attention (ctx.cls_attn()) and this "
                                   f"model has no class token: row 0 is another token's")
        q, k = self._split_qk()
        logits = (q[:, :, :1] * self.block.attn.scale) @ k.transpose(-2, -1)
        if self.position_bias is not None:
            logits = logits + self.position_bias[:, :, :1].to(logits.dtype)
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


def current_positions(state: TokenState, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Each token's original index (B, N) long: ``state.positions``, or 0..N-1 while nothing was
    reduced; None when the model's blocks do not need positions (nothing to keep in sync)."""
    if not state.needs_positions:
        return None
    if state.positions is not None:
        return state.positions
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)


def keep_tokens(ctx: BlockContext, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The prefix tokens, then the tokens of ``x`` (B, N, C) at ``index`` (B, K) (indices into ``x``,
    all at least ``ctx.num_prefix``): (B, num_prefix + K, C). Sizes and positions follow the tokens.

    The one helper a pruning method needs: it gathers ``ctx.state.size`` (when tokens carry sizes)
    and ``ctx.state.positions`` (when the model's blocks need positions) with the kept tokens.
    """
    p, state = ctx.num_prefix, ctx.state
    positions = current_positions(state, x)
    if state.size is not None:
        state.size = torch.cat([state.size[:, :p], gather_tokens(state.size, index)], 1)
    if positions is not None:
        state.positions = torch.cat([positions[:, :p], positions.gather(1, index)], 1)
    return torch.cat([x[:, :p], gather_tokens(x, index)], 1)


def merge_positions(ctx: BlockContext, merge: Callable, x: torch.Tensor) -> None:
    """Carry ``ctx.state.positions`` through a ToMe-style ``merge`` (``merge(t, mode)``, (B, N, C) ->
    (B, N', C)) applied to the tokens ``x``: mode "prune", so a merged token keeps its DESTINATION's
    position (the token it was merged into), and an unmerged token keeps its own. Call it with the
    tokens before the merge; a no-op when the model's blocks need no positions."""
    positions = current_positions(ctx.state, x)
    if positions is not None:
        ctx.state.positions = merge(positions.unsqueeze(-1), mode="prune")[..., 0]


def gather_rope(rope: torch.Tensor, patch_index: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of each image's current patch tokens.

    Args:
        rope: timm's embedding for all patches, (P, D), or per head (H, P, D) (mixed rope).
        patch_index: (B, N') each current patch token's index among the original patches.

    Returns:
        (B, 1, N', D) (or (B, H, N', D)), broadcasting over the heads of q and k (B, H, N', d).
    """
    if rope.dim() == 2:
        return rope[patch_index].unsqueeze(1)
    if rope.dim() == 3:
        return rope[:, patch_index].transpose(0, 1)
    raise UnsupportedModel(f"rotary embedding of shape {tuple(rope.shape)}: expected (P, D) or (H, P, D)")


def gather_pair_bias(bias: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A relative-position bias (1, H, N, N) at positions x positions per image: (B, H, N', N')."""
    if bias.shape[0] != 1:
        raise UnsupportedModel(f"a per-image relative-position bias {tuple(bias.shape)} is not supported")
    return bias[0][:, positions[:, :, None], positions[:, None, :]].transpose(0, 1)


def one_step_ahead_probs(block: torch.nn.Module, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """The block's attention probabilities on the entering tokens ``x`` (B, N, C): (B, H, N, N).

    Stage "pre" (MCTF's one-step-ahead attention): ``norm1``, the q and k rows of the block's qkv
    projection (v is left for the reduced tokens), q/k-norm, the scale and the size bias, in the
    arithmetic order of MCTF's official ``MHSA`` (:func:`_projection_rows`; product, then scale),
    which under bf16 autocast gives its logits bit for bit. Run by the seam, not the reducer, so it
    counts as the block's work (GMACs convention "pre").
    """
    attn = block.attn
    width = attn.num_heads * attn.head_dim
    qk = _projection_rows(attn.qkv, block.norm1(x), 0, 2 * width)
    b, n, _ = qk.shape
    qk = qk.reshape(b, n, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qk[0]), attn.k_norm(qk[1])
    # MCTF's order (models/SA/MHSA.py): the product, then the scale, then log size as it is (fp32
    # under autocast, so the softmax runs in fp32 once tokens carry sizes, as the official's does)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    size_bias = log_size(state)
    if size_bias is not None:
        logits = logits + size_bias[:, None, None, :]
    return logits.softmax(-1)


def _projection_rows(linear: torch.nn.Linear, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output features ``start:stop`` of ``linear(x)`` as MCTF computes them: ``x @ W.T + b`` (the
    product, then the bias in its own dtype: under autocast the bf16 product plus an fp32 bias is
    fp32, where ``F.linear`` would round the fused result to bf16)."""
    out = x @ linear.weight[start:stop].T
    return out if linear.bias is None else out + linear.bias[start:stop]


def _attention_from_probs(attn: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` on ``x`` with its softmax replaced by given ``probs`` (B, H, N, N).

    The value rows of the block's qkv projection, ``probs @ v``, then the attention's own output
    norm, gate, projection and dropout, as ``Attention.forward`` runs them after its softmax.
    """
    b, n, _ = x.shape
    width = attn.num_heads * attn.head_dim
    v = _projection_rows(attn.qkv, x, 2 * width, 3 * width).reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
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
        # SDPA wants the mask in the query's dtype; timm's eager product takes log size as it is (fp32
        # under autocast, so its softmax runs in fp32, as the official ToMe-family code's ``attn + size.log()``)
        mask = (bias if not block.attn.fused_attn else bias.to(_attention_dtype(x)))[:, None, None, :]
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
    x_in = x
    if reducer is not None and stage == "pre":
        probs = one_step_ahead_probs(self, x, state)
        ctx = BlockContext(self._seam_index, self._seam_num_prefix, state, self, None, probs, block_input=x_in)
        x = reducer(x, ctx)
        if state.attn_probs is None and x.shape[1] == probs.shape[-1]:
            state.attn_probs = probs  # nothing reduced (a wrapper, a block with no work): the block's own attention
        if state.attn_probs is None:
            raise RuntimeError("a 'pre' reducer must hand the block the attention of its reduced tokens "
                               "(ctx.state.attn_probs, (B, H, N', N'))")
    x = x + self.drop_path1(self.ls1(_attention(self, self.norm1(x), attn_mask, is_causal)))
    qkv = self.attn.qkv._seam_output
    self.attn.qkv._seam_output = None  # let go here, whether a reducer reads it or not
    if reducer is not None and stage == "mid":
        x = reducer(x, BlockContext(self._seam_index, self._seam_num_prefix, state, self, qkv, block_input=x_in))
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    if reducer is not None and stage == "post":
        x = reducer(x, BlockContext(self._seam_index, self._seam_num_prefix, state, self, qkv, block_input=x_in))
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
    reg_token = getattr(model, "reg_token", None)  # EVA keeps its registers in ``reg_token`` (1, R, C)
    if not regs and isinstance(reg_token, torch.Tensor):
        regs = int(reg_token.shape[1])
    dist = getattr(model, "dist_token", None) is not None
    pool = "map" if getattr(model, "attn_pool", None) is not None else str(getattr(model, "global_pool", ""))
    layout = PrefixLayout(int(model.num_prefix_tokens), cls, regs, dist, pool)
    if layout.num_prefix != cls + regs + dist:
        raise UnsupportedModel(f"{type(model).__name__} has {layout.num_prefix} prefix tokens but class/registers/"
                               f"distillation account for {cls + regs + dist}: unknown prefix layout")
    return layout


def check_premises(model: torch.nn.Module, method: str, needs_class_token: bool = False,
                   merges: bool = False, tracks_positions: bool = True) -> PrefixLayout:
    """Raise :class:`UnsupportedModel` when ``model`` cannot give what ``method`` assumes.

    A method that ranks tokens by the class token's attention needs a class token at index 0; a
    merging method needs a head whose pooling counts a merged token by its size; a model whose
    blocks need each token's position (rotary embeddings, relative-position bias) needs a method
    that keeps ``state.positions`` in sync (``tracks_positions``).
    """
    layout = prefix_layout(model)
    if not tracks_positions:
        family = check_blocks(model)
        if family in POSITION_FAMILIES:
            raise UnsupportedModel(f"{method} does not keep token positions in sync (tracks_positions) and "
                                   f"{type(model).__name__}'s {family} blocks need each token's position "
                                   f"({'rotary embedding' if family == 'eva' else 'relative-position bias'})")
    if needs_class_token and not layout.class_token:
        raise UnsupportedModel(f"{method} ranks tokens by the class token's attention and "
                               f"{type(model).__name__} has no class token (pooling {layout.pool!r}, "
                               f"{layout.registers} register tokens): row 0 would be another token's")
    if merges and layout.pool not in SIZE_AWARE_POOLS:
        raise UnsupportedModel(f"{method} merges tokens and the head's {layout.pool!r} pooling would count a "
                               f"merged token once where the blocks count it by its size "
                               f"(size-aware pooling: {', '.join(SIZE_AWARE_POOLS)})")
    return layout


# block families the seam patches, and whether their blocks need each token's position
FAMILIES = ("vit", "eva", "beit", "relpos")
POSITION_FAMILIES = ("eva", "beit", "relpos")


def block_family(blk: torch.nn.Module) -> str:
    """The seam family of one timm block, or :class:`UnsupportedModel` with the reason.

    - "vit": ``vision_transformer.Block`` with timm's ``Attention`` forward and a fused qkv projection;
    - "eva": ``eva.EvaBlock`` (EVA-02, ``vit_*_rope_*``) with ``EvaAttention`` or ``AttentionRope``:
      rotary embeddings of each token's position;
    - "beit": ``beit.Block`` with BEiT's ``Attention``: a relative-position bias table;
    - "relpos": ``vision_transformer_relpos.RelPosBlock`` with ``RelPosAttention``: a
      relative-position bias (MLP or table).

    A subclass that overrides the block's or the attention's forward (e.g. adds a bias) is refused:
    the keys and class attention the seam derives would not match what it computes.
    """
    from timm.models import beit, eva, vision_transformer as vt, vision_transformer_relpos as relpos

    def same(obj, cls) -> bool:
        return isinstance(obj, cls) and type(obj).forward is cls.forward

    families = [("vit", vt.Block, (vt.Attention,)), ("eva", eva.EvaBlock, (eva.EvaAttention, eva.AttentionRope)),
                ("beit", beit.Block, (beit.Attention,)), ("relpos", relpos.RelPosBlock, (relpos.RelPosAttention,))]
    attn = getattr(blk, "attn", None)
    for family, block_cls, attn_classes in families:
        if not same(blk, block_cls):
            continue
        if not any(same(attn, cls) for cls in attn_classes):
            raise UnsupportedModel(f"unsupported attention {type(attn).__name__} in {block_cls.__module__.split('.')[-1]}."
                                   f"{block_cls.__name__}: the seam needs the {' or '.join(c.__name__ for c in attn_classes)} forward "
                                   f"of timm (the keys and class attention it derives)")
        if family == "vit" and not isinstance(getattr(attn, "qkv", None), torch.nn.Linear):
            raise UnsupportedModel(f"unsupported attention {type(attn).__name__}: the seam needs a fused qkv projection")
        return family
    raise UnsupportedModel(f"unsupported block {type(blk).__name__}: the seam patches timm's vision_transformer.Block, "
                           f"eva.EvaBlock, beit.Block and vision_transformer_relpos.RelPosBlock")


def check_blocks(model: torch.nn.Module) -> str:
    """The family every block of ``model`` belongs to (:func:`block_family`), or
    :class:`UnsupportedModel` (not a timm ViT, an unsupported block, or mixed families)."""
    if not hasattr(model, "blocks") or not hasattr(model, "num_prefix_tokens"):
        raise UnsupportedModel(f"unsupported model {type(model).__name__}: not a timm VisionTransformer")
    families = {block_family(blk) for blk in model.blocks}
    if len(families) != 1:
        raise UnsupportedModel(f"{type(model).__name__} mixes block families {sorted(families)}")
    family = families.pop()
    if family == "eva" and getattr(model, "rope", None) is not None and getattr(model, "patch_drop", None) is not None:
        raise UnsupportedModel("EVA patch dropout gathers the rotary embedding per image itself: not supported")
    return family


def _check_supported(model: torch.nn.Module) -> str:
    family = check_blocks(model)
    if hasattr(model, "_seam_state"):
        raise RuntimeError("model is already patched; patch a fresh model")
    return family


def _size_weighted_forward_head(self, x: torch.Tensor, pre_logits: bool = False):
    """The model class's own ``forward_head``, with average pooling weighted by token size.

    Module-level and reaching the head through ``self`` (no closure over a bound method), so a
    deep copy of a patched model runs its own head.
    """
    state = self._seam_state
    size = state.size
    if size is not None and state.pool not in SIZE_AWARE_POOLS:  # merged tokens reach a head that ignores sizes
        raise UnsupportedModel(f"{state.method} merges tokens (they carry sizes) and the head's {state.pool!r} pooling "
                               f"counts a merged token once (size-aware pooling: {', '.join(SIZE_AWARE_POOLS)})")
    if size is not None and self.global_pool == "avg" and getattr(self, "attn_pool", None) is None:
        start = 0 if getattr(self, "pool_include_prefix", False) else self.num_prefix_tokens
        w = size[:, start:]
        # mean(x * w * n / sum(w)) == sum(x * w) / sum(w): timm's own pooling then does the rest
        x = torch.cat([x[:, :start], x[:, start:] * (w * w.shape[1] / w.sum(1, keepdim=True)).to(x.dtype)], 1)
    return type(self).forward_head(self, x, pre_logits=pre_logits)


def _size_weighted_head(model: torch.nn.Module) -> None:
    """Make average pooling weight each token by its size (MAE-style heads after merging)."""
    model.forward_head = types.MethodType(_size_weighted_forward_head, model)


def _check_request(reducers: dict, depth: int, stage: str, family: str, method: str) -> None:
    """Refuse a stage the seam does not know, one it cannot run on ``family``, blocks the model lacks."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choices: {', '.join(STAGES)}")
    if reducers and stage == "pre" and family != "vit":
        raise UnsupportedModel(f"{method} reduces before the attention (stage 'pre'), which the seam supports on "
                               f"timm's vision_transformer.Block only, not on {family} blocks")
    bad = [i for i in reducers if not 0 <= i < depth]
    if bad:
        raise ValueError(f"reducer block indices {bad} outside 0..{depth - 1}")


def install(model: torch.nn.Module, reducers: dict[int, Reducer], prop_attn: bool = False,
            capture_qkv: bool = True, prop_attn_impl: str = "mask", needs_class_token: bool = False,
            merges: bool = False, method: str = "this method", stage: str = "mid",
            tracks_positions: bool = False) -> TokenState:
    """Patch ``model`` in place so ``reducers[i]`` runs in block i at ``stage`` (between attention and MLP).

    Args:
        model: a fresh timm ViT (``Block``, ``EvaBlock``, BEiT or relpos blocks; :func:`block_family`).
        reducers: block index -> reducer; blocks without one run as in timm.
        prop_attn: add log(token size) to attention logits once tokens carry sizes.
        capture_qkv: keep each block's qkv projection until its reducer ran (``ctx.keys()``, ``ctx.cls_attn()``).
        prop_attn_impl: how log(size) reaches the attention kernel ("mask", "fold", "flex"; module docstring).
        needs_class_token / merges / tracks_positions: the method's premises (:func:`check_premises`):
            it reads ``ctx.cls_attn()``; it merges tokens (the head must pool by size); it keeps
            ``state.positions`` in sync (:func:`keep_tokens`, :func:`merge_positions`), required on
            EVA / rope, BEiT and relpos blocks (:data:`POSITION_FAMILIES`).
        method: the method's name, for the refusal's message.
        stage: where every reducer runs (:data:`STAGES`): "pre", "mid" (the default) or "post".

    Returns the TokenState the patched model carries (sizes, positions, observed counts). Raises
    :class:`UnsupportedModel` for blocks the seam does not know or a premise the model cannot give.
    """
    family = _check_supported(model)
    if reducers:  # the identity knob patches nothing a premise could fail
        check_premises(model, method, needs_class_token, merges, tracks_positions)
    _check_impl(prop_attn_impl)
    _check_request(reducers, len(model.blocks), stage, family, method)
    layout = prefix_layout(model)
    state = TokenState(prop_attn=prop_attn, prop_attn_impl=prop_attn_impl, needs_positions=family in POSITION_FAMILIES,
                       class_token=layout.class_token, pool=layout.pool, method=method)
    model._seam_state = state
    for i, blk in enumerate(model.blocks):
        if family == "vit":
            _patch_block(blk, i, state, reducers.get(i), model.num_prefix_tokens, capture_qkv, stage)
        else:
            _patch_position_block(blk, family, i, state, reducers.get(i), model.num_prefix_tokens, stage)
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



# --- position-aware families: EVA / rope (rotary embedding), BEiT and relpos (relative-position bias)
#
# timm computes the positional term once for the full token grid and hands it to every block (EVA's
# ``rope``, BEiT's ``shared_rel_pos_bias``) or each block computes it for the full grid itself (BEiT's
# and relpos's own bias tables). Once tokens were reduced, the patched block takes the term at its
# tokens' positions (``state.positions``): the rotary embedding gathered per image, (B, 1, N', D);
# the bias gathered at positions x positions, (B, H, N', N'). Until a block has a reducer or a
# reducer ran before it, it runs timm's own forward unchanged (the identity knob is bit-identical).
# Otherwise its attention is computed here from the block's own modules, as timm's forward does,
# with the size bias (proportional attention) added to the mask: always the "mask" implementation,
# by the kernel the block's ``attn.fused_attn`` names (SDPA, or timm's eager product for
# ``--attention eager``), so the reduced blocks run the kernel the record says.


def _family_qkv(attn: torch.nn.Module, x: torch.Tensor):
    """q, k, v (B, heads, N, d) as the family's attention projects them (fused qkv with the separate
    q/k/v biases of EVA and BEiT, or separate q/k/v projections), q/k-norm applied."""
    b, n, _ = x.shape
    if getattr(attn, "qkv", None) is not None:
        q_bias = getattr(attn, "q_bias", None)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            qkv_bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            if getattr(attn, "qkv_bias_separate", False):
                qkv = attn.qkv(x) + qkv_bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(b, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(b, n, kv_heads, -1).transpose(1, 2)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return q, k, v


def _family_position_bias(blk, positions: Optional[torch.Tensor], shared: Optional[torch.Tensor]):
    """BEiT's / relpos's relative-position bias for the current tokens, (1 or B, H, N, N), or None."""
    attn, family = blk.attn, blk._seam_family
    bias = None
    if family == "beit":
        if attn.relative_position_bias_table is not None:
            bias = attn._get_rel_pos_bias()
            if shared is not None:
                bias = bias + shared
        else:
            bias = shared
    elif family == "relpos":
        bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else shared
    if bias is not None and positions is not None:
        bias = gather_pair_bias(bias, positions)
    return bias


def _apply_rope(attn, q, k, v, rope: torch.Tensor, positions: Optional[torch.Tensor]):
    """q and k with the rotary embedding of each non-prefix token's position (gathered once reduced)."""
    from timm.layers import apply_rot_embed_cat

    npt = attn.num_prefix_tokens
    if positions is not None:
        rope = gather_rope(rope, positions[:, npt:] - npt)
    half = getattr(attn, "rotate_half", False)
    q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
    return q, k


def _family_attention(blk, x: torch.Tensor, rope: Optional[torch.Tensor], shared: Optional[torch.Tensor],
                      attn_mask: Optional[torch.Tensor], is_causal: bool):
    """The block's attention on its current tokens ``x`` (normed), with positions and sizes.

    Returns the attention branch's output and (q, k, position bias) for the reducer's context.
    """
    attn, state = blk.attn, blk._seam_state
    positions = state.positions
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _family_qkv(attn, x)
    if blk._seam_family == "eva" and rope is not None:
        q, k = _apply_rope(attn, q, k, v, rope, positions)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    position_bias = _family_position_bias(blk, positions, shared)
    mask = position_bias
    size_bias = log_size(state)
    if size_bias is not None:
        size_bias = size_bias.to(_attention_dtype(x))[:, None, None, :]
        mask = size_bias if mask is None else mask + size_bias
    if attn_mask is not None:
        mask = attn_mask if mask is None else mask + attn_mask
    out = _family_kernel(attn, q, k, v, None if mask is None else mask.to(q.dtype), is_causal)
    out = out.transpose(1, 2).reshape(b, n, -1)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, (q, k, position_bias)


def _family_kernel(attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
    """softmax(q kᵀ scale + mask) v by the kernel the block's ``attn.fused_attn`` names, as timm's own
    forward picks it: SDPA when fused (the default), else the explicit product (``--attention eager``)."""
    if getattr(attn, "fused_attn", True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return eager_attention(q, k, v, mask, getattr(attn, "scale", q.shape[-1] ** -0.5), is_causal, attn.attn_drop)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, is_causal: bool = False,
                    dropout: Callable[[torch.Tensor], torch.Tensor] = lambda p: p) -> torch.Tensor:
    """timm's eager attention of (B, H, N, d) ``q``, ``k``, ``v``: softmax(q scale kᵀ + mask) v.

    ``mask`` is additive (broadcast to (B, H, N, N)); ``is_causal`` hides later keys; ``dropout``
    acts on the probabilities. Equal to ``scaled_dot_product_attention`` to float rounding.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if is_causal:
        hidden = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(1)  # SDPA's top-left causal
        logits = logits.masked_fill(hidden, float("-inf"))
    if mask is not None:
        logits = logits + mask
    return dropout(logits.softmax(dim=-1)) @ v


def _family_scale(blk, branch: int, y: torch.Tensor) -> torch.Tensor:
    """The block's LayerScale of residual ``branch`` (1: attention, 2: MLP), as its forward applies it."""
    if blk._seam_family == "relpos":
        return (blk.ls1 if branch == 1 else blk.ls2)(y)
    gamma = blk.gamma_1 if branch == 1 else blk.gamma_2
    return y if gamma is None else gamma * y


def _seam_forward_positions(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                            attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                            shared_rel_pos_bias: Optional[torch.Tensor] = None,
                            shared_rel_pos: Optional[torch.Tensor] = None):
    # The seam of the position-aware families (EvaBlock, beit.Block, RelPosBlock): the block's
    # forward with the reduction between attention and MLP (or after the MLP)
    state: TokenState = self._seam_state
    if self._seam_index == 0:
        state.reset()
    reducer, stage, family = self._seam_reducer, self._seam_stage, self._seam_family
    shared = shared_rel_pos_bias if family == "beit" else shared_rel_pos
    if reducer is None and state.positions is None and state.size is None:
        # nothing reduced yet and nothing to reduce here: timm's own forward, bit for bit
        if family == "eva":
            x = type(self).forward(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        elif family == "beit":
            x = type(self).forward(self, x, shared_rel_pos_bias=shared)
        else:
            x = type(self).forward(self, x, shared_rel_pos=shared)
    else:
        x_in = x
        out, (q, k, position_bias) = _family_attention(self, self.norm1(x), rope, shared, attn_mask, is_causal)
        x = x + self.drop_path1(_family_scale(self, 1, out))
        ctx = BlockContext(self._seam_index, self._seam_num_prefix, state, self, None,
                           q=q, k=k, position_bias=position_bias, block_input=x_in)
        if reducer is not None and stage == "mid":
            x = _checked_positions(state, x.shape[1], reducer(x, ctx))
        x = x + self.drop_path2(_family_scale(self, 2, self.mlp(self.norm2(x))))
        if reducer is not None and stage == "post":
            x = _checked_positions(state, x.shape[1], reducer(x, ctx))
    if state.recording:
        state.observed.append(x.shape[1])
    return x


def _checked_positions(state: TokenState, entering: int, x: torch.Tensor) -> torch.Tensor:
    """``x`` as a reducer left it (``entering`` tokens came in), refused if its token count and
    ``state.positions`` disagree: the next block would take rotary embeddings or relative bias at the
    wrong tokens' positions. No positions yet means none was reduced: the count must not change."""
    known = entering if state.positions is None else state.positions.shape[1]
    if known != x.shape[1]:
        raise UnsupportedModel(f"{state.method} changed the token count without keeping token positions in sync "
                               f"(keep_tokens / merge_positions), and this model's blocks need each token's position")
    return x


def _patch_position_block(blk, family: str, index: int, state: TokenState, reducer: Optional[Reducer],
                          num_prefix: int, stage: str) -> None:
    """Route block ``index`` of a position-aware ``family`` through the seam with ``reducer`` at ``stage``."""
    blk._seam_state = state
    blk._seam_family = family
    blk._seam_stage = stage
    blk._seam_index = index
    blk._seam_num_prefix = num_prefix
    blk._seam_reducer = reducer
    blk.forward = types.MethodType(_seam_forward_positions, blk)
