"""Zero-TPrune: importance by a weighted PageRank on the attention graph, then similarity pruning.

Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention
Graph in Pre-Trained Transformers", CVPR 2024, arXiv 2305.17328, project page
https://jha-lab.github.io/zerotprune/. No official code has been released that we could find
(searched the public code index for Zero-TPrune / zero_tprune / the jha-lab and first-author
accounts). Implemented from the paper. What we read of the authors' own code is their earlier
prototype https://github.com/Hongjiew/Transformer_pruning (commit 52a4607, "Final Project for
ECE538A", files ``tokenrank_vit_em.py``, ``tokenrank_deit_prune.py``): a fine-tuned predecessor
with the importance step only (no S-stage); we take from it the PageRank's initialisation and
iteration count and the head aggregation, as said below.

Modifications (stage "mid": between the attention residual and the MLP of each prune block):
 - the block's attention probabilities (B, H, N, N) are recomputed inside the reducer from the
   block's qkv projection (q/k-norm, scale and the size bias the block used), prefix tokens
   included: the attention graph, whose edge i -> j weighs how much token i attends to token j;
 - I-stage, Weighted Page Rank per head: s_0 = 1/N for every token, s_{t+1}(j) =
   sum_i A(i, j) s_t(i) (``s @ A``: a token is important when important tokens attend to it; the
   rows of A sum to one, so s stays a distribution), ``iters`` rounds (default 5, the prototype's
   ``iters=5``), no damping (the prototype's ``d=0``);
 - heads are aggregated by their root mean square (default ``head_agg="rms"``, the prototype's
   ``mean(dist ** 2, heads) ** 0.5``; our reading of the paper's emphasis on the informative
   region: a token that one head ranks high is not averaged away); ``head_agg="mean"`` averages;
 - prune blocks: 0-based 3, 6, 9 of 12 (the DynamicViT / EViT locations the paper's DeiT
   comparisons use; scaled to other depths, option ``drop_loc`` overrides); at the i-th of them
   (1-based) ``int(num_patches x keep_rate ** i)`` non-prefix tokens stay (DynamicViT's cumulative
   keep ratio; at least one, never more than entered). The counts are Python ints fixed by the knob
   and the architecture, so every image keeps the same number and shapes are static;
 - of the ``k`` tokens a block removes, ``k_s = min(floor(s_fraction x k + 0.5), kept)`` go by
   similarity (S-stage) and ``k - k_s`` by importance (I-stage); default ``s_fraction = 0.5``;
 - I-stage: the ``k - k_s`` non-prefix tokens with the lowest importance are pruned;
 - S-stage, on the survivors: sorted by importance, the top ceil(M/2) form the important group and
   the rest the unimportant group (sequential partition); each unimportant token's score is its
   largest cosine similarity, on the keys averaged over heads (ToMe's metric), to an important
   token; the ``k_s`` unimportant tokens with the highest score are pruned (pruned, not merged);
 - kept tokens stay in their original order; prefix tokens (class, distillation, registers) are in
   the graph but never pruned and stay first; token sizes, when a previous method tracked them, are
   gathered with the kept tokens.

Deviations and choices (no official code to follow):
 - the number of PageRank rounds, the head aggregation and the split of each block's removal
   between the I-stage and the S-stage are our choices as stated above (prototype values where it
   has one); the paper's variance-based head filter is not implemented (its thresholds are not
   given in a form we could check) and the prototype's temperature on the attention logits is not
   used (the block's own probabilities are the graph);
 - the importance is computed once per block, before the I-stage, and reused by the S-stage;
 - the prototype excludes only the class token from pruning; we protect every prefix token.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness import margins
from harness.registry import Knob, Method, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, chosen_blocks, gather_tokens, install

HEAD_AGGREGATIONS = ("rms", "mean")


def weighted_page_rank(attn: torch.Tensor, iters: int) -> torch.Tensor:
    """Token importance per head, (B, H, N), from attention probabilities ``attn`` (B, H, N, N).

    Starts uniform and applies ``s <- s @ A`` ``iters`` times: token j collects the importance of
    every token i in proportion to the attention i pays to j.
    """
    n = attn.shape[-1]
    scores = attn.new_full(attn.shape[:-1], 1.0 / n).unsqueeze(-2)  # (B, H, 1, N)
    for _ in range(iters):
        scores = scores @ attn
    return scores.squeeze(-2)


def aggregate_heads(scores: torch.Tensor, how: str = "rms") -> torch.Tensor:
    """(B, H, N) per-head importance to (B, N): root mean square ("rms") or mean over heads."""
    if how == "rms":
        return scores.pow(2).mean(dim=1).sqrt()
    if how == "mean":
        return scores.mean(dim=1)
    raise HarnessError(f"zerotprune head_agg {how!r}; choices: {', '.join(HEAD_AGGREGATIONS)}")


def s_stage_keep(survivors: torch.Tensor, metric: torch.Tensor, num_prune: int) -> torch.Tensor:
    """Survivors left after pruning ``num_prune`` similar, unimportant ones.

    Args:
        survivors: (B, M) token indices in descending importance.
        metric: (B, T, D) features of all candidate tokens (indexed by ``survivors``).
        num_prune: tokens to prune, at most M // 2.

    Returns:
        (B, M - num_prune) indices: the important group, then the unpruned unimportant ones.
    """
    m = survivors.shape[1]
    important, unimportant = survivors[:, : m - m // 2], survivors[:, m - m // 2:]
    metric = F.normalize(metric, dim=-1)
    sim = gather_tokens(metric, unimportant) @ gather_tokens(metric, important).transpose(1, 2)
    redundancy = sim.max(dim=-1).values  # (B, M // 2): closeness to the nearest important token
    # the complement of the top ``num_prune`` by one argsort: a fixed shape, no boolean mask
    spared = redundancy.argsort(dim=-1, descending=True)[:, num_prune:]
    margins.note_boundary(redundancy, num_prune, "zerotprune similarity prune")
    return torch.cat([important, unimportant.gather(1, spared)], dim=1)


def select_tokens(importance: torch.Tensor, metric: torch.Tensor, num_prefix: int,
                  num_i: int, num_s: int) -> torch.Tensor:
    """Indices (B, N - num_i - num_s) of the tokens Zero-TPrune keeps, ascending (prefix first).

    Args:
        importance: (B, N) importance of every token, prefix included.
        metric: (B, N, D) features compared by the S-stage (keys).
        num_prefix: leading tokens that are never pruned.
        num_i: tokens the I-stage prunes (lowest importance).
        num_s: tokens the S-stage then prunes (most similar to an important token).
    """
    body = importance[:, num_prefix:]
    survivors = body.topk(body.shape[1] - num_i, dim=1, sorted=True).indices  # descending importance
    margins.note_boundary(body, body.shape[1] - num_i, "zerotprune importance keep")
    if num_s > 0:
        survivors = s_stage_keep(survivors, metric[:, num_prefix:], num_s)
    kept = survivors.sort(dim=1).values + num_prefix
    prefix = torch.arange(num_prefix, device=kept.device).expand(kept.shape[0], -1)
    return torch.cat([prefix, kept], dim=1)


def split_removal(num_remove: int, num_keep: int, s_fraction: float) -> tuple[int, int]:
    """(I-stage, S-stage) shares of ``num_remove``; the S-stage can prune at most ``num_keep``
    (its unimportant group is half of the ``num_keep + k_s`` survivors of the I-stage)."""
    num_s = min(math.floor(s_fraction * num_remove + 0.5), num_keep)  # rounded half up
    return num_remove - num_s, num_s


def zerotprune_reducer(num_keep: int, s_fraction: float, iters: int,
                       head_agg: str) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer of one prune block: ``num_keep`` non-prefix tokens leave it."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        # a Python int even where a tracer hands shapes over as tensors (fvcore's JIT trace)
        num_remove = int(x.shape[1]) - ctx.num_prefix - num_keep
        if num_remove <= 0:  # a later drop block that keeps what it received
            return x
        num_i, num_s = split_removal(num_remove, num_keep, s_fraction)
        importance = aggregate_heads(weighted_page_rank(ctx.attention(), iters), head_agg)
        index = select_tokens(importance, ctx.keys(), ctx.num_prefix, num_i, num_s)
        if ctx.state.size is not None:
            ctx.state.size = gather_tokens(ctx.state.size, index)
        return gather_tokens(x, index)

    return reduce


def kept_per_drop(num_patches: int, keep_rate: float, num_drops: int) -> list[int]:
    """Non-prefix tokens left after each drop block: int(num_patches x keep_rate ** i), i = 1..,
    at least one and never more than the block received."""
    kept, out = num_patches, []
    for i in range(1, num_drops + 1):
        kept = min(kept, max(1, int(num_patches * keep_rate ** i)))
        out.append(kept)
    return out


@register_method
class ZeroTPrune(Method):
    """Zero-TPrune: prune by weighted PageRank on the attention graph, then by key similarity (Wang et al., CVPR 2024)."""

    name = "zerotprune"
    version = "1"
    cannot_train = "Zero-TPrune is zero-shot by design (the paper prunes a frozen model and gives no fine-tuning)"
    knob = Knob("keep_rate", float, 0.01, 1.0, identity=1.0)

    option_defaults = {"drop_loc": None, "iters": 5, "head_agg": "rms", "s_fraction": 0.5}

    def resolved_options(self) -> dict:
        return {"drop_loc": self.options.get("drop_loc"), "iters": self.iters, "head_agg": self.head_agg,
                "s_fraction": self.s_fraction}

    @property
    def iters(self) -> int:
        """Weighted PageRank rounds."""
        return int(self.options.get("iters", 5))

    @property
    def head_agg(self) -> str:
        """How per-head importance is combined: "rms" or "mean"."""
        how = str(self.options.get("head_agg", "rms"))
        if how not in HEAD_AGGREGATIONS:
            raise HarnessError(f"zerotprune head_agg {how!r}; choices: {', '.join(HEAD_AGGREGATIONS)}")
        return how

    @property
    def s_fraction(self) -> float:
        """Share of each block's removal done by the S-stage (similarity), in [0, 1]."""
        value = float(self.options.get("s_fraction", 0.5))
        if not 0.0 <= value <= 1.0:
            raise HarnessError(f"zerotprune s_fraction={value} outside [0, 1]")
        return value

    def drop_loc(self, depth: int) -> tuple[int, ...]:
        """0-based blocks that prune, for a model of ``depth`` blocks."""
        return chosen_blocks(self.options.get("drop_loc"), depth, f"{self.name} drop_loc")

    def plan(self, arch, value: float) -> dict[int, int]:
        """Non-prefix tokens kept by each prune block at knob ``value``."""
        drops = self.drop_loc(arch.depth)
        return dict(zip(drops, kept_per_drop(arch.num_patches, value, len(drops))))

    def schedule(self, arch, value: float) -> Schedule:
        plan, tokens, out = self.plan(arch, value), arch.tokens_in, []
        for i in range(arch.depth):
            if i in plan:
                tokens = min(tokens, arch.num_prefix + plan[i])
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def patch(self, model, value: float, arch) -> None:
        reducers = {}
        if value < 1.0:
            options = (self.s_fraction, self.iters, self.head_agg)
            reducers = {i: zerotprune_reducer(keep, *options) for i, keep in self.plan(arch, value).items()
                        if keep < arch.num_patches}
        install(model, reducers, merges=self.merges, needs_class_token=self.needs_class_token, method=self.name)
