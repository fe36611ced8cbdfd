"""MCTF: Multi-Criteria Token Fusion with one-step-ahead attention, off the shelf (no training).

Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision
Transformers", CVPR 2024, arXiv 2403.10030, https://github.com/mlvlab/MCTF (``utils/mctf.py``,
``models/modules/blocks.py``, ``models/SA/MHSA.py``, ``models/deit.py``, commit
2004da0cad3231fa74cbd60b6042b0bd133aacde),
checked against it on the reference checkpoint (``fidelity/deit_tiny_cifar10_newmethods_golden.json``,
case ``mctf_r16``: timm weights, no MCTF fine-tuning).

Modifications (the official evaluation defaults, ``mctf_type [r, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0]``,
``activate_layer`` 1..depth-1):
 - in every block but the first, ``r`` tokens are fused *before* the block's attention (seam stage
   "pre"); ``r`` is clamped as the official code does: ``r = T - 10`` if ``T - r < 10``, then at most
   half the non-prefix tokens;
 - one-step-ahead attention: the block's attention ``softmax(q k^T scale + log size)`` on the
   entering tokens (computed by the seam) both scores the tokens and, merged, becomes the attention
   the block applies to the values of the fused tokens (q@k is not recomputed);
 - multi-criteria score of an A token (even position) and a B token (odd position), on the tokens
   ``x`` entering the block (the residual stream, not normalised by the block's norm):
   ``((cos(x_a, x_b) + 1) / 2)^(1/tau_sim) * (info_a info_b)^(1/tau_info) * (size'_a size'_b)^(1/tau_size)``
   with ``info = 1 / (attention received, averaged over heads and queries)`` and ``size' = 1 / size``,
   each divided by its maximum over the tokens; the size term is left out while nothing has merged;
 - bidirectional bipartite matching: the ``r // 2`` best-scored A tokens fuse into their best B
   partners, then the ``r - r // 2`` best-scored B tokens (the updated B set) fuse into their best
   partners among the unmerged A tokens, with the same scores;
 - fusion (``pooling_type=1``): a weighted average with weights ``attn_m * size / max size``
   (``attn_m`` the attention a token receives, averaged over heads and queries); sizes add up. The
   attention map is fused the same way: columns (keys) of fused tokens are summed, rows (queries)
   averaged with those weights;
 - proportional attention (log size added to the logits) with the tracked sizes, in every block;
   an average-pool head weights tokens by size (the seam does; DeiT reads the class token);
 - output order as the official: the unmerged A tokens in their order (prefix first), with the B
   tokens fused into them, then the kept B tokens in decreasing order of their best score.

Deviations:
 - prefix tokens: the official protects ``num_protected`` A *rows* (the class token; with a
   distillation token it would protect tokens 0 and 2, not 0 and 1). We protect every prefix token:
   prefix A rows and prefix B columns get ``-inf``, prefix B tokens are kept out of the second
   direction's ranking, and prefix tokens are moved back to the front in their order. Identical to
   the official whenever ``num_prefix == 1`` (DeiT, ViT with a class token) and without prefix tokens;
 - ``r`` never goes below 0 (the official would produce a negative ``r`` below 10 tokens);
 - only the off-the-shelf inference step: no training, teacher/student or token-source tracing;
   the ablations (``pooling_type`` 0/2/3, one-way matching, one-step-ahead off or "precise") are not
   exposed. ``tau_sim``, ``tau_info`` and ``tau_size`` are options (0 turns a criterion off, as in
   the official code);
 - q/k-norm are kept (Identity in DeiT; the official has none).

Arithmetic (the seam's one-step-ahead attention, :func:`harness.seam.one_step_ahead_probs`, follows
the official ``MHSA``): the q/k and v rows of the qkv projection as ``x @ W.T + b`` (under autocast
the bf16 product plus the fp32 bias is fp32), ``(q k^T) scale`` (the product, then the scale), log
size added as it is (fp32: the softmax runs in fp32 once tokens carry sizes). Checked: fp32 golden
case ``mctf_r16`` and the project's bf16 case (CPU bf16 autocast, eager attention,
``tests/fixtures/golden/deit_tiny_cifar10_bf16_golden.json``, made by running the official code)
equal the official logits bit for bit on this machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from harness import margins
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext

Merge = Callable[..., torch.Tensor]

# r at which a 224 px /16 model (197 tokens) fuses half its tokens in the first active block; the
# forward clamps larger r to half the tokens anyway
R_MAX = 98
MIN_TOKENS = 10  # the official clamp: a block leaves at least 10 tokens (unless fewer entered)
DEFAULT_TAUS = {"tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0}


def tokens_removed(r: int, tokens: int, num_prefix: int) -> int:
    """Tokens an active block with ``tokens`` entering fuses away at knob ``r`` (the official clamp)."""
    if tokens - r < MIN_TOKENS:
        r = tokens - MIN_TOKENS
    return max(0, min(r, (tokens - num_prefix) // 2))


def multi_criteria_scores(metric: torch.Tensor, attn: Optional[torch.Tensor], size: Optional[torch.Tensor],
                          num_prefix: int, tau_sim: float, tau_info: float, tau_size: float) -> torch.Tensor:
    """MCTF's score of every A token (even position) against every B token (odd position).

    Args:
        metric: (B, T, C) the tokens compared by cosine similarity.
        attn: (B, H, T, T) attention probabilities (informativeness), or None to leave it out.
        size: (B, T, 1) patches per token, or None (nothing merged yet: the size term is left out).
        num_prefix: leading tokens that never move nor receive: their A rows and B columns are -inf.
        tau_sim, tau_info, tau_size: temperatures; 0 leaves a criterion out.

    Returns:
        (B, ceil(T/2), floor(T/2)) scores in [0, 1], -inf where a prefix token is involved.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    if tau_sim:
        scores = ((a @ b.transpose(-1, -2) + 1) / 2) ** (1 / tau_sim)
    else:
        scores = torch.ones(a.shape[0], a.shape[1], b.shape[1], device=a.device, dtype=a.dtype)
    if tau_info > 0 and attn is not None:
        info = 1 / attn.mean(dim=[1, 2])  # rarely attended: informative, merged last
        info = info / info.max(1, keepdim=True)[0]
        scores = scores * (info[..., ::2, None] * info[..., None, 1::2]) ** (1 / tau_info)
    if tau_size and size is not None:
        small = 1 / size  # large tokens merge last
        small = small / small.max(1, keepdim=True)[0]
        scores = scores * (small[..., ::2, :] * small[..., 1::2, :].transpose(1, 2)) ** (1 / tau_size)
    scores[:, : (num_prefix + 1) // 2, :] = -math.inf
    scores[:, :, : num_prefix // 2] = -math.inf
    return scores


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, k) of ``x`` (B, ..., T, C) along dim -2: (B, ..., k, C)."""
    return x.gather(-2, _expand(index, x))


def _expand(index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``index`` (B, k) shaped to gather or scatter rows of ``x`` (B, ..., T, C) along dim -2."""
    view = index.view(index.shape[0], *([1] * (x.dim() - 3)), index.shape[1], 1)
    return view.expand(*x.shape[:-2], index.shape[1], x.shape[-1])


def bidirectional_matching(scores: torch.Tensor, r: int, num_prefix: int = 1) -> Merge:
    """MCTF's two-way bipartite matching on ``scores`` (B, Na, Nb); returns the merge function.

    First ``r // 2`` A tokens (the best-scored) fuse into their best B partners; then the
    ``r - r // 2`` best-scored B tokens of the updated B set fuse into their best partners among
    the A tokens left, by the same scores.

    Args:
        scores: (B, Na, Nb) from :func:`multi_criteria_scores` (prefix rows and columns -inf).
        r: tokens to remove (already clamped: :func:`tokens_removed`).
        num_prefix: leading tokens that never move nor receive, and stay first in their order.

    Returns:
        ``merge(x, mode="sum")`` mapping (B, ..., T, C) to (B, ..., T - r, C) along dim -2: prefix
        tokens first in their order, then the unmerged A tokens (with their B partners reduced in by
        ``mode``, any ``scatter_reduce`` mode), then the kept B tokens ranked by their best score.
    """
    num_a, num_b = scores.shape[1], scores.shape[2]
    r1, r2 = r // 2, r - r // 2
    prefix_b = num_prefix // 2
    with torch.no_grad():
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src, unm = order[:, :r1], order[:, r1:]
        margins.note_boundary(best, r1, "mctf A->B merge rank")
        margins.note_best(scores, src, "mctf A->B partner")
        if num_prefix:
            unm = unm.sort(dim=-1).values  # prefix A tokens first, the others in their order
        dst = partner.gather(1, src)
        # the second direction: B rows against the A tokens left, prefix B rows never move
        scores2 = scores.gather(1, unm[..., None].expand(-1, -1, num_b)).transpose(1, 2)
        best2, partner2 = scores2[:, prefix_b:].max(dim=-1)
        order2 = best2.sort(dim=-1, descending=True).indices + prefix_b
        src2, kept_b = order2[:, :r2], order2[:, r2:]
        # the kept B tokens are written out in this order: the next block's even / odd split reads it
        margins.note_order(best2, "mctf B->A rank and B order", from_rank=r2)
        margins.note_best(scores2, src2, "mctf B->A partner")
        dst2 = partner2.gather(1, src2 - prefix_b)
        if prefix_b:
            fixed = torch.arange(prefix_b, device=scores.device).expand(kept_b.shape[0], -1)
            kept_b = torch.cat([fixed, kept_b], 1)

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        a, b = x[..., ::2, :], x[..., 1::2, :]
        b = b.scatter_reduce(-2, _expand(dst, b), _take(a, src), reduce=mode)
        a = _take(a, unm)
        a = a.scatter_reduce(-2, _expand(dst2, a), _take(b, src2), reduce=mode)
        out = torch.cat([a, _take(b, kept_b)], -2)
        return _prefix_first(out, num_prefix, num_a - r1) if prefix_b else out

    return merge


def _prefix_first(out: torch.Tensor, num_prefix: int, num_a: int) -> torch.Tensor:
    """``out`` (..., T', C), the ``num_a`` A tokens then the B tokens, each set led by its prefix
    tokens, with all prefix tokens moved to the front in their original order (A: 0, 2, ..; B: 1, 3, ..)."""
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2
    starts = [j // 2 if j % 2 == 0 else num_a + j // 2 for j in range(num_prefix)]
    rows = [out[..., i: i + 1, :] for i in starts]
    return torch.cat(rows + [out[..., prefix_a:num_a, :], out[..., num_a + prefix_b:, :]], -2)


def merge_with_attention(merge: Merge, x: torch.Tensor, attn: torch.Tensor, size: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fuse tokens and their attention map by attention-and-size weighted average (``pooling_type=1``).

    Args:
        merge: a function from :func:`bidirectional_matching`.
        x: (B, T, C) tokens.
        attn: (B, H, T, T) the block's attention on them.
        size: (B, T, 1) patches per token, or None for all ones.

    Returns:
        Fused tokens (B, T', C), their sizes (B, T', 1) and their attention (B, H, T', T'): keys of a
        fused token summed, queries averaged with the tokens' weights.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    relative = size / size.amax(dim=-2, keepdim=True)
    with torch.no_grad():
        attn_m = attn.mean(dim=[1, 2]).unsqueeze(-1)  # (B, T, 1) attention each token receives
        norm = merge(attn_m * relative)
    attn = merge(attn[..., None]).squeeze(-1)  # keys: a fused token receives the sum
    attn = merge(attn * attn_m[:, None] * relative[:, None]) / norm[:, None]  # queries: weighted average
    x = merge(x * attn_m * relative) / norm
    with torch.no_grad():
        size = merge(size)
    return x, size, attn


def mctf_reducer(r: int, tau_sim: float, tau_info: float,
                 tau_size: float) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer (stage "pre") of one active block: fuse ``r`` tokens and their attention."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        attn = ctx.attn_probs
        n = tokens_removed(r, x.shape[1], ctx.num_prefix)
        if n == 0:
            ctx.state.attn_probs = attn  # nothing fused: the block attends as it would
            return x
        with torch.no_grad():
            scores = multi_criteria_scores(x, attn, ctx.state.size, ctx.num_prefix, tau_sim, tau_info, tau_size)
        merge = bidirectional_matching(scores, n, ctx.num_prefix)
        x, ctx.state.size, ctx.state.attn_probs = merge_with_attention(merge, x, attn, ctx.state.size)
        return x

    return reduce


@register_method
class MCTF(Method):
    """MCTF: fuse r tokens per block by similarity, informativeness and size, one step ahead (Lee et al., CVPR 2024)."""

    name = "mctf"
    version = "2"  # 2: the official arithmetic order (bf16 autocast gives the official logits; issue 25)
    cannot_train = ("the paper fine-tunes with its token-reduction consistency (arXiv 2403.10030, Sec. 3.4; the "
                    "official 30-epoch 'Finetuning': a second pass of the same weights at a random smaller r, its "
                    "loss added, and the squared distance of the two passes' class tokens, weight 3, for images "
                    "classified with confidence > 0.4), which is not implemented here: only the inference step")
    knob = Knob("r", int, 0, R_MAX, identity=0)
    premises = Premises(merges=True)
    prop_attn = True
    stage = "pre"

    @dataclass(frozen=True)
    class Options:
        tau_sim: float = DEFAULT_TAUS["tau_sim"]  # temperature of the similarity term
        tau_info: float = DEFAULT_TAUS["tau_info"]  # of the informativeness term
        tau_size: float = DEFAULT_TAUS["tau_size"]  # of the size term

    @staticmethod
    def active(block: int) -> bool:
        """Blocks that fuse: all but the first (the official ``activate_layer`` 1..depth-1)."""
        return block > 0

    def schedule(self, arch, value: int) -> Schedule:
        if not value:
            return Schedule.full(arch)  # nothing fused: the unpatched model, whatever the stage
        tokens, out = arch.tokens_in, []
        for i in range(arch.depth):
            if self.active(i):
                tokens -= tokens_removed(int(value), tokens, arch.num_prefix)
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out), stage=self.stage)

    def reducers(self, model, arch, value: int) -> dict:
        taus = self.resolved_options()
        return {} if not value else {i: mctf_reducer(int(value), **taus) for i in range(arch.depth) if self.active(i)}
