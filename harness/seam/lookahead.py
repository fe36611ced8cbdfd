"""Stage "pre" (MCTF's one-step-ahead attention): reduce before the block's attention, on the
attention the block would have computed, and hand the block the attention of the reduced tokens.

The seam computes the block's attention on the entering tokens (``ctx.attn_probs``, (B, H, N, N));
the reducer reduces the tokens and must hand the block the attention map of the reduced tokens
(``ctx.state.attn_probs``, (B, H, N', N'), e.g. MCTF's merged map), which the block's attention
applies to their values instead of recomputing q@k. ViT blocks (fused qkv) only.
"""
from __future__ import annotations

import torch

from harness.seam.context import BlockContext, Reducer
from harness.seam.families import split_heads
from harness.seam.state import TokenState, log_size


def one_step_ahead_probs(block: torch.nn.Module, x: torch.Tensor, state: TokenState) -> torch.Tensor:
    """The block's attention probabilities on the entering tokens ``x`` (B, N, C): (B, H, N, N).

    ``norm1``, the q and k rows of the block's qkv projection (v is left for the reduced tokens),
    q/k-norm, the scale and the size bias, in the arithmetic order of MCTF's official ``MHSA``
    (:func:`projection_rows`; the product, then the scale), which under bf16 autocast gives its
    logits bit for bit. Run by the seam, not the reducer, so it counts as the block's work (GMACs
    convention "pre").
    """
    attn = block.attn
    width = attn.num_heads * attn.head_dim
    qk = split_heads(projection_rows(attn.qkv, block.norm1(x), 0, 2 * width), 2, attn.num_heads)
    q, k = attn.q_norm(qk[0]), attn.k_norm(qk[1])
    # MCTF's order (models/SA/MHSA.py): the product, then the scale, then log size as it is (fp32
    # under autocast, so the softmax runs in fp32 once tokens carry sizes, as the official's does)
    logits = (q @ k.transpose(-2, -1)) * attn.scale
    size_bias = log_size(state)
    if size_bias is not None:
        logits = logits + size_bias[:, None, None, :]
    return logits.softmax(-1)


def projection_rows(linear: torch.nn.Linear, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Output features ``start:stop`` of ``linear(x)`` as MCTF computes them: ``x @ W.T + b`` (the
    product, then the bias in its own dtype: under autocast the bf16 product plus an fp32 bias is
    fp32, where ``F.linear`` would round the fused result to bf16)."""
    out = x @ linear.weight[start:stop].T
    return out if linear.bias is None else out + linear.bias[start:stop]


def attention_from_probs(attn: torch.nn.Module, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` on ``x`` with its softmax replaced by given ``probs`` (B, H, N, N).

    The value rows of the block's qkv projection, ``probs @ v``, then the attention's own output
    norm, gate, projection and dropout, as ``Attention.forward`` runs them after its softmax.
    """
    b, n, _ = x.shape
    width = attn.num_heads * attn.head_dim
    v = split_heads(projection_rows(attn.qkv, x, 2 * width, 3 * width), 1, attn.num_heads)[0]
    out = (attn.attn_drop(probs.to(v.dtype)) @ v).transpose(1, 2).reshape(b, n, width)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def reduce_ahead(block: torch.nn.Module, ctx: BlockContext, reducer: Reducer, x: torch.Tensor) -> torch.Tensor:
    """Run a "pre" ``reducer`` on the entering tokens ``x``; leaves the reduced tokens' attention in
    ``ctx.state.attn_probs`` for the block's attention."""
    state = ctx.state
    ctx.attn_probs = probs = one_step_ahead_probs(block, x, state)
    x = reducer(x, ctx)
    if state.attn_probs is None and x.shape[1] == probs.shape[-1]:
        state.attn_probs = probs  # nothing reduced (a wrapper, a block with no work): the block's own attention
    if state.attn_probs is None:
        raise RuntimeError("a 'pre' reducer must hand the block the attention of its reduced tokens "
                           "(ctx.state.attn_probs, (B, H, N', N'))")
    return x
