"""ATC: Agglomerative Token Clustering, bottom-up hierarchical clustering of tokens at a few blocks.

Haurum et al., "Agglomerative Token Clustering", ECCV 2024, arXiv 2409.11923,
https://github.com/JoakimHaurum/ATC at commit 227c94b584df323b94dd79e8ddbb88b1587eeb8e (read:
``ATC_setup/models/atc.py`` and ``ATC_Benchmark/models/atc.py``, the image-classification DeiT models;
``ATC_Benchmark/{sklearn,scipy}_atc.py``; ``README.md``). Written from the paper and that reading.

Modifications (as the official image-classification model):
 - at the reduction blocks (0-based 3, 6, 9 of 12, the official ``--reduction_loc 3 6 9``; scaled
   to other depths as EViT's; option ``reduction_loc`` overrides), between attention and MLP, the
   non-prefix tokens are clustered into ``K`` clusters and each cluster becomes one token;
 - the knob is the official keep rate ``r`` (``reduction_ratio``): the s-th reduction block
   (s = 1, 2, 3) leaves ``K_s = int(num_patches x r ** s)`` clusters, counted from the ORIGINAL
   number of patches and truncated (the official ``int(num_patches * r ** (idx + 1))``; the
   training scripts ``train_deit.py`` / ``validate_deit.py`` call it ``--reduction_ratio``), then
   clamped to the tokens present (the official ``min(num_clusters, T - protected)``); prefix tokens
   come on top. ``r = 1`` is the identity (no reducer is installed);
 - clustering: agglomerative, starting from one cluster per token and merging the two closest
   clusters until ``K`` remain; distance = cosine distance ``1 - cos`` of the keys averaged over
   heads (the official ``k.mean(1)``, normalised, ``1 - scores``, passed to sklearn as
   ``metric="precomputed"``); linkage ``average`` by default (the default of the official
   ``Block_ATC``, ``agglomerative_clustering`` and benchmark scripts; the README's commands use
   all three of ``average``, ``complete``, ``single``: option ``linkage``). Linkage distances
   count cluster members (tokens), not token sizes, as sklearn does;
 - the class token (here: every prefix token) is kept out of the clustering and stays first;
 - a cluster's token is the size-weighted mean of its members and its size the sum of their sizes
   (the official ``merge_wavg`` with ``scatter_reduce(..., "sum")``); sizes start at one;
 - proportional attention (log size added to the attention logits) on by default, as the README's
   DeiT fine-tuning command passes ``--proportional_attn``; the flag's default in
   ``train_deit.py`` / ``validate_deit.py`` is off, where the official model drops the sizes after
   every block (see below); option ``prop_attn=false`` turns it off here.

Checked against the official ``ATC_setup/models/atc.py`` (scikit-learn clustering) on the golden
file ``fidelity/deit_tiny_cifar10_atc_golden`` (keep rate 0.9 / 0.7 / 0.5 x average / complete /
single linkage, and 0.2 average, proportional attention on): tokens per block equal, logits within
3e-6, except one named near-tie image (``tests/test_fidelity.py`` prints it: agglomeration merges
one pair at a time, and a closest pair 3e-8 ahead of the next flips with the CPU's rounding).

Token order of the output: prefix tokens, then the clusters ordered by their lowest-index member
(the official order is sklearn's label numbering, which is arbitrary; attention and the class-token
head are order-independent, so logits do not depend on it).

Implementation: the official code hands the distance matrix to scikit-learn (or scipy / cuML) on the
CPU, image by image. Here the clustering is torch only, batched: a (B, T, T) distance matrix with
inactive clusters masked by +inf and the Lance-Williams update (single: min; complete: max; average:
member-count-weighted mean) after each merge. A block merging ``T - K`` times runs ``T - K``
sequential steps, each an argmin over the whole matrix (O(T^2)) and an O(T) row/column update:
O(T^3) per image, and a Python loop of ``T - K`` steps that the compiler unrolls (static shapes,
``fullgraph=True``; tracing grows with the number of merges). That serial loop is the method's
real cost: far slower than ToMe's one-shot matching, and it shows in throughput, not in GMACs
(the reduction's own work is not counted there). The official repository benchmarks its sklearn,
scipy and cuML clusterings separately (``benchmark_atc_framework.py``) for the same reason.

Deviations from the official code, and why:
 - ties: two cluster pairs at exactly the same distance merge in the order of their representative
   indices (each cluster is represented by its lowest-index member; the pair (i, j), i < j, lowest
   in lexicographic order wins). sklearn / scipy break ties by their own internal order. Random
   float keys almost never tie; duplicate tokens do;
 - distances are computed in float32 (or the keys' dtype if wider), symmetrised, where sklearn gets
   the model's dtype cast to numpy and works in float64: near-ties can split differently;
 - the keys are normalised with an epsilon (a zero key would give NaN in the official code);
 - ``K_s`` is at least 1: the official code skips a reduction block whose ``int(...)`` is 0 (a keep
   rate below ``(1 / num_patches) ** (1 / 3)``), which would make the schedule non-monotone; the
   knob starts at 0.2 so that default 224 px DeiTs never meet the clamp;
 - every prefix token is protected (the official protects the class token; a distillation token
   would be clustered);
 - with ``prop_attn=false`` the official model drops the sizes after every block (``attn_size =
   None``), so later reductions average unweighted; here sizes always travel (a size-aware average
   pool head needs them) and merging stays size-weighted;
 - on models whose blocks need token positions (EVA / rope, BEiT, relpos; the official code has
   none) a cluster token takes the position of its lowest-index member: a choice of ours.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness import margins
from harness.registry import Knob, Method, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, chosen_blocks, current_positions, install

LINKAGES = ("average", "complete", "single")


def num_clusters(num_patches: int, keep_rate: float, stage: int) -> int:
    """Clusters left by the ``stage``-th reduction block (1-based): ``int(num_patches x keep_rate ** stage)``,
    at least 1 (the official arithmetic, counted from the original patches)."""
    return max(1, int(num_patches * keep_rate ** stage))


def cosine_distances(metric: torch.Tensor) -> torch.Tensor:
    """Pairwise ``1 - cos`` of ``metric`` (B, T, D): (B, T, T), float32 at least, exactly symmetric."""
    dtype = torch.promote_types(metric.dtype, torch.float32)
    unit = F.normalize(metric.to(dtype), dim=-1)
    dist = 1.0 - unit @ unit.transpose(1, 2)
    # a matmul need not give bit-identical (i, j) and (j, i): a+b == b+a does
    return (dist + dist.transpose(1, 2)) / 2


def _linkage_update(d_i: torch.Tensor, d_j: torch.Tensor, n_i: torch.Tensor, n_j: torch.Tensor,
                    linkage: str) -> torch.Tensor:
    """Lance-Williams: the distance of every cluster to the union of clusters i and j."""
    if linkage == "single":
        return torch.minimum(d_i, d_j)
    if linkage == "complete":
        return torch.maximum(d_i, d_j)
    return (n_i * d_i + n_j * d_j) / (n_i + n_j)


def _merge_closest(dist: torch.Tensor, members: torch.Tensor, rep: torch.Tensor, linkage: str):
    """One agglomerative step on every image: merge the closest pair of clusters (i < j) into i.

    Args:
        dist: (B, T, T) distances between clusters indexed by their representative (lowest-index
            member); +inf on the diagonal and for every row / column that is no longer a cluster.
            Updated in place.
        members: (B, T) tokens per cluster (0 for a merged-away index).
        rep: (B, T) each token's cluster, as its representative's index.
    """
    b, t, _ = dist.shape
    # argmin returns the first minimum: the pair lowest in (i, j) order, and i < j as dist is symmetric
    flat = dist.flatten(1).argmin(dim=1)
    margins.note_lowest_pair(dist, f"atc {linkage} closest pair")
    i, j = flat // t, flat % t
    row_i, col_i = i.view(b, 1, 1).expand(b, 1, t), i.view(b, 1, 1).expand(b, t, 1)
    row_j, col_j = j.view(b, 1, 1).expand(b, 1, t), j.view(b, 1, 1).expand(b, t, 1)
    n_i, n_j = members.gather(1, i[:, None]), members.gather(1, j[:, None])
    new = _linkage_update(dist.gather(1, row_i), dist.gather(1, row_j), n_i[:, :, None], n_j[:, :, None], linkage)
    inf = torch.full_like(new, float("inf"))
    new = new.scatter(2, i.view(b, 1, 1), inf[..., :1])  # the union's distance to itself
    # row and column i: the union; row and column j: no longer a cluster (writes O(T), not O(T^2))
    dist.scatter_(1, row_i, new).scatter_(2, col_i, new.transpose(1, 2))
    dist.scatter_(1, row_j, inf).scatter_(2, col_j, inf.transpose(1, 2))
    members = members.scatter(1, i[:, None], n_i + n_j).scatter(1, j[:, None], torch.zeros_like(n_j))
    rep = torch.where(rep == j[:, None], i[:, None], rep)
    return dist, members, rep


def agglomerative_labels(dist: torch.Tensor, k: int, linkage: str = "average") -> torch.Tensor:
    """Agglomerative clustering of each image's T points into ``k`` clusters.

    Args:
        dist: (B, T, T) symmetric pairwise distances (the diagonal is ignored).
        k: clusters to leave (1 <= k <= T); ``T - k`` merges run, a Python int: static shapes.
        linkage: "average", "complete" or "single".

    Returns:
        (B, T) long cluster labels in 0..k-1, clusters numbered by their lowest-index member.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; choices: {', '.join(LINKAGES)}")
    b, t, _ = dist.shape
    if not 1 <= k <= t:
        raise ValueError(f"cannot make {k} clusters of {t} points")
    eye = torch.eye(t, dtype=torch.bool, device=dist.device)
    dist = dist.detach().masked_fill(eye, float("inf"))  # labels carry no gradient; updated in place below
    members = torch.ones(b, t, dtype=dist.dtype, device=dist.device)
    rep = torch.arange(t, device=dist.device).expand(b, t)
    for _ in range(t - k):
        dist, members, rep = _merge_closest(dist, members, rep, linkage)
    # a representative's rank among the representatives is its cluster's label
    rank = (members > 0).long().cumsum(dim=1) - 1
    return rank.gather(1, rep)


