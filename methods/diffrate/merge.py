"""DiffRate's inference step: sort by class attention, prune, merge into the most similar kept token.

Pure tensor functions (hand-testable, no model) and the seam reducer that applies them at fixed kept
counts; the official code's ``DiffRate/patch/deit.py`` and ``DiffRate/merge.py``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from harness import margins
from harness.seam import BlockContext, gather_tokens


def tokens_after(tokens_in: int, prune: Sequence[int], merge: Sequence[int]) -> tuple[int, ...]:
    """Tokens leaving each block: ``min(entering, prune[i], merge[i])``."""
    tokens, out = tokens_in, []
    for p, m in zip(prune, merge):
        tokens = min(tokens, int(p), int(m))
        out.append(tokens)
    return tuple(out)



def attentive_order(cls_attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Token order (B, N): prefix tokens first, then the rest by descending class attention."""
    order = cls_attn[:, num_prefix:].argsort(dim=1, descending=True, stable=True) + num_prefix
    prefix = torch.arange(num_prefix, device=order.device).expand(order.shape[0], -1)
    return torch.cat([prefix, order], 1)


def match_similar(metric: torch.Tensor, kept: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token from ``kept`` on, its most similar token before ``kept`` (cosine).

    Args:
        metric: (B, N, C) features of the sorted tokens.
        kept: tokens that stay; those after it are merged away.
        num_prefix: leading tokens that never receive a merge.

    Returns:
        ``dst`` (B, N - kept) the receiving index and ``sim`` (B, N - kept) the similarity.
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, kept:] @ metric[:, :kept].transpose(1, 2)
        scores[..., :num_prefix] = -math.inf
        sim, dst = scores.max(dim=-1)
        margins.note_best(scores, None, "diffrate merge partner")
    return dst, sim


def merge_mean(x: torch.Tensor, kept: int, dst: torch.Tensor) -> torch.Tensor:
    """The first ``kept`` tokens, each averaged (unweighted) with the tokens merged into it."""
    src = x[:, kept:]
    index = dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return x[:, :kept].scatter_reduce(1, index, src, reduce="mean", include_self=True)


def merge_size(size: torch.Tensor, kept: int, dst: torch.Tensor, sim: torch.Tensor,
               floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sizes after merging: each kept token adds its sources' sizes times their similarity.

    Args:
        size: (B, N, 1) sizes of the sorted tokens.
        floor: the least a source adds (0 at inference; the official search clamps at 1).

    Returns:
        The kept tokens' new sizes (B, kept, 1) and the sources' scaled sizes (B, N - kept, 1).
    """
    src = (size[:, kept:] * sim.unsqueeze(-1).to(size.dtype)).clamp(min=floor)
    head = size[:, :kept].clamp(min=floor) if floor > 0 else size[:, :kept]
    return head.scatter_reduce(1, dst.unsqueeze(-1), src, reduce="sum"), src


def prune_and_merge(x: torch.Tensor, size: Optional[torch.Tensor], cls_attn: torch.Tensor, prune: int,
                    merge: int, num_prefix: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """DiffRate's inference step on (B, N, C) tokens: sort, keep ``prune``, merge down to ``merge``.

    ``size`` None means every token is one patch; it stays None until something merges.
    """
    order = attentive_order(cls_attn, num_prefix)
    keep = min(x.shape[1], prune)
    margins.note_boundary(cls_attn[:, num_prefix:], keep - num_prefix, "diffrate prune rank")
    margins.note_boundary(cls_attn[:, num_prefix:], min(keep, merge) - num_prefix, "diffrate merge rank")
    x = gather_tokens(x, order)[:, :keep]
    size = None if size is None else gather_tokens(size, order)[:, :keep]
    if merge < keep:
        dst, sim = match_similar(x, merge, num_prefix)
        size = size if size is not None else torch.ones_like(x[..., :1])
        x = merge_mean(x, merge, dst)
        size, _ = merge_size(size, merge, dst, sim)
    return x, size


def diffrate_reducer(prune: int, merge: int) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer of one block at fixed kept counts."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        x, ctx.state.size = prune_and_merge(x, ctx.state.size, ctx.cls_attn(), prune, merge, ctx.num_prefix)
        return x

    return reduce
