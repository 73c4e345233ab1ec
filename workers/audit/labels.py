"""Label findings over unit embeddings: faces that are someone else, identities that are two people.

Pure numpy/pandas; every step is a segment sum over identity codes (:mod:`workers.audit.groups`) or one
nearest-centre search, never a loop over identities.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from workers.audit.groups import group_sums, normalise


@dataclasses.dataclass(frozen=True)
class LabelSettings:
    """Thresholds of the label findings (cosines of SFace-like unit embeddings).

    Attributes:
        keep_cosine: a face counts in its identity's robust centre while its cosine to the other faces'
            centre is at least this (:func:`workers.audit.groups.robust_centres`).
        own_max: a suspect is at most this close to its own identity's centre ...
        other_min: ... and at least this close to another identity's (the same-person range) ...
        margin_min: ... and that much closer to it than to its own.
        split_min_group: each of an identity's two groups needs this many faces to count as a split.
        split_max_cosine: the two groups' centres are at most this close ...
        split_min_cohesion: ... and each group's faces are on average at least this close to its centre.
    """

    keep_cosine: float = 0.3
    own_max: float = 0.3
    other_min: float = 0.5
    margin_min: float = 0.1
    split_min_group: int = 3
    split_max_cosine: float = 0.45
    split_min_cohesion: float = 0.5

    def __post_init__(self) -> None:
        for name in ("keep_cosine", "own_max", "other_min", "split_max_cosine", "split_min_cohesion"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"label {name} must be a cosine in [-1, 1], got {getattr(self, name)}")
        if self.split_min_group < 2:
            raise ValueError(f"split_min_group must be >= 2, got {self.split_min_group}")


def nearest_other(own_codes: np.ndarray, sims: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best of each face's nearest centres that is not its own identity's.

    Args:
        own_codes: int64[N].
        sims, rows: float32[N, k], int64[N, k] nearest centres of each face (descending).

    Returns:
        (other code int64[N] (-1: none among the k), its cosine float32[N] (NaN: none)).
    """
    other = (rows != own_codes[:, None]) & (rows >= 0)
    first = other.argmax(axis=1)
    found = other.any(axis=1)
    pick = np.arange(len(rows))
    return (np.where(found, rows[pick, first], -1).astype(np.int64),
            np.where(found, sims[pick, first], np.nan).astype(np.float32))


def label_suspects(own: np.ndarray, other: np.ndarray, settings: LabelSettings = LabelSettings()
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(score float32[N] = other - own (NaN: no evidence), flagged bool[N]).

    Args:
        own: float32[N], leave-one-out cosine to the face's own identity's robust centre (NaN: alone).
        other: float32[N], cosine to the nearest other identity's centre (NaN: none found).
    """
    score = (other - own).astype(np.float32)
    flagged = ((own <= settings.own_max) & (other >= settings.other_min) & (score >= settings.margin_min))
    return score, np.nan_to_num(flagged, nan=False).astype(bool)


def _per_group_argmin(values: np.ndarray, codes: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """int64[G]: row of the smallest value of each group (-1 for groups not eligible or empty)."""
    rows = np.flatnonzero(eligible[np.maximum(codes, 0)] & (codes >= 0))
    out = np.full(len(eligible), -1, np.int64)
    if len(rows):
        best = pd.Series(values[rows], index=rows).groupby(codes[rows]).idxmin()
        out[best.index.to_numpy()] = best.to_numpy()
    return out


def identity_splits(embeddings: np.ndarray, codes: np.ndarray, centres: np.ndarray,
                    settings: LabelSettings = LabelSettings(), rounds: int = 6) -> pd.DataFrame:
    """Two people under one name: a 2-means split of each identity's faces, run for all identities at once.

    Seeds: the face farthest from the identity's centre, then the face farthest from that one; then
    ``rounds`` of assigning each face to the nearer of its identity's two group centres.

    Args:
        embeddings: float32[N, D] unit rows.
        codes: int64[N] identity codes (-1: none).
        centres: float32[G, D], the identities' robust centres.

    Returns:
        One row per identity code with at least ``2 * split_min_group`` faces: code, group_sizes
        (int[2]), split_cosine, group_cohesion (the smaller group's mean cosine to its centre), score
        (1 - split_cosine) and flagged.
    """
    groups = len(centres)
    faces = np.bincount(codes[codes >= 0], minlength=groups)
    eligible = faces >= 2 * settings.split_min_group
    valid = (codes >= 0) & eligible[np.maximum(codes, 0)]
    safe = np.where(valid, codes, 0)
    to_centre = np.einsum("nd,nd->n", embeddings, centres[safe])
    seed_a = _per_group_argmin(np.where(valid, to_centre, np.inf), codes, eligible)
    ok = seed_a >= 0
    seed_a_vec = np.zeros_like(centres)
    seed_a_vec[ok] = embeddings[seed_a[ok]]
    to_a = np.einsum("nd,nd->n", embeddings, seed_a_vec[safe])
    seed_b = _per_group_argmin(np.where(valid, to_a, np.inf), codes, eligible)
    ca, cb = seed_a_vec, np.zeros_like(centres)
    cb[ok] = embeddings[seed_b[ok]]
    side = np.zeros(len(codes), np.int64)
    for _ in range(rounds):
        side = (np.einsum("nd,nd->n", embeddings, cb[safe]) > np.einsum("nd,nd->n", embeddings, ca[safe])).astype(np.int64)
        two = np.where(valid, 2 * codes + side, -1)
        sums = group_sums(embeddings, two, 2 * groups)
        ca, cb = normalise(sums[0::2]), normalise(sums[1::2])
    two = np.where(valid, 2 * codes + side, -1)
    sizes = np.bincount(two[two >= 0], minlength=2 * groups).reshape(groups, 2)
    mine = np.where(side == 1, np.einsum("nd,nd->n", embeddings, cb[safe]),
                    np.einsum("nd,nd->n", embeddings, ca[safe]))
    cohesion = group_sums(np.where(valid, mine, 0.0), two, 2 * groups).reshape(groups, 2) / np.maximum(sizes, 1)
    small = np.where(sizes[:, 0] <= sizes[:, 1], 0, 1)
    split_cos = np.einsum("gd,gd->g", ca, cb)
    idx = np.flatnonzero(eligible)
    out = pd.DataFrame({
        "code": idx, "group_sizes": list(sizes[idx]), "split_cosine": split_cos[idx].astype(np.float32),
        "group_cohesion": cohesion[idx, small[idx]].astype(np.float32),
        "score": (1.0 - split_cos[idx]).astype(np.float32)})
    out["flagged"] = ((sizes[idx].min(axis=1) >= settings.split_min_group)
                      & (out["split_cosine"] <= settings.split_max_cosine)
                      & (out["group_cohesion"] >= settings.split_min_cohesion)).to_numpy()
    return out
