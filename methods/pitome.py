"""PiToMe: Protect Informative Tokens before Merging, an energy score that spares the isolated tokens.

Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging", NeurIPS 2024, arXiv
2405.16148, https://github.com/hchautran/PiToMe (``algo/pitome/merge.py``,
``algo/pitome/patch/deit.py`` and ``patch/timm.py``, commit 550b5de), checked against it on the
reference checkpoint in fp32 (``fidelity/deit_tiny_cifar10_newmethods_golden.json``, cases
``pitome_ratio0.9`` and ``pitome_ratio0.95``), and under CPU bf16 autocast with eager attention
(``tests/fixtures/golden/deit_tiny_cifar10_bf16_golden.json``, case ``pitome_ratio0.9``, made by
running it: bit for bit).

Modifications (as the official DeiT patch):
 - between attention and MLP of every block, ``r = floor(T - T x ratio)`` of the ``T`` patch tokens
   (prefix tokens excluded) are merged away;
 - each patch token's *energy* is the mean over all patch tokens (itself included) of
   ``ELU(cos(k_i, k_j) - margin)``, on the keys averaged over heads, with ``margin = 0.75 - 0.75 i /
   depth`` in block ``i``; tokens are ranked by energy, highest first (many similar neighbours:
   redundant);
 - in the first ``ceil(depth / 2)`` blocks all ranked tokens alternate into sets A and B and ToMe's
   bipartite matching merges the ``r`` A tokens best matched to a B token; in the later blocks only
   the ``2r`` highest-energy tokens are mergeable (A and B alternate among them, every A token merges
   into its most similar B token) and the other ``T - 2r`` are protected;
 - merging is a size-weighted average and sizes travel with the tokens, but attention gets no
   size bias (the official patch calls its attention without sizes: ``prop_attn`` off); an
   average-pool head weights tokens by size (the seam does);
 - output order as the official: prefix tokens, then the unmerged (bipartite blocks: in match order)
   or protected (energy order) tokens, then set B.

Deviations: every prefix token is kept out of the energy and the merge (the official excludes the
class token only); ``r`` is clamped to half the patch tokens (the official assumes ``ratio >= 0.5``);
on models whose blocks need token positions (EVA / rope, BEiT, relpos; the official code has none)
a merged token keeps its destination's (B token's) position.

Where the method is undefined the cell is refused (``unsupported``, the reason recorded), not run
with a substitute: a protected-token block (the later half) whose ``r = floor(T - T x ratio)`` is 0
while ``ratio < 1`` makes the official ``pitome`` take a maximum over an empty set of B tokens
(``IndexError``). On a 12-block DeiT (196 patches) that is every ``ratio <= 0.63`` (a late block is
down to one or two tokens) and ratios so close to 1 that a late block removes less than one token
(``T (1 - ratio) < 1``, e.g. 0.995); the budgets 0.9 / 0.7 / 0.5 need ratios 0.87-0.98 and run.
The schedule still shows such a block merging nothing (what ``random@pitome`` follows).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from harness import margins
from harness.errors import UnsupportedModel
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, gather_tokens, merge_tokens

Merge = Callable[..., torch.Tensor]


def tokens_merged(patches: int, ratio: float) -> int:
    """Patch tokens a block merges away at ``ratio`` (the official arithmetic, clamped to half)."""
    if ratio >= 1.0:
        return 0
    return max(0, min(math.floor(patches - patches * ratio), patches // 2))


def energy_scores(metric: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (B, T, T) of ``metric`` (B, T, D) and each token's energy (B, T):
    the mean over all tokens, itself included, of ELU(similarity - margin)."""
    metric = F.normalize(metric, p=2, dim=-1)
    sim = metric @ metric.transpose(-1, -2)
    return sim, F.elu(sim - margin, alpha=1.0).mean(dim=-1)


