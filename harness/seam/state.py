"""What a patched model carries from block to block, and the names the seam's choices take."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from harness.sweep.config import PROP_ATTN as PROP_ATTN_IMPLS  # defined where a config loads without torch
from harness.schedule import STAGES  # where in a block a method's reducer runs: "pre", "mid", "post"

__all__ = ["PROP_ATTN_IMPLS", "STAGES", "TokenState", "attention_bias", "attention_dtype", "check_impl", "log_size"]


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
        policy: (B, N, 1) keep weights in [0, 1] of the current tokens, or None: a method that masks
            tokens instead of dropping them (DynamicViT while it trains, static shapes) sets it, and
            every later block's attention ignores the keys it weights 0
            (:func:`~harness.seam.attend.policy_attention`).
        attention_map: the method's reducers read the block's attention map (``ctx.attention()``)
            in every block: reducing blocks form it explicitly, once (:func:`~harness.seam.forward.forms_map`).
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
    policy: Optional[torch.Tensor] = None
    attention_map: bool = False

    def reset(self) -> None:
        self.size = None
        self.observed = []
        self.attn_probs = None
        self.positions = None
        self.policy = None

    @property
    def reduced(self) -> bool:
        """Whether a block of this forward already changed the tokens (they carry sizes, positions or a
        keep policy)."""
        return self.size is not None or self.positions is not None or self.policy is not None


def check_impl(impl: str) -> None:
    """Refuse a proportional-attention implementation the seam does not know."""
    if impl not in PROP_ATTN_IMPLS:
        raise ValueError(f"unknown prop_attn_impl {impl!r}; choices: {', '.join(PROP_ATTN_IMPLS)}")


def log_size(state: TokenState) -> Optional[torch.Tensor]:
    """log(size) per token (B, N), or None when proportional attention is off or nothing merged."""
    if not state.prop_attn or state.size is None:
        return None
    return state.size.log()[..., 0]


def attention_bias(state: TokenState, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """log(size) as a (B, 1, 1, N) additive mask, or None when nothing was merged."""
    bias = log_size(state)
    return None if bias is None else bias.to(dtype)[:, None, None, :]


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in for residual stream ``x``: under autocast q/k are in the autocast
    dtype while ``x`` stays fp32, and SDPA wants a float mask in the query's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
