"""PPT: token pruning and pooling, chosen per image by how uneven the tokens' importance is.

Wu et al., "PPT: Token Pruning and Pooling for Efficient Vision Transformers", arXiv 2310.01812,
https://github.com/xjwu1024/PPT (``ppt_deit.py``, ``tome.py``, commit 706bcdd), checked against it
on the reference checkpoint (``fidelity/deit_tiny_cifar10_newmethods_golden.json``, case
``ppt_r50_thr7e-05``).

Modifications (as the official ``pp_block_adaptive``):
 - at the pp blocks (option ``pp_loc_list``, default 0-based 3, 6, 9 of 12 as the official
   scripts), between attention and MLP, ``r`` tokens leave, clamped to half the non-prefix tokens
   (the official ``min(r, (T - 1) // 2)``); other blocks reduce nothing;
 - each non-prefix token's *importance* (the official ``score_assignment_step``, after ATS) is the
   class token's attention to it summed over heads times the norm of its value (values of all
   heads concatenated), normalised to sum to one over the non-prefix tokens. The attention carries
   the same size bias as the block's (proportional attention);
 - per image, the unbiased variance of the importance decides: below ``threshold`` (tokens about
   equally important: redundant) the image is *pooled*, ToMe's bipartite soft matching on the keys
   averaged over heads with a size-weighted average (:func:`harness.seam.merge_wavg`), output
   [prefix, unmerged A, B]; otherwise it is *pruned*: the ``T - r`` most important tokens stay, in
   descending importance, with their sizes (the official sorts the class token first by giving it
   score 2);
 - both branches leave ``T - r`` tokens, so the schedule is fixed by ``r``; both are computed for
   the whole batch and each image takes its own branch with ``torch.where`` (the official splits the
   batch with ``nonzero``: the same numbers, without a host sync or a data-dependent shape);
 - sizes start at one at the first pp block and travel with the tokens; proportional attention
   (log size added to every key's logits) is on in all later blocks, as the official
   ``apply_patch(prop_attn=True)``; an average-pool head weights tokens by size (the seam does).

Other depths: the default pp blocks are the official 3, 6, 9 for 12-block models, scaled to
``depth // 4, depth // 2, 3 * depth // 4`` for other depths (EViT's drop blocks in this harness,
:func:`harness.seam.drop_blocks`: the official 3, 6, 9 are EViT's blocks, so they scale
the same way); ``pp_loc_list`` overrides them, and an entry outside the model's blocks is an error.

Deviations: every prefix token (class, distillation, registers) is kept out of the importance, its
normalisation and its variance, and is never pruned or merged (the official excludes only the class
token from the importance, so a distillation token could be pruned; with a class token alone, as in
DeiT, the two agree). Attention runs through timm's attention, fused SDPA by default (the official
computes softmax(q kᵀ) explicitly): fp32 rounding only, the golden case's logits agree to within 1e-4.

Arithmetic (as the official, so that bf16 autocast gives its numbers too): the importance's class
attention is ``(q kᵀ) scale`` in the projection's dtype, then fp32 with log size added, softmax in
fp32, summed over heads (:func:`class_attention`); the value norm is taken in the values' dtype
(bf16 under autocast) and multiplied by the fp32 attention. The official's pp block adds
``log(ones)`` when no token has a size yet, which under autocast runs that block's softmax in fp32:
here tokens carry size one from the block before the first pp block (:func:`sizes_start`; a pp
block 0 has none before it, so its attention softmax stays in the autocast dtype: bf16 rounding
only). Checked: with eager attention under CPU bf16 autocast the project's logits equal the official
code's bit for bit on this machine (``tests/fixtures/golden/deit_tiny_cifar10_bf16_golden.json``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harness import margins
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import (BlockContext, bipartite_soft_matching, chosen_blocks, clamp_r, gather_tokens,
                          install, log_size, merge_wavg)

# the official scripts' variance threshold (README / eval.sh: --threshold 7e-5, DeiT-S)
THRESHOLD = 7e-5


def importance(cls_attn: torch.Tensor, values: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Each non-prefix token's importance, normalised to sum to one: (B, N - num_prefix).

    Args:
        cls_attn: (B, N) the class token's attention row, summed over heads.
        values: (B, N, H x d) the tokens' values, heads concatenated.
        num_prefix: leading tokens left out.
    """
    # the value norm in the values' own dtype (bf16 under autocast), times the fp32 attention: the
    # official ``score_assignment_step``'s arithmetic
    score = (cls_attn.float() * torch.linalg.norm(values, ord=2, dim=-1))[:, num_prefix:]
    return score / score.sum(dim=1, keepdim=True)


def class_attention(ctx: BlockContext) -> torch.Tensor:
    """The class token's attention row summed over heads, (B, N), in the official PPTAttention's
    arithmetic: ``(q k^T) scale`` in the projection's dtype, then in fp32 with log size added (the
    official adds log(1) at a pp block before any merge, which promotes the logits to fp32 under
    autocast), softmax in fp32."""
    ctx.require_class_token("the class token's attention row")
    attn = ctx.block.attn
    b, n, _ = ctx.qkv.shape
    qk = ctx.qkv[..., : 2 * attn.num_heads * attn.head_dim].reshape(b, n, 2, attn.num_heads, attn.head_dim)
    q, k = attn.q_norm(qk[:, :1, 0].transpose(1, 2)), attn.k_norm(qk[:, :, 1].transpose(1, 2))
    logits = ((q @ k.transpose(-2, -1)) * attn.scale).float()
    bias = log_size(ctx.state)
    if bias is not None:
        logits = logits + bias[:, None, None, :]
    return logits.softmax(dim=-1).sum(dim=1)[:, 0]