def energy_order(metric: torch.Tensor, margin: float, decisive: Optional[int] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (B, T, T) of ``metric`` and the tokens by energy, highest first.

    ``decisive``: how many leading ranks the merge reads in order (None: all of them, as the
    bipartite split alternates A and B down the whole ranking); their margins are noted."""
    sim, energy = energy_scores(metric, margin)
    margins.note_order(energy, "pitome energy order", to_rank=decisive)
    return sim, torch.argsort(energy, descending=True)


def _pair_scores(sim: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """Similarities of the A tokens (rows) to the B tokens (columns)."""
    b, t, _ = sim.shape
    scores = sim.gather(-1, b_idx.unsqueeze(-2).expand(b, t, b_idx.shape[-1]))
    return scores.gather(-2, a_idx.unsqueeze(-1).expand(b, a_idx.shape[-1], b_idx.shape[-1]))


def pitome_match(sim: torch.Tensor, order: torch.Tensor, r: int, bipartite: bool, num_prefix: int = 0) -> Merge:
    """The merge of one block. ``sim`` and ``order`` cover the patch tokens only; ``merge(x, mode)``
    keeps the ``num_prefix`` leading tokens of ``x`` (B, N, C) first, reduces the matched A tokens
    into their B partners by ``mode`` (``scatter_reduce``), and returns (B, N - r, C): prefix tokens,
    kept A tokens (bipartite) or protected tokens, then B."""
    if bipartite:
        a_idx, b_idx = order[..., ::2], order[..., 1::2]
        pair_scores = _pair_scores(sim, a_idx, b_idx)
        best, partner = pair_scores.max(dim=-1)
        edges = best.argsort(dim=-1, descending=True)
        margins.note_boundary(best, r, "pitome merge rank")
        margins.note_best(pair_scores, edges[:, :r], "pitome partner")
        kept_idx = a_idx.gather(1, edges[:, r:])
        src_idx, dst = a_idx.gather(1, edges[:, :r]), partner.gather(1, edges[:, :r])
    else:
        kept_idx = order[..., 2 * r:]
        src_idx, b_idx = order[..., : 2 * r: 2], order[..., 1: 2 * r: 2]
        pair_scores = _pair_scores(sim, src_idx, b_idx)
        dst = pair_scores.max(dim=-1).indices
        margins.note_best(pair_scores, None, "pitome partner")

    def merge(x: torch.Tensor, mode: str = "sum") -> torch.Tensor:
        prefix, x = x[:, :num_prefix], x[:, num_prefix:]
        b = gather_tokens(x, b_idx)
        if mode != "prune":  # "prune": the matched A tokens dropped, B unchanged (token positions)
            b = b.scatter_reduce(1, dst.unsqueeze(-1).expand(-1, -1, x.shape[-1]), gather_tokens(x, src_idx), reduce=mode)
        return torch.cat([prefix, gather_tokens(x, kept_idx), b], dim=1)

    return merge


def pitome_reducer(ratio: float, margin: float, bipartite: bool) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer of one block."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        p = ctx.num_prefix
        r = tokens_merged(x.shape[1] - p, ratio)
        if r == 0:
            return x
        with torch.no_grad():
            sim, order = energy_order(ctx.keys()[:, p:], margin, None if bipartite else 2 * r)
        merge = pitome_match(sim, order, r, bipartite, p)
        return merge_tokens(ctx, merge, x)  # a merged token keeps its destination's position

    return reduce


@register_method
class PiToMe(Method):
    """PiToMe: merge redundant (high-energy) tokens, protect informative ones, one ratio per block (Tran et al., NeurIPS 2024)."""

    name = "pitome"
    version = "1"
    # the paper reports off-the-shelf and retrained rows; the official main_ic.py trains image
    # classifiers with PiToMe in place. Gradients flow through the size-weighted merge
    cannot_train = None
    premises = Premises(merges=True, tracks_positions=True)
    knob = Knob("ratio", float, 0.5, 1.0, identity=1.0)

    @staticmethod
    def margin(block: int, depth: int) -> float:
        return 0.75 - 0.75 * (block / depth)

    @staticmethod
    def bipartite(block: int, depth: int) -> bool:
        """The first ceil(depth / 2) blocks match all tokens bipartitely (the official ``use_bsm_pitome``)."""
        return block < math.ceil(depth * 0.5)

    def schedule(self, arch, value: float) -> Schedule:
        tokens, out = arch.tokens_in, []
        for _ in range(arch.depth):
            tokens -= tokens_merged(tokens - arch.num_prefix, value)
            out.append(tokens)
        return Schedule(arch.tokens_in, tuple(out))

    def undefined_at(self, arch, value: float) -> Optional[str]:
        """Why the official PiToMe cannot run at ``value`` on ``arch`` (module docstring), or None."""
        schedule = self.schedule(arch, value)
        for i, leaving in enumerate(schedule.tokens_out):
            entering = schedule.tokens_entering(i)
            if value < 1.0 and not self.bipartite(i, arch.depth) and leaving == entering:
                return (f"pitome ratio={value}: block {i} would merge none of its {entering - arch.num_prefix} patch "
                        f"tokens, where the official code raises IndexError (a maximum over no token): undefined")
        return None

    def reducers(self, model, arch, value: float) -> dict:
        why = self.undefined_at(arch, value)
        if why:
            raise UnsupportedModel(why)
        depth = arch.depth
        return {} if value >= 1.0 else {
            i: pitome_reducer(value, self.margin(i, depth), self.bipartite(i, depth)) for i in range(depth)}
