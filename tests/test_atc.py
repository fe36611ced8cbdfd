"""ATC's own step on tiny inputs, checked by hand and against a brute-force agglomerative clustering."""
from __future__ import annotations

import math
import random

import pytest
import timm
import torch

from harness.methods.atc import (agglomerative_labels, cosine_distances, merge_clusters, num_clusters,
                                 representatives)
from harness.registry import make_method
from harness.schedule import arch_spec


def brute_force_labels(dist: list[list[float]], k: int, linkage: str) -> list[int]:
    """Textbook O(n^3)-per-step agglomerative clustering: linkage distances from the definition
    (min / max / mean over member pairs), ties to the pair lowest in (lowest member, lowest member)."""
    link = {"single": min, "complete": max, "average": lambda v: sum(v) / len(v)}[linkage]
    clusters = [[i] for i in range(len(dist))]
    while len(clusters) > k:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = link([dist[i][j] for i in clusters[a] for j in clusters[b]])
                key = (d, min(clusters[a]), min(clusters[b]))
                if best is None or key < best[0]:
                    best = (key, a, b)
        _, a, b = best
        clusters[a] += clusters.pop(b)
    clusters.sort(key=min)
    labels = [0] * len(dist)
    for c, members in enumerate(clusters):
        for i in members:
            labels[i] = c
    return labels


def _line(points: list[float]) -> torch.Tensor:
    """(1, n, n) distances |p_i - p_j| of points on a line, float64."""
    p = torch.tensor(points, dtype=torch.float64)
    return (p[:, None] - p[None, :]).abs().unsqueeze(0)


def test_cluster_counts_follow_the_official_arithmetic():
    # int(196 * r ** s): 137.2, 96.04, 67.228 at r = 0.7; 176.4, 158.76, 142.884 at r = 0.9
    assert [num_clusters(196, 0.7, s) for s in (1, 2, 3)] == [137, 96, 67]
    assert [num_clusters(196, 0.9, s) for s in (1, 2, 3)] == [176, 158, 142]
    assert num_clusters(196, 0.2, 3) == 1   # int(1.568)
    assert num_clusters(196, 0.1, 3) == 1   # int(0.196) = 0, clamped (official: no reduction there)


def test_schedule_counts_clusters_from_the_original_patches():
    method = make_method("atc")
    arch = arch_spec(timm.create_model("deit_small_patch16_224"))
    # blocks 3, 6, 9 leave 1 + 137, 1 + 96, 1 + 67 (not 0.7 of the tokens entering each block)
    assert method.schedule(arch, 0.7).tokens_out == (197,) * 3 + (138,) * 3 + (97,) * 3 + (68,) * 3
    assert method.schedule(arch, 1.0).tokens_out == (197,) * 12


# Points 0, 3, 5, 6, 9 on a line (tokens 0..4), two clusters. Pairwise distances:
#   0-3: 3, 0-5: 5, 0-6: 6, 0-9: 9, 3-5: 2, 3-6: 3, 3-9: 6, 5-6: 1, 5-9: 4, 6-9: 3.
# Every linkage first merges 5 and 6 (distance 1) into cluster {2, 3}. Then:
#  - single:   d(3,{5,6}) = min(2, 3) = 2 -> {1,2,3}; then d(0,{3,5,6}) = 3 ties d({3,5,6},9) = 3:
#              the pair (0, 1) comes before (1, 4) -> {0,1,2,3}, {4}
#  - complete: d(0,3) = 3 ties d(3,{5,6}) = max(2, 3) = 3: pair (0, 1) before (1, 2) -> {0,1};
#              then d({0,3},{5,6}) = 6, d({0,3},9) = 9, d({5,6},9) = max(4, 3) = 4 -> {2,3,4}
#  - average:  d(3,{5,6}) = 2.5 < d(0,3) = 3 -> {1,2,3}; then d(0,{3,5,6}) = (3+5+6)/3 = 4.67 and
#              d(9,{3,5,6}) = (6+4+3)/3 = 4.33 -> {1,2,3,4}, {0}
HAND = {"single": [0, 0, 0, 0, 1], "complete": [0, 0, 1, 1, 1], "average": [0, 1, 1, 1, 1]}


