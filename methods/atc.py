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
3e-6, except one named near-tie image (``tests/test_fidelity.py`` prints it: keep rate 0.7, single
linkage, block 3: the last merge taken and the next one 2.3e-7 apart, which the CPU's rounding can swap).

Token order of the output: prefix tokens, then the clusters ordered by their lowest-index member
(the official order is sklearn's label numbering, which is arbitrary; attention and the class-token
head are order-independent, so logits do not depend on it).

Implementation: the official code hands the distance matrix to scikit-learn (or scipy / cuML) on the
CPU, image by image, which merges one pair per step. Here the clustering is torch only, batched over
images, in parallel rounds (reciprocal nearest neighbours, Murtagh 1983): every pair of clusters that
are each other's nearest neighbour merges at once, and the (B, L, L) distance matrix is updated by
Lance-Williams for all of them together, rows then columns (single: min; complete: max; average:
member-count-weighted mean), and shrunk to the L clusters left once a tenth has merged away. For
these reducible linkages every such merge is a merge of the sequential algorithm's dendrogram,
whose heights only grow; rounds run until the ``T - K`` lowest merges are known (no pair left is
closer), and the clusters are those merges: the sequential algorithm's ``K`` clusters. On the
reference DeiT-T at keep rate 0.51 (16 images) the three reduction blocks settle in 16, 8 and 7
rounds where the sequential algorithm takes 97, 49 and 24 steps. The round count depends on the keys,
so the clustering is one custom op (``harness::atc_labels``) that a compiled model calls as one
node; inside it the loop reads its condition on the host once per round.

Deviations from the official code, and why:
 - ties (random float keys almost never tie; duplicate tokens do): a cluster's nearest neighbour is
   the lowest index among the closest, and the merges are cut in the order of the key (height,
   lower representative, higher representative), each merge's key raised to the highest below it,
   then by round. Each cluster is represented by its lowest-index member. For complete linkage this
   is the sequential rule "the pair (i, j), i < j, lowest in (distance, i, j) merges first" (tested
   on tie-heavy inputs); for single linkage with exact ties the rounds can take another, equally
   close merge (another minimum spanning forest: a valid single-linkage clustering, tested as such).
   sklearn / scipy break ties by their own internal order;
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

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness import margins
from harness.registry import Knob, Method, Premises, register_method
from harness.schedule import Schedule
from harness.seam import BlockContext, chosen_blocks, current_positions

LINKAGES = ("average", "complete", "single")
# the distance of a merged-away cluster and of a cluster to itself: finite, so that merging never
# computes inf - inf (NaN), and far above any distance (cosine distances are at most 2)
FAR = 1e30


def num_clusters(num_patches: int, keep_rate: float, stage: int) -> int:
    """Clusters left by the ``stage``-th reduction block (1-based): ``int(num_patches x keep_rate ** stage)``,
    at least 1 (the official arithmetic, counted from the original patches)."""
    return max(1, int(num_patches * keep_rate ** stage))


def cosine_distances(metric: torch.Tensor) -> torch.Tensor:
    """Pairwise ``1 - cos`` of ``metric`` (B, T, D): (B, T, T), float32 at least, exactly symmetric."""
    dtype = torch.promote_types(metric.dtype, torch.float32)
    unit = F.normalize(metric.to(dtype), dim=-1)
    with torch.autocast(metric.device.type, enabled=False):  # autocast would make the matmul bf16
        dist = 1.0 - unit @ unit.transpose(1, 2)
    # a matmul need not give bit-identical (i, j) and (j, i): a+b == b+a does
    return (dist + dist.transpose(1, 2)) / 2


def _combine(dist: torch.Tensor, partner: torch.Tensor, weight: torch.Tensor, linkage: str) -> torch.Tensor:
    """Lance-Williams for a whole round at once: the distance between every two unions
    ``{a, partner[a]}`` and ``{b, partner[b]}`` (a cluster that does not merge is its own partner),
    rows first, then columns. single / complete: min / max over the four member pairs, exactly;
    average: the member-count-weighted mean, ``weight`` (B, T) being the partner's share of each union.
    Entries of merged-away clusters and the diagonal come out arbitrary: masked by the caller.
    """
    b, t, _ = dist.shape
    cols = partner[:, None, :].expand(b, t, t)
    to_partner = dist.gather(2, cols)  # d(a, partner[b]); its transpose is d(partner[a], b): dist is symmetric
    if linkage == "average":
        rows = torch.lerp(dist, to_partner.transpose(1, 2), weight[:, :, None])
        both = torch.lerp(rows, rows.gather(2, cols), weight[:, None, :])
        return torch.minimum(both, both.transpose(1, 2))  # rows-then-columns rounds (a, b) and (b, a) apart
    pick = torch.minimum if linkage == "single" else torch.maximum
    rows = pick(dist, to_partner.transpose(1, 2))
    return pick(rows, rows.gather(2, cols))


@dataclass
class _Forest:
    """The agglomeration's state, all images at once. The clusters alive sit in L <= T slots, in the
    order of their representatives (lowest members), which ``ids`` names; merges are stored by token.

    Attributes:
        dist: (B, L, L) distances between the clusters; ``FAR`` on the diagonal and in the rows and
            columns of merged-away slots (an image with fewer clusters than L has some).
        members: (B, L) tokens per cluster (0: merged away).
        ids: (B, L) each slot's representative token.
        height, pair: (B, L) the key of the merge that made each cluster (0, -1 for a single token). A
            merge of clusters u < v (representatives) has the key (height, u * T + v), raised to the
            highest key below it, so that keys only grow up the tree.
        parent: (B, T) a merge is stored at the token that leaves (v): the representative it joined,
        merge_height, merge_pair: its key (+inf: never merged),
        merge_round: its round (a parent's key can equal its child's; the child's round is earlier).
        step: rounds run.
    """

    dist: torch.Tensor
    members: torch.Tensor
    ids: torch.Tensor
    height: torch.Tensor
    pair: torch.Tensor
    parent: torch.Tensor
    merge_height: torch.Tensor
    merge_pair: torch.Tensor
    merge_round: torch.Tensor
    step: int = 0

    @classmethod
    def start(cls, dist: torch.Tensor) -> "_Forest":
        b, t, _ = dist.shape
        eye = torch.eye(t, dtype=torch.bool, device=dist.device)
        zeros = torch.zeros(b, t, dtype=dist.dtype, device=dist.device)
        index = torch.arange(t, device=dist.device).expand(b, t).contiguous()
        never = torch.full_like(index, t * t)
        return cls(dist.masked_fill(eye, FAR), zeros + 1, index, zeros, index - index - 1, index.clone(),
                   zeros + float("inf"), never, never.clone())

    def compact(self, alive: int) -> None:
        """Keep ``alive`` slots (the most clusters any image has left): the work of a round shrinks with them."""
        order = (self.members == 0).to(torch.uint8).argsort(dim=1, stable=True)[:, :alive]
        rows = order[:, :, None].expand(-1, -1, self.dist.shape[2])
        self.dist = self.dist.gather(1, rows).gather(2, order[:, None, :].expand(-1, alive, -1))
        self.members, self.ids, self.height, self.pair = (
            v.gather(1, order) for v in (self.members, self.ids, self.height, self.pair))


def _key_max(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    """The lexicographically higher of two (height, pair) keys, element-wise."""
    a_higher = (a[0] > b[0]) | ((a[0] == b[0]) & (a[1] > b[1]))
    return torch.where(a_higher, a[0], b[0]), torch.where(a_higher, a[1], b[1])


def _settled(nearest_dist: torch.Tensor, merge_height: torch.Tensor, merges: int) -> torch.Tensor:
    """(B,) whether an image's ``merges`` lowest merges are all known: every pair of clusters left is
    farther than the ``merges``-th lowest merge so far (for a reducible linkage no later merge is lower)."""
    return nearest_dist.amin(dim=1) > merge_height.kthvalue(merges, dim=1).values


def _by_token(slots: torch.Tensor, ids: torch.Tensor, store: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``store`` (B, T) with ``values`` (B, L) written at the tokens ``ids`` of the ``slots`` (B, L) that are True."""
    return store.scatter(1, ids, torch.where(slots, values, store.gather(1, ids)))


def _record(forest: _Forest, nearest_dist: torch.Tensor, partner: torch.Tensor, mutual: torch.Tensor) -> torch.Tensor:
    """Store this round's merges in ``forest`` (keys, parents, the merged clusters' keys and sizes);
    returns the partner's share of each union's members."""
    f, t = forest, forest.parent.shape[1]
    slot = torch.arange(partner.shape[1], device=partner.device).expand_as(partner)
    leaves, keeps = mutual & (partner < slot), mutual & (partner > slot)
    partner_id = f.ids.gather(1, partner)
    own = (nearest_dist, torch.minimum(f.ids, partner_id) * t + torch.maximum(f.ids, partner_id))
    key = _key_max(_key_max(own, (f.height, f.pair)), (f.height.gather(1, partner), f.pair.gather(1, partner)))
    f.merge_height = _by_token(leaves, f.ids, f.merge_height, key[0])
    f.merge_pair = _by_token(leaves, f.ids, f.merge_pair, key[1])
    f.parent = _by_token(leaves, f.ids, f.parent, partner_id)
    f.merge_round = _by_token(leaves, f.ids, f.merge_round, torch.full_like(partner, f.step))
    f.height, f.pair = torch.where(keeps, key[0], f.height), torch.where(keeps, key[1], f.pair)
    other = torch.where(mutual, f.members.gather(1, partner), torch.zeros_like(f.members))
    weight = other / (f.members + other).clamp(min=1)
    f.members = torch.where(leaves, torch.zeros_like(f.members), f.members + other)
    return weight


def _round(forest: _Forest, nearest_dist: torch.Tensor, nearest: torch.Tensor, unsettled: torch.Tensor,
           linkage: str) -> None:
    """One parallel round on every unsettled image: every pair of reciprocal nearest neighbours merges."""
    slot = torch.arange(nearest.shape[1], device=nearest.device).expand_as(nearest)
    mutual = (nearest.gather(1, nearest) == slot) & (nearest_dist < FAR) & unsettled[:, None]
    partner = torch.where(mutual, nearest, slot)
    weight = _record(forest, nearest_dist, partner, mutual)
    dist = _combine(forest.dist, partner, weight, linkage)
    far = torch.where(forest.members > 0, -math.inf, FAR).to(dist.dtype)
    dist = torch.maximum(dist, torch.maximum(far[:, :, None], far[:, None, :]))  # one pass, unlike a 2-D mask
    dist.diagonal(dim1=1, dim2=2).fill_(FAR)
    forest.dist, forest.step = dist, forest.step + 1


def _agglomerate(forest: _Forest, merges: int, linkage: str) -> _Forest:
    """Rounds until every image is settled: a Python loop whose condition is read on the host once
    per round (real keys settle in tens of rounds; at most T - 1, as every round merges the closest
    pair), and so is the number of clusters left, to shrink the matrix once a tenth of it is gone."""
    while True:
        nearest_dist, nearest = forest.dist.min(dim=2)  # the first minimum: ties go to the lowest index
        unsettled = ~_settled(nearest_dist, forest.merge_height, merges)
        if not unsettled.any():
            return forest
        if margins.is_recording():  # only while a fidelity check records (it costs a pass over the matrix)
            margins.note_best(torch.where(forest.dist < FAR, -forest.dist, -math.inf), None,
                              f"atc {linkage} nearest neighbour")
        _round(forest, nearest_dist, nearest, unsettled, linkage)
        alive = int((forest.members > 0).sum(dim=1).max())
        if alive <= 0.9 * forest.dist.shape[1]:
            forest.compact(alive)


def _cut(parent: torch.Tensor, keys: tuple[torch.Tensor, ...], merges: int) -> torch.Tensor:
    """(B, T) each token's cluster after the ``merges`` lowest merges by ``keys`` (B, T) each, the
    first most significant, as the cluster's lowest-index member."""
    b, t = parent.shape
    order = torch.arange(t, device=parent.device).expand(b, t)
    for key in reversed(keys):  # stable sorts, least significant key first
        order = order.gather(1, key.gather(1, order).argsort(dim=1, stable=True))
    taken = torch.zeros_like(parent, dtype=torch.bool).scatter(1, order[:, :merges], True)
    index = torch.arange(t, device=parent.device).expand(b, t)
    pointer = torch.where(taken, parent, index)
    # keys only grow up the tree, so the merges taken are closed downwards and following parents
    # from any token ends at its cluster's lowest member; pointer doubling: log2 T gathers
    for _ in range(max(1, math.ceil(math.log2(t)))):
        pointer = pointer.gather(1, pointer)
    return pointer


def agglomerative_labels(dist: torch.Tensor, k: int, linkage: str = "average") -> torch.Tensor:
    """Agglomerative clustering of each image's T points into ``k`` clusters, in parallel rounds.

    Each round merges every pair of reciprocal nearest neighbours at once; for a reducible linkage
    (single, complete, average) these are merges of the sequential algorithm's dendrogram (Murtagh
    1983). Rounds run until the ``T - k`` lowest merges are known; those are the sequential
    algorithm's first ``T - k`` (its merge heights only grow), so the clusters are its clusters.

    Ties: a cluster's nearest neighbour is the lowest index among the closest; merges are cut by
    (height, lower representative, higher representative, round). With distinct distances this is
    the sequential algorithm exactly; with exact ties see the module docstring.

    Args:
        dist: (B, T, T) symmetric pairwise distances below 1e30 (the diagonal is ignored).
        k: clusters to leave (1 <= k <= T).
        linkage: "average", "complete" or "single".

    Returns:
        (B, T) long cluster labels in 0..k-1, clusters numbered by their lowest-index member.
    """
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; choices: {', '.join(LINKAGES)}")
    if not 1 <= k <= dist.shape[1]:
        raise ValueError(f"cannot make {k} clusters of {dist.shape[1]} points")
    # an opaque op: a compiled model calls it as one node of its graph (its round count is data-dependent)
    return torch.ops.harness.atc_labels(dist.detach(), k, linkage)


@torch.library.custom_op("harness::atc_labels", mutates_args=())
def _labels(dist: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    """:func:`agglomerative_labels` on checked arguments."""
    b, t, _ = dist.shape
    index = torch.arange(t, device=dist.device).expand(b, t)
    if k == t:
        return index.clone()
    merges = t - k
    dist = dist.to(torch.promote_types(dist.dtype, torch.float32))
    with torch.autocast(dist.device.type, enabled=False):  # fp32 already; autocast only adds dispatch per op
        f = _agglomerate(_Forest.start(dist), merges, linkage)
    left = f.dist.flatten(1).amin(dim=1, keepdim=True)  # any later merge is at least this high
    left = torch.where(left < FAR, left, math.inf)
    margins.note_boundary(-torch.cat([f.merge_height, left], 1), merges, f"atc {linkage} cut")
    root = _cut(f.parent, (f.merge_height, f.merge_pair, f.merge_round), merges)
    # a representative's rank among the representatives is its cluster's label
    rank = (root == index).long().cumsum(dim=1) - 1
    return rank.gather(1, root)


@_labels.register_fake
def _(dist: torch.Tensor, k: int, linkage: str) -> torch.Tensor:
    return dist.new_empty(dist.shape[:2], dtype=torch.long)


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
    premises = Premises(merges=True, tracks_positions=True)
    version = "2"  # 2: distances in fp32 under bf16 autocast (as the docstring says; the matmul ran in bf16)
    # the paper fine-tunes DeiT with ATC in place (30 epochs; the README's "Fine-tuning DeiT model",
    # train_deit.py): the clustering is not differentiated, the cluster averages are
    cannot_train = None
    knob = Knob("keep_rate", float, 0.2, 1.0, identity=1.0)

    @dataclass(frozen=True)
    class Options:
        linkage: str = "average"  # "average", "complete" or "single"
        prop_attn: bool = True  # log(cluster size) added to the attention logits
        reduction_loc: Optional[tuple[int, ...]] = None  # 0-based reduction blocks (default: 3, 6, 9 of 12)

        def __post_init__(self):
            if self.linkage not in LINKAGES:
                raise HarnessError(f"atc linkage {self.linkage!r} unknown; choices: {', '.join(LINKAGES)}")

    implicit_defaults = {"reduction_loc": None}  # left out of ids at None since ATC's first version

    @property
    def linkage(self) -> str:
        """The linkage function: "average" (default), "complete" or "single"."""
        return self.options.linkage

    @property
    def prop_attn(self) -> bool:
        """Whether log(size) is added to the attention logits."""
        return self.options.prop_attn

    def reduction_loc(self, depth: int) -> tuple[int, ...]:
        """0-based reduction blocks for a model of ``depth`` blocks."""
        return chosen_blocks(self.options.reduction_loc, depth, "atc reduction_loc")

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

    def reducers(self, model, arch, value: float) -> dict:
        schedule = self.schedule(arch, value)
        # only blocks that do reduce get a reducer, so the identity knob installs none
        return {i: atc_reducer(k, self.linkage) for i, k in self.block_clusters(arch, value).items()
                if schedule.tokens_out[i] < schedule.tokens_entering(i)}
