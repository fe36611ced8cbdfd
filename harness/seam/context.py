"""What a reducer sees of its block: :class:`BlockContext`, with the block's attention on demand."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from harness.errors import UnsupportedModel
from harness.seam.families import split_heads
from harness.seam.state import TokenState, attention_bias


@dataclass
class BlockContext:
    """What a reducer sees of the block that just ran its attention (or, stage "pre", is about to).

    Attributes:
        index: the block's index in ``model.blocks``.
        num_prefix: prefix tokens (class, registers, distillation), first in every token sequence.
        state: the model's :class:`TokenState` (sizes, positions), which reducers keep in step.
        block: the timm block.
        captured_qkv: the block's fused qkv projection output (B, N, 3 x H x d), where it has one.
        attn_probs: the block's attention probabilities (B, H, N, N) where the seam formed them:
            stage "pre", on the entering tokens; a block whose attention ran explicitly (timm's
            eager attention, or a method that declared ``attention_map``), its own map.
        q, k: the block's queries and keys (B, H, N, d), after q/k-norm and rotary embedding.
        position_bias: the relative-position bias the block's attention added, (1 or B, H, N, N).
        block_input: the tokens that entered the block (B, N, C), before any reduction of this block:
            what a reducer needs to score a token by how much the block changed it, ||x_out - x_in||.
        mlp_input: stage "post": the tokens entering the MLP's residual branch (B, N, C), after
            the attention's residual: ||x_out - mlp_input|| is the shift of the MLP alone.
        v: the block's values (B, H, N, d).

    The block's attention is derived only when a reducer asks (``cls_attn()``, ``attention()``,
    ``keys()``), once per block: blocks that do not ask pay nothing.
    """

    index: int
    num_prefix: int
    state: TokenState
    block: torch.nn.Module
    captured_qkv: Optional[torch.Tensor]
    attn_probs: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None
    k: Optional[torch.Tensor] = None
    position_bias: Optional[torch.Tensor] = None
    block_input: Optional[torch.Tensor] = None
    mlp_input: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

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

    def _once(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = compute()
        return self._cache[name]

    def _split_qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.q is not None:
            return self.q, self.k
        if self.captured_qkv is None:
            raise RuntimeError("this block did not capture its qkv projection")
        attn = self.block.attn
        qkv = split_heads(self.qkv, 3, attn.num_heads)
        return attn.q_norm(qkv[0]), attn.k_norm(qkv[1])

    def keys(self) -> torch.Tensor:
        """Keys averaged over heads, (B, N, head_dim): ToMe's similarity metric."""
        return self._once("keys", lambda: self._split_qk()[1].mean(1))

    def values(self) -> torch.Tensor:
        """The block's values, heads side by side: (B, N, H x head_dim)."""
        if self.captured_qkv is not None:  # a view of the fused projection: no copy
            attn = self.block.attn
            return self.captured_qkv[..., 2 * attn.num_heads * attn.head_dim:]
        return self.v.transpose(1, 2).flatten(2)

    def _logits(self, rows: slice) -> torch.Tensor:
        """The block's attention logits of query ``rows``, with its position and size biases."""
        q, k = self._split_qk()
        logits = (q[:, :, rows] * self.block.attn.scale) @ k.transpose(-2, -1)
        if self.position_bias is not None:
            logits = logits + self.position_bias[:, :, rows].to(logits.dtype)
        bias = attention_bias(self.state, logits.dtype)
        return logits if bias is None else logits + bias

    def attention(self) -> torch.Tensor:
        """The block's attention probabilities per head: (B, H, N, N), float32.

        softmax(q kᵀ scale + position bias + log size), as the block's attention computed them.
        Where the seam formed the map (``attn_probs``: stage "pre", eager attention, a method that
        declared ``attention_map``) it is that very map, in the dtype its softmax ran in; else it is
        computed here, once, from the block's q and k (a fused kernel never forms it).
        """
        if self.attn_probs is not None:
            return self.attn_probs
        return self._once("attention", lambda: self._logits(slice(None)).float().softmax(-1))

    def require_class_token(self, reading: str) -> None:
        """Refuse the cell (:class:`UnsupportedModel`) where the model has no class token: a reducer
        that reads row 0 as the class token's (its own computation included) calls this first."""
        if not self.state.class_token:  # the premise checked where it is used, declared or not
            raise UnsupportedModel(f"{self.state.method} reads {reading} and this model has no class token: "
                                   f"row 0 is another token's")

    def cls_attn(self) -> torch.Tensor:
        """The class token's attention over all tokens, averaged over heads: (B, N).

        Computed from the class query alone (B x H x 1 x N), with the same biases the block's
        attention used, so it equals row 0 of the block's softmax attention.
        """
        self.require_class_token("the class token's attention (ctx.cls_attn())")
        return self._once("cls_attn", lambda: self._logits(slice(0, 1)).float().softmax(-1).mean(1)[:, 0])


Reducer = Callable[[torch.Tensor, BlockContext], torch.Tensor]