@pytest.mark.parametrize("linkage", sorted(HAND))
def test_five_points_by_hand(linkage):
    dist = _line([0, 3, 5, 6, 9])
    assert agglomerative_labels(dist, 2, linkage)[0].tolist() == HAND[linkage]
    assert brute_force_labels(dist[0].tolist(), 2, linkage) == HAND[linkage]


def test_labels_are_numbered_by_lowest_member_in_any_input_order():
    # the same five points shuffled: 9, 5, 0, 6, 3 (tokens 0..4); average linkage -> {0}(point 0) alone
    dist = _line([9, 5, 0, 6, 3])
    labels = agglomerative_labels(dist, 2, "average")[0].tolist()
    assert labels == [0, 0, 1, 0, 0]  # cluster of token 0 is label 0; the lone point 0 (token 2) is 1
    assert representatives(torch.tensor([labels]), 2).tolist() == [[0, 2]]


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_all_distances_equal_merge_in_index_order(linkage):
    # every pair at distance 1: (0,1) merges first, then the cluster {0,1} (representative 0) with 2,
    # then with 3: five points to two clusters leave {0,1,2,3}, {4}
    dist = torch.ones(1, 5, 5, dtype=torch.float64)
    assert agglomerative_labels(dist, 2, linkage)[0].tolist() == [0, 0, 0, 0, 1]
    assert agglomerative_labels(dist, 5, linkage)[0].tolist() == [0, 1, 2, 3, 4]  # no merge
    assert agglomerative_labels(dist, 1, linkage)[0].tolist() == [0] * 5


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_random_batches_match_the_brute_force(linkage):
    gen = torch.Generator().manual_seed(0)
    for n, k in [(6, 2), (9, 4), (12, 5), (12, 1)]:
        points = torch.randn(3, n, 3, generator=gen, dtype=torch.float64)
        dist = torch.cdist(points, points)
        dist = (dist + dist.transpose(1, 2)) / 2
        got = agglomerative_labels(dist, k, linkage)
        for b in range(3):
            assert got[b].tolist() == brute_force_labels(dist[b].tolist(), k, linkage), (n, k, b)


def _tie_heavy_lines(count: int):
    """Points at small integers on a line: many exactly equal distances (and duplicates at 0)."""
    rng = random.Random(0)
    for _ in range(count):
        n = rng.randint(3, 12)
        points = [rng.randint(0, 6) for _ in range(n)]
        yield _line(points), rng.randint(1, n)


def test_complete_linkage_ties_follow_the_sequential_lowest_pair_rule():
    # min / max are exact, so both sides see the same ties; the lowest (height, i, j) key goes first
    for dist, k in _tie_heavy_lines(120):
        assert agglomerative_labels(dist, k, "complete")[0].tolist() == brute_force_labels(dist[0].tolist(), k, "complete")


def _kruskal(dist: list[list[float]], nodes: list[int]) -> list[float]:
    """Edge lengths of a minimum spanning tree of ``nodes`` (unique as a multiset, whatever the ties)."""
    root = {i: i for i in nodes}

    def find(i):
        while root[i] != i:
            i = root[i]
        return i

    lengths = []
    for d, i, j in sorted((dist[i][j], i, j) for i in nodes for j in nodes if i < j):
        if find(i) != find(j):
            root[find(i)] = find(j)
            lengths.append(d)
    return lengths