def representatives(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) each cluster's lowest-index member, clusters in label order."""
    t = labels.shape[1]
    first = torch.full(labels.shape[:1] + (k,), t, dtype=labels.dtype, device=labels.device)
    index = torch.arange(t, device=labels.device).expand_as(labels)
    return first.scatter_reduce(1, labels, index, reduce="amin")


def merge_clusters(x: torch.Tensor, size: Optional[torch.Tensor], labels: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted means of the tokens of ``x`` (B, T, C) per cluster, and the summed sizes.

    Args:
        x: (B, T, C) tokens.
        size: (B, T, 1) patches per token, or None for all ones.
        labels: (B, T) long cluster of each token, in 0..k-1.
        k: number of clusters.

    Returns:
        (B, k, C) cluster tokens in label order and their sizes (B, k, 1).
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    b, _, c = x.shape
    index = labels.unsqueeze(-1)
    total = x.new_zeros(b, k, c).scatter_add(1, index.expand(-1, -1, c), x * size)
    merged_size = size.new_zeros(b, k, 1).scatter_add(1, index, size)
    return total / merged_size, merged_size


def atc_reducer(k: int, linkage: str) -> Callable[[torch.Tensor, BlockContext], torch.Tensor]:
    """The seam reducer of one reduction block: cluster the non-prefix tokens into ``k`` (clamped)."""

    def reduce(x: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        p, state = ctx.num_prefix, ctx.state
        kk = min(k, x.shape[1] - p)
        if kk == x.shape[1] - p:
            return x
        # no gradient through the clustering (the official runs it under no_grad, on the CPU)
        labels = agglomerative_labels(cosine_distances(ctx.keys()[:, p:].detach()), kk, linkage)
        size = None if state.size is None else state.size[:, p:]
        merged, merged_size = merge_clusters(x[:, p:], size, labels, kk)
        prefix_size = torch.ones_like(x[:, :p, :1]) if state.size is None else state.size[:, :p]
        positions = current_positions(state, x)
        if positions is not None:
            reps = representatives(labels, kk)
            state.positions = torch.cat([positions[:, :p], positions[:, p:].gather(1, reps)], 1)
        state.size = torch.cat([prefix_size, merged_size], 1)
        return torch.cat([x[:, :p], merged], 1)

    return reduce


@register_method
class ATC(Method):
    """ATC: agglomerative clustering of the keys into keep-rate**s clusters at 3 blocks (Haurum et al., ECCV 2024)."""

    name = "atc"
    merges = True
    tracks_positions = True
    version = "1"
    knob = Knob("keep_rate", float, 0.2, 1.0, identity=1.0)

    option_defaults = {"linkage": "average", "prop_attn": True, "reduction_loc": None}
    implicit_defaults = {"reduction_loc": None}  # left out of ids at None since ATC's first version

    def resolved_options(self) -> dict:
        options = {"linkage": self.linkage, "prop_attn": self.prop_attn}
        if self.options.get("reduction_loc") is not None:
            options["reduction_loc"] = [int(i) for i in self.options["reduction_loc"]]
        return options

    @property
    def linkage(self) -> str:
        """The linkage function: "average" (default), "complete" or "single"."""
        linkage = str(self.options.get("linkage", "average"))
        if linkage not in LINKAGES:
            raise HarnessError(f"atc linkage {linkage!r} unknown; choices: {', '.join(LINKAGES)}")
        return linkage

    @property
    def prop_attn(self) -> bool:
        """Whether log(size) is added to the attention logits."""
        return bool(self.options.get("prop_attn", True))

    def reduction_loc(self, depth: int) -> tuple[int, ...]:
        """0-based reduction blocks for a model of ``depth`` blocks."""
        return chosen_blocks(self.options.get("reduction_loc"), depth, "atc reduction_loc")

    def block_clusters(self, arch, value: float) -> dict[int, int]:
        """Block index -> clusters its reduction aims at (before clamping to the tokens present)."""
        if value >= 1.0:
            return {}
        locs = self.reduction_loc(arch.depth)
        return {b: num_clusters(arch.num_patches, value, s + 1) for s, b in enumerate(locs)}

    def schedule(self, arch, value: float) -> Schedule:
        clusters = self.block_clusters(arch, value)
        body, out = arch.num_patches, []
        for i in range(arch.depth):
            body = min(body, clusters.get(i, body))
            out.append(arch.num_prefix + body)
        return Schedule(arch.tokens_in, tuple(out))

    def patch(self, model, value: float, arch) -> None:
        linkage = self.linkage
        clusters = self.block_clusters(arch, value)
        schedule = self.schedule(arch, value)
        # only blocks that do reduce get a reducer, so the identity knob installs none
        reducers = {i: atc_reducer(k, linkage) for i, k in clusters.items()
                    if schedule.tokens_out[i] < schedule.tokens_entering(i)}
        install(model, reducers, prop_attn=self.prop_attn, merges=self.merges, method=self.name,
                tracks_positions=self.tracks_positions)
