"""Zero-TPrune: similarity pruning on a pre-ranking, then importance by weighted PageRank on the attention graph.

Wang, Dedhia and Jha, "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention
Graph in Pre-Trained Transformers", CVPR 2024, arXiv 2305.17328, project page
https://jha-lab.github.io/zerotprune/. No official code has been released that we could find
(searched the public code index for Zero-TPrune / zero_tprune / the jha-lab and first-author
accounts). Implemented from the paper; checked against it only (no golden logits). The authors'
earlier prototype https://github.com/Hongjiew/Transformer_pruning (commit 52a4607, "Final Project
for ECE538A", ``tokenrank_vit_em.py``) is a fine-tuned predecessor with the importance step only;
we take from it only what the paper leaves open, as said below.

Modifications (stage "post": after the MLP residual of each prune block, i.e. between blocks, as
the paper places its pruning layers):
 - the graph: the block's attention probabilities (B, H, N, N) on the tokens that entered it,
   formed once by the prune block's own explicit attention (q/k-norm, scale and the size bias the
   block used; the seam's ``attention_map``), prefix tokens included; edge i -> j weighs how much
   token i attends to token j;
 - Weighted Page Rank (WPR) per head (the paper): s_{t+1}(j) = sum_i A(i, j) s_t(i) (``s @ A``: a
   token is important when important tokens attend to it; rows of A sum to one, so s stays a
   distribution), no damping;
 - initial scores (the paper's default): the class token starts at sqrt(N) times every other
   token, then normalised to sum one; ``init="uniform"`` is the paper's "-uni" variant (1/N each).
   A model without a class token starts uniform (nothing to weight);
 - WPR rounds per block (the paper: 30-50 in the first three layers, 5-10 in the middle, 1 in the
   last three): 30 / 5 / 1 by default, the low end of each range (our choice within the paper's
   ranges); an integer ``iters`` option sets one count for every block;
 - heads (the paper's variance-based head filter, range [0.01, 0.7]): a head whose importance
   distribution has a variance outside [0.01, 0.7] is left out of the aggregation. The paper gives
   the range but not the scale; we take the variance of N x s (the scores scaled to mean one,
   population variance), the scale on which the range separates heads at all (scores summing to
   one have variances below 1/N, under 0.01 for any N > 100). Where no head of an image passes,
   every head is used (our choice; the paper is silent). ``head_filter=None`` turns the filter off.
   Measured on deit_tiny_cifar10 (3 heads, 8 of the golden images): after 5 rounds at blocks 3 and 6
   no head of any image lies in range (variances 1.4-4.8), so the filter mostly falls back there;
   after one round (the pre-ranking, block 9) some heads pass in half the images;
 - the kept heads are combined by their root mean square (``head_agg="rms"``, our reading of the
   paper's emphasis on the informative region: a token one head ranks high is not averaged away; the
   prototype's ``mean(dist ** 2, heads) ** 0.5``); ``head_agg="mean"`` averages;
 - stage order in a prune block (the paper): (1) pre-ranking: one WPR round on the whole graph,
   which prunes nothing; (2) S-stage: the non-prefix tokens sorted by the pre-ranking, the top
   ceil(T/2) form the important group and the rest the unimportant group (sequential partition);
   each unimportant token's score is its largest cosine similarity, on the keys averaged over heads
   (ToMe's metric), to an important token; the ``k_s`` with the highest score are pruned (pruned,
   not merged); (3) I-stage: WPR with the block's round count on the survivors' sub-graph (the
   attention among the survivors, prefix included, each row renormalised to sum one), and the
   ``k - k_s`` survivors with the lowest importance are pruned;
 - prune blocks: 0-based 3, 6, 9 of 12 (the DynamicViT / EViT locations the paper's DeiT
   comparisons use; scaled to other depths, option ``drop_loc`` overrides); at the i-th of them
   (1-based) ``int(num_patches x keep_rate ** i)`` non-prefix tokens stay (DynamicViT's cumulative
   keep ratio; at least one, never more than entered). The counts are Python ints fixed by the knob
   and the architecture, so every image keeps the same number and shapes are static;
 - kept tokens stay in their original order; prefix tokens (class, distillation, registers) are in
   the graph but never pruned and stay first; token sizes, when a previous method tracked them, are
   gathered with the kept tokens.

Our choices where the paper is silent (named):
 - the split of each block's removal ``k``: ``k_s = min(floor(s_fraction x k + 0.5), T // 2)`` by
   the S-stage (its unimportant group is half the tokens), the rest by the I-stage; default
   ``s_fraction = 0.5``;
 - the partition (sequential), the similarity metric (keys averaged over heads, cosine) and the
   I-stage's sub-graph renormalisation, as above; the variance's scale and the no-head fallback;
 - the prototype's temperature on the attention logits is not used (the block's own probabilities
   are the graph); every prefix token is protected (the prototype protects the class token only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness import margins
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, chosen_blocks, gather_tokens

HEAD_AGGREGATIONS = ("rms", "mean")
INITS = ("sqrt", "uniform")
HEAD_FILTER = (0.01, 0.7)  # the paper's variance range for the heads that count
# WPR rounds (the paper: 30-50 in the first three layers, 5-10 in the middle, 1 in the last three)
ITERS_FIRST, ITERS_MIDDLE, ITERS_LAST = 30, 5, 1


def page_rank_iters(index: int, depth: int) -> int:
    """WPR rounds for 0-based block ``index`` of ``depth``: first three, middle, last three."""
    if index >= depth - 3:
        return ITERS_LAST
    return ITERS_FIRST if index < 3 else ITERS_MIDDLE


def initial_scores(n: int, class_token: bool, init: str, like: torch.Tensor) -> torch.Tensor:
    """WPR's starting distribution over ``n`` tokens, (n,): the class token (index 0) weighted by
    sqrt(n) (``init="sqrt"``, the paper's default) or uniform (``"uniform"``, its "-uni" variant)."""
    weights = like.new_ones(n)
    if init == "sqrt" and class_token:
        weights[0] = math.sqrt(n)
    return weights / weights.sum()


def weighted_page_rank(attn: torch.Tensor, iters: int, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token importance per head, (B, H, N), from attention probabilities ``attn`` (B, H, N, N).

    Starts from ``start`` (N,) (default uniform) and applies ``s <- s @ A`` ``iters`` times: token j
    collects the importance of every token i in proportion to the attention i pays to j.
    """
    n = attn.shape[-1]
    if start is None:
        start = attn.new_full((n,), 1.0 / n)
    scores = start.to(attn.dtype).expand(*attn.shape[:-2], 1, n)  # (B, H, 1, N)
    for _ in range(iters):
        scores = scores @ attn
    return scores.squeeze(-2)


def head_weights(scores: torch.Tensor, head_filter: Optional[tuple[float, float]]) -> torch.Tensor:
    """(B, H) 1.0 for the heads whose variance of N x scores lies in ``head_filter``, else 0.0;
    all ones where the filter is off or leaves an image no head."""
    if head_filter is None:
        return scores.new_ones(scores.shape[:2])
    variance = (scores * scores.shape[-1]).var(dim=-1, unbiased=False)
    kept = ((variance >= head_filter[0]) & (variance <= head_filter[1])).to(scores.dtype)
    # a fixed-shape fallback (no branch on a tensor value): no head passes -> every head counts
    return torch.where(kept.sum(dim=1, keepdim=True) > 0, kept, torch.ones_like(kept))


def aggregate_heads(scores: torch.Tensor, how: str = "rms",
                    head_filter: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """(B, H, N) per-head importance to (B, N): root mean square ("rms") or mean over the heads that
    pass ``head_filter`` (:func:`head_weights`)."""
    w = head_weights(scores, head_filter).unsqueeze(-1)  # (B, H, 1)
    if how == "rms":
        return ((scores.pow(2) * w).sum(dim=1) / w.sum(dim=1)).sqrt()
    if how == "mean":
        return (scores * w).sum(dim=1) / w.sum(dim=1)
    raise HarnessError(f"zerotprune head_agg {how!r}; choices: {', '.join(HEAD_AGGREGATIONS)}")


def s_stage_keep(ranked: torch.Tensor, metric: torch.Tensor, num_prune: int) -> torch.Tensor:
    """Tokens left after pruning ``num_prune`` similar, unimportant ones.

    Args:
        ranked: (B, M) token indices in descending (pre-ranking) importance.
        metric: (B, T, D) features of all candidate tokens (indexed by ``ranked``).
        num_prune: tokens to prune, at most M // 2.

    Returns:
        (B, M - num_prune) indices: the important group, then the unpruned unimportant ones.
    """
    m = ranked.shape[1]
    important, unimportant = ranked[:, : m - m // 2], ranked[:, m - m // 2:]
    metric = F.normalize(metric, dim=-1)
    sim = gather_tokens(metric, unimportant) @ gather_tokens(metric, important).transpose(1, 2)
    redundancy = sim.max(dim=-1).values  # (B, M // 2): closeness to the nearest important token
    # the complement of the top ``num_prune`` by one argsort: a fixed shape, no boolean mask
    spared = redundancy.argsort(dim=-1, descending=True)[:, num_prune:]
    margins.note_boundary(redundancy, num_prune, "zerotprune similarity prune")
    return torch.cat([important, unimportant.gather(1, spared)], dim=1)


def subgraph(attn: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """The attention among ``nodes`` (B, M) of ``attn`` (B, H, N, N), rows renormalised: (B, H, M, M)."""
    b, h, n, _ = attn.shape
    m = nodes.shape[1]
    rows = attn.gather(2, nodes.view(b, 1, m, 1).expand(b, h, m, n))
    sub = rows.gather(3, nodes.view(b, 1, 1, m).expand(b, h, m, m))
    return sub / sub.sum(dim=-1, keepdim=True)


Rank = Callable[[torch.Tensor, int], torch.Tensor]  # (attention graph, WPR rounds) -> (B, N) importance


def select_tokens(attn: torch.Tensor, metric: torch.Tensor, num_prefix: int, num_s: int, num_i: int,
                  iters: int, rank: Rank) -> torch.Tensor:
    """Indices (B, N - num_s - num_i) of the tokens Zero-TPrune keeps, ascending (prefix first).

    Args:
        attn: (B, H, N, N) the block's attention probabilities, prefix included.
        metric: (B, N, D) features compared by the S-stage (keys).
        num_prefix: leading tokens that are never pruned.
        num_s: tokens the S-stage prunes first (most similar to a pre-ranked important token).
        num_i: tokens the I-stage then prunes (lowest WPR importance on the survivors' graph).
        iters: WPR rounds of the I-stage.
        rank: importance of every token of a graph after some WPR rounds (heads aggregated).
    """
    p = num_prefix
    body = rank(attn, 1)[:, p:]  # the pre-ranking: one round, prunes nothing
    survivors = body.argsort(dim=1, descending=True)  # (B, T) descending pre-rank
    if num_s > 0:
        survivors = s_stage_keep(survivors, metric[:, p:], num_s)
    prefix = torch.arange(p, device=attn.device).expand(attn.shape[0], -1)
    if num_i > 0:
        importance = rank(subgraph(attn, torch.cat([prefix, survivors + p], dim=1)), iters)[:, p:]
        keep = survivors.shape[1] - num_i
        margins.note_boundary(importance, keep, "zerotprune importance keep")
        survivors = survivors.gather(1, importance.topk(keep, dim=1).indices)
    return torch.cat([prefix, survivors.sort(dim=1).values + p], dim=1)


def split_removal(num_remove: int, num_body: int, s_fraction: float) -> tuple[int, int]:
    """(S-stage, I-stage) shares of ``num_remove`` of ``num_body`` non-prefix tokens; the S-stage
    can prune at most its unimportant group, ``num_body // 2`` tokens."""
    num_s = min(math.floor(s_fraction * num_remove + 0.5), num_body // 2)  # rounded half up
    return num_s, num_remove - num_s


def zerotprune_reducer(num_keep: int, s_fraction: float, iters: int, head_agg: str, init: str,
                       head_filter: Optional[tuple[float, float]]) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer of one prune block: ``num_keep`` non-prefix tokens leave it."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        # a Python int even where a tracer hands shapes over as tensors (fvcore's JIT trace)
        num_body = int(x.shape[1]) - ctx.num_prefix
        if num_body <= num_keep:  # a later drop block that keeps what it received
            return x
        num_s, num_i = split_removal(num_body - num_keep, num_body, s_fraction)
        class_token = ctx.state.class_token and ctx.num_prefix > 0

        def rank(graph: torch.Tensor, rounds: int) -> torch.Tensor:
            start = initial_scores(graph.shape[-1], class_token, init, graph)
            return aggregate_heads(weighted_page_rank(graph, rounds, start), head_agg, head_filter)

        index = select_tokens(ctx.attention(), ctx.keys(), ctx.num_prefix, num_s, num_i, iters, rank)
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
    """Zero-TPrune: prune by key similarity on a PageRank pre-ranking, then by weighted PageRank on the attention graph (Wang et al., CVPR 2024)."""

    name = "zerotprune"
    version = "3"  # 2: the paper's stage order, placement, rounds, init and head filter; 3: the block's own map (bf16 rounding)
    cannot_train = "Zero-TPrune is zero-shot by design (the paper prunes a frozen model and gives no fine-tuning)"
    knob = Knob("keep_rate", float, 0.01, 1.0, identity=1.0)
    stage = "post"

    premises = Premises()
    attention_map = True  # its prune blocks read the attention map: the block forms it once, explicitly

    @dataclass(frozen=True)
    class Options:
        drop_loc: Optional[tuple[int, ...]] = None  # 0-based pruning blocks (default: the paper's placement)
        iters: Optional[int] = None  # WPR rounds in every block (default: the paper's per-layer counts)
        head_agg: str = "rms"  # how per-head importance is combined: "rms" or "mean"
        s_fraction: float = 0.5  # share of each block's removal done by the similarity stage
        init: str = "sqrt"  # WPR's initial scores: "sqrt" (the paper) or "uniform" (its "-uni")
        head_filter: Optional[tuple[float, ...]] = HEAD_FILTER  # variance range of the heads that count

    def iters(self, index: int, depth: int) -> int:
        """WPR rounds of block ``index``: the ``iters`` option, or the paper's per-layer counts."""
        fixed = self.options.iters
        if fixed is None:
            return page_rank_iters(index, depth)
        if int(fixed) < 1:
            raise HarnessError(f"zerotprune iters={fixed}: at least one WPR round")
        return int(fixed)

    @property
    def head_agg(self) -> str:
        """How per-head importance is combined: "rms" or "mean"."""
        how = self.options.head_agg
        if how not in HEAD_AGGREGATIONS:
            raise HarnessError(f"zerotprune head_agg {how!r}; choices: {', '.join(HEAD_AGGREGATIONS)}")
        return how

    @property
    def init(self) -> str:
        """WPR's initial scores: "sqrt" (class token weighted by sqrt(N), the paper) or "uniform"."""
        init = self.options.init
        if init not in INITS:
            raise HarnessError(f"zerotprune init {init!r}; choices: {', '.join(INITS)}")
        return init

    @property
    def head_filter(self) -> Optional[tuple[float, float]]:
        """(low, high) variance range of the heads that count, or None (every head)."""
        value = self.options.head_filter
        if value is None:
            return None
        low, high = (float(v) for v in value)
        if not 0.0 <= low <= high:
            raise HarnessError(f"zerotprune head_filter={list(value)}: want [low, high] with 0 <= low <= high")
        return low, high

    @property
    def s_fraction(self) -> float:
        """Share of each block's removal done by the S-stage (similarity), in [0, 1]."""
        value = self.options.s_fraction
        if not 0.0 <= value <= 1.0:
            raise HarnessError(f"zerotprune s_fraction={value} outside [0, 1]")
        return value

    def drop_loc(self, depth: int) -> tuple[int, ...]:
        """0-based blocks that prune, for a model of ``depth`` blocks."""
        return chosen_blocks(self.options.drop_loc, depth, f"{self.name} drop_loc")

    def plan(self, arch, value: float) -> dict[int, int]:
        """Non-prefix tokens kept by each prune block at knob ``value``."""
        drops = self.drop_loc(arch.depth)
        return dict(zip(drops, kept_per_drop(arch.num_patches, value, len(drops))))

    def schedule(self, arch, value: float) -> Schedule:
        if value >= 1.0:
            return Schedule.full(arch)  # nothing pruned: the unpatched model (stage is moot)
        plan, tokens, out = self.plan(arch, value), arch.tokens_in, []
        for i in range(arch.depth):
            if i in plan:
                tokens = min(tokens, arch.num_prefix + plan[i])
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out), stage=self.stage)

    def reducers(self, model, arch, value: float) -> dict:
        if value >= 1.0:
            return {}
        options = (self.s_fraction, self.head_agg, self.init, self.head_filter)
        return {i: zerotprune_reducer(keep, options[0], self.iters(i, arch.depth), *options[1:])
                for i, keep in self.plan(arch, value).items() if keep < arch.num_patches}