def test_single_linkage_ties_give_a_valid_single_linkage_cut():
    # With exact ties the parallel rounds may take a different (equally close) merge than the
    # sequential lowest-pair rule: a different minimum spanning forest. Valid means: k clusters whose
    # own spanning trees use exactly the T - k shortest edges of a minimum spanning tree of all points.
    for dist, k in _tie_heavy_lines(120):
        labels = agglomerative_labels(dist, k, "single")[0].tolist()
        d, n = dist[0].tolist(), len(labels)
        assert sorted(set(labels)) == list(range(k))
        inside = [x for c in range(k) for x in _kruskal(d, [i for i in range(n) if labels[i] == c])]
        assert sorted(inside) == sorted(_kruskal(d, list(range(n))))[: n - k]


def test_cosine_distances_by_hand():
    metric = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # norms are ignored
    dist = cosine_distances(metric)[0]
    c = 1 - 1 / math.sqrt(2)  # 45 degrees
    expected = torch.tensor([[0.0, 1.0, c], [1.0, 0.0, c], [c, c, 0.0]])
    torch.testing.assert_close(dist, expected, atol=1e-6, rtol=0)
    assert torch.equal(dist, dist.T)


def test_duplicated_keys_cluster_into_their_groups():
    # three directions, each repeated: the clusters are the groups whatever the linkage
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    group = [2, 0, 1, 0, 2, 1, 1]
    metric = base[group].unsqueeze(0) * torch.arange(1, 8.0)[None, :, None]  # scaled: same cosine
    for linkage in ("average", "complete", "single"):
        labels = agglomerative_labels(cosine_distances(metric), 3, linkage)[0].tolist()
        # clusters numbered by lowest member: token 0 (group 2) -> 0, token 1 (group 0) -> 1, token 2 -> 2
        assert labels == [0, 1, 2, 1, 0, 2, 2]


def test_merge_is_the_size_weighted_mean_and_sizes_add_up():
    x = torch.tensor([[[1.0, 0.0], [3.0, 6.0], [10.0, 10.0]]])
    size = torch.tensor([[[1.0], [3.0], [2.0]]])
    labels = torch.tensor([[0, 0, 1]])
    merged, merged_size = merge_clusters(x, size, labels, 2)
    # cluster 0: (1 * (1, 0) + 3 * (3, 6)) / 4 = (2.5, 4.5), size 4; cluster 1 alone: unchanged, size 2
    torch.testing.assert_close(merged, torch.tensor([[[2.5, 4.5], [10.0, 10.0]]]))
    torch.testing.assert_close(merged_size, torch.tensor([[[4.0], [2.0]]]))
    merged, merged_size = merge_clusters(x, None, labels, 2)  # no sizes yet: plain mean
    torch.testing.assert_close(merged[0, 0], torch.tensor([2.0, 3.0]))
    assert merged_size[..., 0].tolist() == [[2.0, 1.0]]


def test_patched_model_keeps_the_class_token_first_and_carries_sizes():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", depth=4, num_classes=10).eval()
    arch = arch_spec(model)
    method = make_method("atc", {"atc": {"linkage": "complete"}})
    method.patch(model, 0.5, arch)  # blocks 1, 2, 3 of 4: 98, 49, 24 clusters
    state = model._seam_state
    state.recording = True
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    assert state.observed == [197, 99, 50, 25] == list(method.schedule(arch, 0.5).tokens_out)
    assert state.prop_attn
    assert state.size.shape == (2, 25, 1)
    assert state.size[:, 0, 0].tolist() == [1.0, 1.0]             # the class token merged with nothing
    assert state.size[:, 1:].sum(dim=(1, 2)).tolist() == [196.0, 196.0]  # every patch in one cluster
    assert (state.size[:, 1:] >= 1).all()


def test_clustering_under_bf16_autocast_is_float32_and_equal_to_fp32():
    # the distances are float32 whatever the autocast (a bf16 matmul would round them to 3 digits)
    metric = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dist = cosine_distances(metric)
        labels = agglomerative_labels(dist, 10, "average")
    assert dist.dtype == torch.float32
    assert torch.equal(labels, agglomerative_labels(cosine_distances(metric), 10, "average"))
