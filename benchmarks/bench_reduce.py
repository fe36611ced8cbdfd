"""CPU time of each method's reduction step: its reducer on one block's (8, 197, 384) DeiT-S tokens.

The reducer is the one the method's own ``patch`` installs at the seam (budget 0.7), called
directly on the first block that reduces, with a BlockContext built from that real block and its
real qkv projection. The timed call therefore includes deriving the method's metric
(``ctx.keys()``, ``ctx.cls_attn()``), selecting and gathering or merging, and nothing else: the
attention and MLP around it are timm's and would only add noise.
"""
from __future__ import annotations

import torch

from harness.seam import BlockContext, TokenState, block_reducers, token_state

from .common import METHODS, patched

BATCH = 8


class ReduceStepCPU:
    """``time_reduce``: one reducer call on CPU, single thread, fp32."""

    params = [METHODS]
    param_names = ["method"]
    warmup_time = 0.2

    def setup(self, method):
        torch.set_num_threads(1)  # the machine is shared; one thread keeps timings comparable
        model, resolved = patched(method)
        reducing = sorted(block_reducers(model))
        if not reducing:
            raise NotImplementedError(f"{method} installs no reducer at budget 0.7")  # asv: skipped
        index = reducing[0]
        block = model.blocks[index]
        tokens = round(resolved.schedule.tokens_entering(index))
        torch.manual_seed(0)
        with torch.inference_mode():
            self.x = torch.randn(BATCH, tokens, model.embed_dim)
            self.qkv = block.attn.qkv(block.norm1(self.x))
        self.reducer = block_reducers(model)[index]
        self.block, self.index, self.num_prefix = block, index, model.num_prefix_tokens
        self.prop_attn = token_state(model).prop_attn

    def time_reduce(self, method):
        # a fresh TokenState per call: merging reducers write sizes into it
        ctx = BlockContext(self.index, self.num_prefix, TokenState(prop_attn=self.prop_attn), self.block, self.qkv)
        with torch.inference_mode():
            self.reducer(self.x, ctx)
