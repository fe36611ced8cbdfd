"""ToMe: Token Merging.

Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, arXiv 2210.09461,
https://github.com/facebookresearch/ToMe (``tome/merge.py``, ``tome/patch/timm.py``, ``tome/utils.py``).

Modifications:
 - between attention and MLP of every block, merges ``r`` tokens by bipartite soft matching:
   tokens alternate into sets A (even positions) and B (odd positions), each A token finds its most
   similar B token by cosine similarity of the keys averaged over heads, and the ``r`` best-matched
   A tokens are averaged into their partners;
 - merging is a size-weighted average; sizes (patches per token) start at one and travel with the
   model's TokenState from block to block;
 - proportional attention (log size added to the attention logits) is on by default, as in the
   official timm patch; option ``prop_attn=false`` turns it off (the official MAE patch does);
 - average-pooling heads weight each token by its size (the seam does this, as the official MAE patch);
 - prefix tokens (class, distillation, registers) are never merged: the official code protects the
   class token (A row set to -inf) and the distillation token (B column set to -inf); we protect
   every token before ``num_prefix`` the same way and keep prefix tokens first, in their order;
 - ``r`` is clamped each block to half the non-prefix tokens, since every merged A token needs a B
   partner: the schedule applies the same clamp, so it reports exactly what the forward does;
 - on models whose blocks need token positions (EVA / rope, BEiT, relpos) a merged token keeps its
   destination's (B token's) position: its rotary embedding / relative-position bias is the
   destination's (the official code has no such models; the destination is the token that stays);
 - schedules: constant ``r`` (default), ``inflection`` in [-1, 1] (the official ``parse_r`` pair
   ``(r, inflection)``; -1 is the paper's "decreasing" schedule), or an explicit per-block ``r_list``
   (padded with zeros, as ``parse_r``), which replaces the knob whenever the knob is not 0.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from harness.errors import HarnessError
from harness import margins
from harness.registry import Knob, Method, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, install, merge_positions

Merge = Callable[..., torch.Tensor]

# r at which a 224 px /16 model (197 tokens) merges half its tokens in the first block; the forward
# clamps larger r to half the tokens anyway.
R_MAX = 98


def parse_r(depth: int, r: int, inflection: float = 0.0) -> list[int]:
    """Per-block r for a constant (inflection 0) or linearly trending schedule.

    Same arithmetic as the official ``parse_r((r, inflection))``: r per block runs linearly from
    ``int(r * (1 - inflection))`` to its mirror around r, each value truncated to an int.
    """
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (depth - 1) if depth > 1 else 0.0
    return [int(low + step * i) for i in range(depth)]


def clamp_r(r: int, num_tokens: int, num_prefix: int) -> int:
    """The r a block can actually merge: at most half its non-prefix tokens, never negative."""
    return max(0, min(r, (num_tokens - num_prefix) // 2))


def tokens_after(tokens_in: int, rs: list[int], num_prefix: int) -> tuple[int, ...]:
    """Tokens leaving each block when block i merges ``rs[i]`` tokens (clamped as in the forward)."""
    tokens, out = tokens_in, []
    for r in rs:
        tokens -= clamp_r(r, tokens, num_prefix)
        out.append(tokens)
    return tuple(out)


def keep_all(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """The merge of a block that merges nothing."""
    return x


def _protect_prefix(scores: torch.Tensor, num_prefix: int) -> None:
    # Prefix tokens sit at positions 0..num_prefix-1: the even ones are A rows (they must not move),
    # the odd ones B columns (they must not receive). -inf keeps them out of every match.
    scores[:, : (num_prefix + 1) // 2, :] = -math.inf
    scores[:, :, : num_prefix // 2] = -math.inf


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 1) -> Merge:
    """Match the ``r`` most similar A tokens to B tokens; return the merge function.

    Args:
        metric: (B, N, D) per-token features to compare (ToMe: keys averaged over heads).
        r: tokens to remove; clamped to half the non-prefix tokens.
        num_prefix: leading tokens that are never merged and stay first.

    Returns:
        ``merge(x, mode="sum")`` mapping (B, N, C) to (B, N - r, C): prefix tokens, then the
        unmerged A tokens, then the B tokens with their A partners reduced in by ``mode``: any
        ``scatter_reduce`` mode, ``"prune"`` (the matched A tokens dropped, B unchanged), or a
        function ``(b, index, moved) -> b`` (``index``: each moved token's B row, expanded to C).
    """
    r = clamp_r(r, metric.shape[1], num_prefix)
    if r == 0:
        return keep_all
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)
        _protect_prefix(scores, num_prefix)
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src, unmerged = order[:, :r], order[:, r:]
        margins.note_boundary(best, r, "bipartite merge rank")
        if not num_prefix:  # the unmerged stay in score order: the next block's A / B split reads it
            margins.note_order(best, "bipartite unmerged order", from_rank=r)
        margins.note_best(scores, src, "bipartite partner")
        if num_prefix:
            # the official code sorts so the class token comes back first; that also keeps the
            # unmerged tokens in their original order, which the next block's A/B split sees
            unmerged = unmerged.sort(dim=-1).values
        dst = partner.gather(1, src)

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        a, b = x[:, ::2], x[:, 1::2]
        c = x.shape[-1]
        kept = a.gather(1, unmerged.unsqueeze(-1).expand(-1, -1, c))
        moved = a.gather(1, src.unsqueeze(-1).expand(-1, -1, c))
        index = dst.unsqueeze(-1).expand(-1, -1, c)
        if callable(mode):
            b = mode(b, index, moved)
        elif mode != "prune":
            b = b.scatter_reduce(1, index, moved, reduce=mode)
        # A's prefix tokens are the first of ``kept`` (sorted), B's the first of ``b`` (untouched)
        return torch.cat([x[:, :num_prefix], kept[:, (num_prefix + 1) // 2:], b[:, num_prefix // 2:]], 1)

    return merge


def merge_wavg(merge: Merge, x: torch.Tensor, size: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Merge ``x`` as a size-weighted average and add up the sizes.

    Args:
        merge: a function from :func:`bipartite_soft_matching`.
        x: (B, N, C) tokens.
        size: (B, N, 1) patches per token, or None for all ones.

    Returns:
        The merged tokens (B, N - r, C) and their sizes (B, N - r, 1); unchanged when nothing merges.
    """
    if merge is keep_all:
        return x, size
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_reducer(r: int) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer that merges ``r`` tokens by the keys' similarity and carries sizes."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        merge = bipartite_soft_matching(ctx.keys(), r, ctx.num_prefix)
        merge_positions(ctx, merge, x)
        x, ctx.state.size = merge_wavg(merge, x, ctx.state.size)
        return x

    return reduce


@register_method
class ToMe(Method):
    """ToMe: merge r similar tokens per block by bipartite soft matching (Bolya et al., ICLR 2023)."""

    name = "tome"
    merges = True
    tracks_positions = True
    version = "1"
    knob = Knob("r", int, 0, R_MAX, identity=0)
    # the paper trains with merging in place (Sec. 4, "with training"): gradients flow through the
    # size-weighted merge, the matching itself is not differentiated (no_grad, as the official code)
    cannot_train = None

    option_defaults = {"prop_attn": True, "inflection": 0.0, "r_list": None}
    implicit_defaults = {"prop_attn": True, "inflection": 0.0, "r_list": None}  # ids stored before defaults were filled

    def layer_r(self, depth: int, r: int) -> list[int]:
        """r for each of ``depth`` blocks at knob value ``r`` under this method's schedule options."""
        r_list = self.options["r_list"]
        inflection = float(self.options["inflection"])
        if r_list is not None and len(r_list) > depth:
            raise HarnessError(f"tome r_list has {len(r_list)} entries, the model {depth} blocks")
        if not -1.0 <= inflection <= 1.0:
            raise HarnessError(f"tome inflection={inflection} out of range [-1, 1]")
        if r == 0:
            return [0] * depth
        if r_list is not None:
            return [int(v) for v in r_list] + [0] * (depth - len(r_list))
        return parse_r(depth, int(r), inflection)

    def schedule(self, arch, value: int) -> Schedule:
        rs = self.layer_r(arch.depth, value)
        return Schedule(arch.tokens_in, tokens_after(arch.tokens_in, rs, arch.num_prefix))

    def patch(self, model, value: int, arch) -> None:
        rs = self.layer_r(len(model.blocks), value)
        reducers = {i: tome_reducer(r) for i, r in enumerate(rs) if r > 0}
        install(model, reducers, prop_attn=bool(self.options["prop_attn"]), merges=self.merges, method=self.name,
                tracks_positions=self.tracks_positions)
