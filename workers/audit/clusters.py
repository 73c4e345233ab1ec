"""Identity clusters of unlabelled faces from a k-nearest-neighbour graph of their embeddings.

Two stages, both connected components (scipy) over sparse graphs, never an all-pairs matrix:

1. **seeds**: components of the kNN edges at cosine >= ``seed`` (strict: nearly every edge joins one
   person's faces);
2. **average-linkage merges**: clusters whose members are on average at least ``merge`` apart in cosine
   (the dot product of their *unnormalised* mean embeddings, the mean of all cross pairs) are joined,
   searching each cluster's nearest clusters by that dot product, until no merge is left.

A face's confidence is its cosine to the mean of the other faces of its cluster (NaN for a single face).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from workers.audit.groups import group_sums, leave_one_out_cosine

MERGE_EXACT_MAX = 20_000   # clusters searched exactly at each merge round; more: an IVF index


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """Thresholds of the clustering (cosines of SFace-like unit embeddings).

    Attributes:
        seed: kNN edges at least this close seed the clusters.
        merge: clusters whose mean cross-pair cosine is at least this are merged.
        neighbours: nearest clusters searched per cluster at each merge round.
        rounds: merge rounds at most.
    """

    seed: float = 0.65
    merge: float = 0.5
    neighbours: int = 5
    rounds: int = 6

    def __post_init__(self) -> None:
        if not -1.0 <= self.merge <= self.seed <= 1.0:
            raise ValueError(f"cluster thresholds need -1 <= merge <= seed <= 1, got {self.merge}, {self.seed}")
        if self.neighbours < 1 or self.rounds < 0:
            raise ValueError("cluster neighbours must be >= 1 and rounds >= 0")


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int64[n]: connected component of each node of the undirected graph with edges ``a[i] - b[i]``,
    numbered in order of each component's first node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    labels = connected_components(graph, directed=False)[1]
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first)).astype(np.int64)[inverse]


def edges(sims: np.ndarray, rows: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) int64[E]: the kNN edges (``sims``/``rows`` float32/int64[N, k]) at cosine >= ``threshold``."""
    keep = (rows >= 0) & (np.nan_to_num(sims, nan=-2.0) >= threshold)
    return np.repeat(np.arange(len(rows)), rows.shape[1])[keep.ravel()], rows.ravel()[keep.ravel()]


def cluster_faces(embeddings: np.ndarray, sims: np.ndarray, rows: np.ndarray,
                  settings: ClusterSettings = ClusterSettings(), search=None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster faces; returns (cluster id int64[N], confidence float32[N]).

    Args:
        embeddings: float32[N, D] unit rows.
        sims, rows: float32[N, k], int64[N, k] each face's nearest other faces.
        settings: thresholds.
        search: ``search(base float32[M, D], k) -> (sims, rows)`` of each base row's nearest other rows
            by inner product (default: :mod:`workers.audit.knn` on CPU).
    """
    if search is None:
        from workers.audit.knn import Index, SearchSettings, neighbours

        def search(base, k):   # exact up to MERGE_EXACT_MAX clusters, IVF above
            return neighbours(Index(base, SearchSettings(exact_max=MERGE_EXACT_MAX)), base, np.arange(len(base)), k)

    n = len(embeddings)
    labels = components(n, *edges(sims, rows, settings.seed))
    for _ in range(settings.rounds):
        count = labels.max() + 1
        if count < 2:
            break
        means = (group_sums(embeddings, labels, count) / np.bincount(labels, minlength=count)[:, None])
        s2, r2 = search(means.astype(np.float32), min(settings.neighbours, count - 1))
        merged = components(count, *edges(s2, r2, settings.merge))
        if merged.max() + 1 == count:
            break
        labels = merged[labels]
    count = labels.max() + 1
    weights = np.ones(n)
    confidence = leave_one_out_cosine(embeddings, labels, group_sums(embeddings, labels, count, weights),
                                      group_sums(weights, labels, count), weights)
    return labels, confidence
