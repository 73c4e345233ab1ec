"""Identity clusters of unlabelled faces from a k-nearest-neighbour graph of their embeddings.

Two stages, both connected components (scipy) over sparse graphs, never an all-pairs matrix:

1. **seeds**: components of the kNN edges at cosine >= ``seed`` (strict: nearly every edge joins one
   person's faces);
2. **average-linkage merges**: clusters joined by a kNN edge whose members are on average at least
   ``merge`` close in cosine (the dot product of their *unnormalised* mean embeddings, the mean of all cross
   pairs) are joined, round after round, until no merge is left.

A face's confidence is its cosine to the mean of the other faces of its cluster (NaN for a single face).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from workers.audit.groups import group_sums, leave_one_out_cosine



@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """Thresholds of the clustering (cosines of SFace-like unit embeddings).

    Attributes:
        seed: kNN edges at least this close seed the clusters.
        merge: clusters whose mean cross-pair cosine is at least this are merged.
        rounds: merge rounds at most.
    """

    seed: float = 0.65
    merge: float = 0.5
    rounds: int = 6

    def __post_init__(self) -> None:
        if not -1.0 <= self.merge <= self.seed <= 1.0:
            raise ValueError(f"cluster thresholds need -1 <= merge <= seed <= 1, got {self.merge}, {self.seed}")
        if self.rounds < 0:
            raise ValueError(f"cluster rounds must be >= 0, got {self.rounds}")


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
                  settings: ClusterSettings = ClusterSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Cluster faces; returns (cluster id int64[N], confidence float32[N]).

    The merge rounds need no second search: two clusters are candidates when a kNN edge of the faces joins
    them, and their average linkage is the dot product of their unnormalised mean embeddings.

    Args:
        embeddings: float32[N, D] unit rows.
        sims, rows: float32[N, k], int64[N, k] each face's nearest other faces.
        settings: thresholds.
    """
    n = len(embeddings)
    labels = components(n, *edges(sims, rows, settings.seed))
    a, b = edges(sims, rows, -1.0)                       # every kNN edge: the candidate links
    for _ in range(settings.rounds):
        count = int(labels.max()) + 1
        ca, cb = labels[a], labels[b]
        cross = ca != cb
        if not cross.any():
            break
        pairs = np.unique(np.stack([np.minimum(ca[cross], cb[cross]), np.maximum(ca[cross], cb[cross])], 1), axis=0)
        means = group_sums(embeddings, labels, count) / np.bincount(labels, minlength=count)[:, None]
        link = np.concatenate([np.einsum("pd,pd->p", means[pairs[i:i + 65536, 0]], means[pairs[i:i + 65536, 1]])
                               for i in range(0, len(pairs), 65536)])
        keep = link >= settings.merge
        if not keep.any():
            break
        labels = components(count, pairs[keep, 0], pairs[keep, 1])[labels]
    count = int(labels.max()) + 1
    weights = np.ones(n)
    confidence = leave_one_out_cosine(embeddings, labels, group_sums(embeddings, labels, count, weights),
                                      group_sums(weights, labels, count), weights)
    return labels, confidence
