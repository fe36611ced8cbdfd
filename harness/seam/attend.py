"""One attention for every block family: ``attend(q, k, v, bias, impl)``.

softmax(q kᵀ scale + mask + bias) v, where ``mask`` is a family's additive position term (BEiT's /
relpos's relative-position bias, a caller's ``attn_mask``) and ``bias`` (B, N) is log(token size),
added to every key's logits (proportional attention). The bias reaches the kernel one of three ways
(``impl``, :data:`~harness.seam.state.PROP_ATTN_IMPLS`):

 - ``"mask"`` (the reference): an additive float mask to SDPA. Exact and simple, but a float mask
   rules out the flash kernel.
 - ``"fold"``: log size folded into one extra head dimension (:func:`fold_attention`), so SDPA runs
   with no mask and flash-class kernels stay eligible; costs a head dim padded to a multiple of 8.
 - ``"flex"``: FlexAttention with a ``score_mod`` adding log size (:func:`flex_attention_bias`).

A position mask, ``is_causal`` or timm's eager attention (``fused_attn=False``) always take the mask
path; the kernel follows the block's ``attn.fused_attn`` as timm's own forward picks it.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from harness.seam.state import check_impl


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


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, is_causal: bool = False) -> torch.Tensor:
    """timm's eager attention probabilities of (B, H, N, d) ``q``, ``k``: softmax(q scale kᵀ + mask), (B, H, N, N).

    ``mask`` is additive (broadcast to (B, H, N, N)); ``is_causal`` hides later keys.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if is_causal:
        hidden = torch.ones(logits.shape[-2:], dtype=torch.bool, device=q.device).triu(1)  # SDPA's top-left causal
        logits = logits.masked_fill(hidden, float("-inf"))
    if mask is not None:
        logits = logits + mask
    return logits.softmax(dim=-1)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, is_causal: bool = False,
                    dropout: Callable[[torch.Tensor], torch.Tensor] = lambda p: p) -> torch.Tensor:
    """timm's eager attention of (B, H, N, d) ``q``, ``k``, ``v``: softmax(q scale kᵀ + mask) v.

    ``mask`` is additive (broadcast to (B, H, N, N)); ``is_causal`` hides later keys; ``dropout``
    acts on the probabilities. Equal to ``scaled_dot_product_attention`` to float rounding.
    """
    return dropout(attention_probs(q, k, mask, scale, is_causal)) @ v


def _with_bias(q: torch.Tensor, bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], fused: bool,
               bias_dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """``mask`` plus log size ``bias`` (B, N) as one additive mask, in the dtype the kernel wants."""
    if bias is not None:
        # SDPA wants the mask in the query's dtype; timm's eager product takes log size as it is (fp32
        # under autocast, so its softmax runs in fp32, as the official ToMe-family code's ``attn + size.log()``)
        bias = (bias.to(bias_dtype or q.dtype) if fused else bias)[:, None, None, :]
        mask = bias if mask is None else mask + bias
    if mask is not None and (fused or bias is None):
        mask = mask.to(q.dtype)
    return mask


def attend_explicitly(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                      attn: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's eager attention (:func:`attend` with ``fused_attn=False``) and the probabilities it formed.

    Returns the output (B, H, N, d) and the probabilities (B, H, N, N), before dropout: a block
    whose reducer reads the map forms it once, here, not in a fused kernel and again for the reducer.
    """
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    probs = attention_probs(q, k, _with_bias(q, bias, mask, False, None), scale, is_causal)
    dropout = attn.attn_drop if attn is not None else (lambda p: p)
    return dropout(probs) @ v, probs


def policy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, policy: torch.Tensor,
                     mask: Optional[torch.Tensor] = None, attn: Optional[torch.nn.Module] = None,
                     eps: float = 1e-6) -> torch.Tensor:
    """Attention whose keys are weighted by a keep ``policy`` (B, N, 1) in [0, 1], every token still
    attending to itself: DynamicViT's ``softmax_with_policy`` (its training, tokens masked, not dropped).

    p_ij = (exp(l_ij - max_j l_ij) w_ij + eps / N) / (sum_j exp(l_ij - max_j l_ij) w_ij + eps), with
    w_ij = policy_j, or 1 where i == j, in fp32; ``mask`` is added to the logits first (a position
    term). Multiplying the probabilities (not adding log policy to the logits) keeps the gradient
    that reaches the policy finite where it is 0, as the official straight-through masks need.
    """
    n = policy.shape[1]
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        logits = logits + mask
    weights = policy.reshape(-1, 1, 1, n)
    eye = torch.eye(n, dtype=weights.dtype, device=weights.device).view(1, 1, n, n)
    weights = weights + (1.0 - weights) * eye
    logits = logits - logits.amax(dim=-1, keepdim=True)
    probs = logits.float().exp() * weights.float()
    probs = ((probs + eps / n) / (probs.sum(dim=-1, keepdim=True) + eps)).to(v.dtype)
    dropout = attn.attn_drop if attn is not None else (lambda p: p)
    return dropout(probs) @ v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
           impl: str = "mask", mask: Optional[torch.Tensor] = None, is_causal: bool = False,
           attn: Optional[torch.nn.Module] = None, bias_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """softmax(q kᵀ scale + mask + bias) v of (B, H, N, d) ``q``, ``k``, ``v``, as block attention ``attn`` runs it.

    Args:
        bias: (B, N) log token size added to every key's logits, or None.
        impl: how ``bias`` reaches the kernel ("mask", "fold", "flex"; module docstring).
        mask: an additive (1 or B, H, N, N) position term or caller's mask, or None.
        is_causal: hide later keys.
        attn: the timm attention module whose kernel choice (``fused_attn``), scale and dropout
            apply; None for SDPA without dropout.
        bias_dtype: the dtype ``bias`` joins the mask in (:func:`~harness.seam.state.attention_dtype`);
            q's by default.
    """
    fused = getattr(attn, "fused_attn", True)
    dropout_p = attn.attn_drop.p if attn is not None and attn.training else 0.0
    if bias is not None and impl != "mask" and mask is None and not is_causal and fused:
        return PROP_ATTN_KERNELS[impl](q, k, v, bias, attn_mask=None, dropout_p=dropout_p, is_causal=False)
    mask = _with_bias(q, bias, mask, fused, bias_dtype)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    scale = getattr(attn, "scale", q.shape[-1] ** -0.5)
    return eager_attention(q, k, v, mask, scale, is_causal, attn.attn_drop)


__all__ = ["PROP_ATTN_KERNELS", "attend", "attend_explicitly", "attention_probs", "check_impl", "eager_attention",
           "flex_attention_bias", "fold_attention", "policy_attention"]