def pools(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B,) True where an image is pooled: the unbiased variance of its importance is below ``threshold``."""
    variance = scores.var(dim=1)
    margins.note_threshold(variance, threshold, "ppt pool or prune")
    return variance < threshold


def most_important(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (B, keep) of the ``keep`` highest ``scores`` (B, N), in descending score order."""
    # kept in score order: a later pooling block's even / odd split reads the positions
    margins.note_order(scores, "ppt importance keep and order", to_rank=keep)
    return scores.topk(keep, dim=1, largest=True, sorted=True).indices


def prune(x: torch.Tensor, size: torch.Tensor, scores: torch.Tensor, r: int,
          num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the ``r`` least important non-prefix tokens of ``x`` (B, N, C) and their ``size`` (B, N, 1).

    Prefix tokens stay first, then the kept tokens in descending importance (``scores``,
    (B, N - num_prefix)).
    """
    kept = most_important(scores, scores.shape[1] - r) + num_prefix
    prefix = torch.arange(num_prefix, device=x.device).expand(x.shape[0], num_prefix)
    index = torch.cat([prefix, kept], dim=1)
    return gather_tokens(x, index), gather_tokens(size, index)


def prune_or_pool(x: torch.Tensor, size: Optional[torch.Tensor], metric: torch.Tensor, scores: torch.Tensor,
                  r: int, threshold: float, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PPT's step on ``x`` (B, N, C): each image pooled (ToMe merge on ``metric``) or pruned by ``scores``.

    Args:
        x: tokens.
        size: (B, N, 1) patches per token, or None for all ones.
        metric: (B, N, D) the keys averaged over heads (the pooling's similarity).
        scores: (B, N - num_prefix) the importance (:func:`importance`).
        r: tokens to remove; clamped to half the non-prefix tokens.
        threshold: the importance variance below which an image is pooled.
        num_prefix: leading tokens never removed, kept first.

    Returns:
        The tokens (B, N - r, C) and their sizes (B, N - r, 1); ``x`` and ``size`` when r clamps to 0.
    """
    r = clamp_r(r, x.shape[1], num_prefix)
    if r == 0:
        return x, size
    if size is None:
        size = torch.ones_like(x[..., :1])
    pooled, pooled_size = merge_wavg(bipartite_soft_matching(metric, r, num_prefix), x, size)
    pruned, pruned_size = prune(x, size, scores, r, num_prefix)
    pool = pools(scores, threshold)[:, None, None]
    return torch.where(pool, pooled, pruned), torch.where(pool, pooled_size, pruned_size)


def tokens_after(tokens_in: int, r: int, pp_blocks: tuple[int, ...], depth: int, num_prefix: int) -> tuple[int, ...]:
    """Tokens leaving each of ``depth`` blocks when each pp block removes ``r`` (clamped as the forward)."""
    tokens, out = tokens_in, []
    for i in range(depth):
        if i in pp_blocks:
            tokens -= clamp_r(r, tokens, num_prefix)
        out.append(tokens)
    return tuple(out)


def ppt_reducer(r: int, threshold: float) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer of one pp block."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        width = ctx.block.attn.num_heads * ctx.block.attn.head_dim
        scores = importance(class_attention(ctx), ctx.qkv[..., 2 * width:], ctx.num_prefix)
        x, ctx.state.size = prune_or_pool(x, ctx.state.size, ctx.keys(), scores, r, threshold, ctx.num_prefix)
        return x

    return reduce


def sizes_start(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """The reducer of the block before the first pp block: removes nothing; the tokens carry size
    one from here, so the pp block's attention adds log(1) = 0 as the official's ``attn_size = ones``
    does (under autocast that addition is what runs its softmax in fp32)."""
    if ctx.state.size is None:
        ctx.state.size = torch.ones_like(x[..., :1])
    return x


@register_method
class PPT(Method):
    """PPT: pool (ToMe) or prune r tokens at blocks 3, 6, 9, per image by importance variance (Wu et al., 2023)."""

    name = "ppt"
    premises = Premises(needs_class_token=True, merges=True)
    prop_attn = True
    version = "2"  # 2: the official arithmetic order (bf16 autocast gives the official logits; issue 25)
    # the official README fine-tunes DeiT-S for 30 epochs with PPT in place ("Training"); both
    # branches are differentiable in the tokens (the branch choice and the top-k are not)
    cannot_train = None
    knob = Knob("r", int, 0, 98, identity=0)

    @dataclass(frozen=True)
    class Options:
        threshold: float = THRESHOLD  # importance variance below which an image is pooled, not pruned
        pp_loc_list: Optional[tuple[int, ...]] = None  # 0-based pp blocks (default: 3, 6, 9 of 12 scaled)

    @property
    def threshold(self) -> float:
        """The importance variance below which an image is pooled rather than pruned."""
        return self.options.threshold

    def pp_blocks(self, depth: int) -> tuple[int, ...]:
        """0-based pp blocks of a model of ``depth`` blocks: the option's, or 3, 6, 9 of 12 scaled."""
        return chosen_blocks(self.options.pp_loc_list, depth, f"{self.name} pp_loc_list")

    def schedule(self, arch, value: int) -> Schedule:
        return Schedule(arch.tokens_in, tokens_after(arch.tokens_in, int(value), self.pp_blocks(arch.depth),
                                                     arch.depth, arch.num_prefix))

    def reducers(self, model, arch, value: int) -> dict:
        if int(value) <= 0:
            return {}
        pp_blocks = self.pp_blocks(arch.depth)
        reducers = {i: ppt_reducer(int(value), self.threshold) for i in pp_blocks}
        if min(pp_blocks) > 0:
            reducers[min(pp_blocks) - 1] = sizes_start
        return reducers
