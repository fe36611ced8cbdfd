"""Operations two or more methods share, so that no method imports another.

Pure tensor functions (testable with hand-made tensors and no model) and the few that keep a
reducer's :class:`~harness.seam.state.TokenState` in step with the tokens (sizes, positions):

 - keep / gather: :func:`gather_tokens`, :func:`keep_tokens` (sizes and positions follow the kept
   tokens), :func:`current_positions`, :func:`merge_positions`;
 - merging: ToMe's :func:`bipartite_soft_matching`, size-weighted :func:`merge_wavg` and
   :func:`merge_tokens` (sizes and positions follow), with :func:`clamp_r` (how many a block can merge);
 - selection: :func:`attentive_split` / :func:`top_attentive` (EViT's class-attention split), :func:`num_keep`;
 - placement: :func:`drop_blocks` (EViT's drop blocks scaled to a depth) and :func:`chosen_blocks`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from harness import margins
from harness.seam.state import TokenState

Merge = Callable[..., torch.Tensor]


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


def keep_tokens(ctx, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
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


def merge_positions(ctx, merge: Callable, x: torch.Tensor) -> None:
    """Carry ``ctx.state.positions`` through a ToMe-style ``merge`` (``merge(t, mode)``, (B, N, C) ->
    (B, N', C)) applied to the tokens ``x``: mode "prune", so a merged token keeps its DESTINATION's
    position (the token it was merged into), and an unmerged token keeps its own. Call it with the
    tokens before the merge; a no-op when the model's blocks need no positions."""
    positions = current_positions(ctx.state, x)
    if positions is not None:
        ctx.state.positions = merge(positions.unsqueeze(-1), mode="prune")[..., 0]


def clamp_r(r: int, num_tokens: int, num_prefix: int) -> int:
    """The r a block can actually merge: at most half its non-prefix tokens, never negative."""
    return max(0, min(r, (num_tokens - num_prefix) // 2))


def keep_all(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """The merge of a block that merges nothing."""
    return x


def _protect_prefix(scores: torch.Tensor, num_prefix: int) -> None:
    # Prefix tokens sit at positions 0..num_prefix-1: the even ones are A rows (they must not move),
    # the odd ones B columns (they must not receive). -inf keeps them out of every match.
    scores[:, : (num_prefix + 1) // 2, :] = -math.inf
    scores[:, :, : num_prefix // 2] = -math.inf


def _match(metric: torch.Tensor, r: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(src, unmerged, dst) of ToMe's matching: the ``r`` best-matched A rows, the other A rows, and
    each source's B partner."""
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
        return src, unmerged, partner.gather(1, src)


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 1) -> Merge:
    """Match the ``r`` most similar A tokens to B tokens; return the merge function (ToMe).

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
    src, unmerged, dst = _match(metric, r, num_prefix)

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


def merge_tokens(ctx, merge: Merge, x: torch.Tensor) -> torch.Tensor:
    """Apply a ToMe-style ``merge`` to the tokens ``x`` as a size-weighted average: sizes add up in
    ``ctx.state.size`` and positions follow (:func:`merge_positions`). Returns the merged tokens."""
    merge_positions(ctx, merge, x)
    x, ctx.state.size = merge_wavg(merge, x, ctx.state.size)
    return x


def num_keep(num_tokens: int, keep_rate: float) -> int:
    """Tokens kept out of ``num_tokens`` non-prefix tokens: ceil(keep_rate x num_tokens), as EViT."""
    return math.ceil(keep_rate * num_tokens)


def top_attentive(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split token indices by attention (EViT's selection).

    Args:
        scores: (B, N) class attention of the candidate tokens.
        keep: how many to keep.

    Returns:
        ``kept`` (B, keep) in descending score order and ``dropped`` (B, N - keep), ascending index.
    """
    kept = scores.topk(keep, dim=1, largest=True, sorted=True).indices
    margins.note_boundary(scores, keep, "class-attention keep")
    # the complement of ``kept`` (not a second sort of the scores, which could split ties
    # differently): a stable sort of the kept flags puts the unkept first, in index order, in a
    # shape known without looking at the data (``nonzero`` would sync with the host)
    is_kept = torch.zeros_like(scores, dtype=torch.uint8).scatter(1, kept, 1)
    dropped = is_kept.argsort(dim=1, stable=True)[:, : scores.shape[1] - keep]
    return kept, dropped


def attentive_split(ctx, keep_rate: float) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """EViT's split of a block's non-prefix tokens by the class token's attention (``ctx.cls_attn()``).

    Returns ``(scores, kept, dropped)``: the candidates' class attention (B, N), the
    ceil(keep_rate x N) kept (descending attention) and the dropped (ascending index), both indices
    among the candidates (add ``ctx.num_prefix`` for token indices); None when every token is kept.
    """
    scores = ctx.cls_attn()[:, ctx.num_prefix:]
    keep = num_keep(scores.shape[1], keep_rate)
    if keep >= scores.shape[1]:
        return None
    kept, dropped = top_attentive(scores, keep)
    return scores, kept, dropped


def drop_blocks(depth: int) -> tuple[int, ...]:
    """EViT's default drop locations (blocks 3, 6, 9 of 12, 0-based), scaled to ``depth``."""
    return tuple(sorted({depth // 4, depth // 2, (3 * depth) // 4}))


def chosen_blocks(loc, depth: int, what: str) -> tuple[int, ...]:
    """The 0-based blocks an option ``loc`` names (sorted, unique), or :func:`drop_blocks` when None.

    ``what`` names the option in the error (e.g. "evit drop_loc") for blocks the model lacks.
    """
    if loc is None:
        return drop_blocks(depth)
    bad = [i for i in loc if not 0 <= int(i) < depth]
    if bad:
        from harness.errors import HarnessError

        raise HarnessError(f"{what} {bad} outside blocks 0..{depth - 1}")
    return tuple(sorted({int(i) for i in loc}))


def shrinking_blocks(schedule) -> dict[int, int]:
    """Block index -> whole tokens leaving it, for each block where ``schedule``'s count drops.

    What a method that can follow any schedule (``random@tome``) installs a reducer for: counts are
    rounded (an image-dependent leader's schedule holds expected counts), blocks that keep every
    token get none and pay nothing.
    """
    out, prev = {}, round(schedule.tokens_in)
    for i, n in enumerate(schedule.tokens_out):
        if round(n) < prev:
            out[i] = round(n)
        prev = round(n)
    return out
