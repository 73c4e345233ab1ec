"""Clustering quality against known labels: pairwise precision/recall/F and BCubed precision/recall/F.

Pure numpy over contingency counts (no pair enumeration): for cluster ids ``c`` and true labels ``t``,
the count ``n_ct`` of items in cluster c with label t gives every pairwise and BCubed term.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def _contingency(clusters: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n_ct over the non-empty (c, t) cells, n_c of each cell's cluster, n_t of each cell's label)."""
    c = pd.factorize(np.asarray(clusters))[0]
    t = pd.factorize(np.asarray(labels))[0]
    cells = pd.DataFrame({"c": c, "t": t}).value_counts().reset_index(name="n")
    nc = np.bincount(c)[cells["c"].to_numpy()]
    nt = np.bincount(t)[cells["t"].to_numpy()]
    return cells["n"].to_numpy(np.float64), nc.astype(np.float64), nt.astype(np.float64)


def _f(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def pairwise_scores(clusters: np.ndarray, labels: np.ndarray) -> dict:
    """Pairwise precision, recall and F over all unordered pairs of items (same cluster vs same label)."""
    n, nc, nt = _contingency(clusters, labels)
    together = (n * (n - 1) / 2).sum()
    c_sizes = pd.Series(np.asarray(clusters)).value_counts().to_numpy(np.float64)
    t_sizes = pd.Series(np.asarray(labels)).value_counts().to_numpy(np.float64)
    predicted = (c_sizes * (c_sizes - 1) / 2).sum()
    actual = (t_sizes * (t_sizes - 1) / 2).sum()
    p = together / predicted if predicted else 1.0
    r = together / actual if actual else 1.0
    return {"precision": float(p), "recall": float(r), "f": _f(p, r)}


def bcubed_scores(clusters: np.ndarray, labels: np.ndarray) -> dict:
    """BCubed precision, recall and F: per item, the share of its cluster with its label (precision) and
    of its label in its cluster (recall), averaged over items."""
    n, nc, nt = _contingency(clusters, labels)
    total = n.sum()
    p = float((n * n / nc).sum() / total)
    r = float((n * n / nt).sum() / total)
    return {"precision": p, "recall": r, "f": _f(p, r)}
