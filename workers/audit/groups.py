"""Per-identity statistics of L2-normalised embeddings as segment sums: no loop over identities.

Every function takes ``codes`` (int64[N], the identity of each face as 0..G-1, -1 for none) and works in
row chunks, so the temporary ``[chunk, D]`` arrays stay bounded however large N grows.
"""
from __future__ import annotations

import numpy as np

CHUNK = 65536


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (float[N, D]) scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def group_sums(values: np.ndarray, codes: np.ndarray, groups: int, weights: np.ndarray | None = None) -> np.ndarray:
    """float64[G, D] (or float64[G] for 1-d ``values``): sum of ``weights * values`` per group (code -1 left out)."""
    keep = codes >= 0
    w = np.ones(len(codes)) if weights is None else np.asarray(weights, np.float64)
    if values.ndim == 1:
        return np.bincount(codes[keep], weights=(w * values)[keep], minlength=groups)
    out = np.zeros((groups, values.shape[1]), np.float64)
    for start in range(0, len(codes), CHUNK):
        sl = slice(start, start + CHUNK)
        k = keep[sl]
        np.add.at(out, codes[sl][k], values[sl][k] * w[sl][k, None])
    return out


def leave_one_out_cosine(embeddings: np.ndarray, codes: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                         weights: np.ndarray) -> np.ndarray:
    """float32[N]: cosine of each face to the weighted mean of the *other* faces of its identity.

    Args:
        embeddings: float32[N, D], unit rows.
        codes: int64[N].
        sums: float64[G, D], ``group_sums(embeddings, codes, G, weights)``.
        counts: float64[G], ``group_sums(weights, codes, G)``.
        weights: float[N], each face's weight in its identity's mean.

    Returns:
        NaN where the face has no identity or its identity has no other weighted face.
    """
    out = np.full(len(codes), np.nan, np.float32)
    for start in range(0, len(codes), CHUNK):
        sl = slice(start, start + CHUNK)
        c, e, w = codes[sl], embeddings[sl], np.asarray(weights[sl], np.float64)
        ok = c >= 0
        rest = sums[np.where(ok, c, 0)] - w[:, None] * e
        left = counts[np.where(ok, c, 0)] - w
        norm = np.linalg.norm(rest, axis=1)
        cos = np.einsum("nd,nd->n", rest, e) / np.maximum(norm, 1e-12)
        out[sl] = np.where(ok & (left > 1e-9) & (norm > 1e-9), cos, np.nan)
    return out


def robust_centres(embeddings: np.ndarray, codes: np.ndarray, groups: int, keep_cosine: float = 0.3,
                   rounds: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Trimmed identity centres: the mean of the faces that agree with the rest of their identity.

    Round 0 weighs every face 1; each later round weighs a face 1 only where its cosine to the mean of the
    other weighted faces of its identity is at least ``keep_cosine`` (an identity whose faces all fail
    keeps them all). A wrong face so drops out of the centre its own score is measured against.

    Args:
        embeddings: float32[N, D], unit rows.
        codes: int64[N], identity of each face (0..G-1; -1: none).
        groups: G.

    Returns:
        (centres float32[G, D] unit rows, own float32[N] leave-one-out cosine to the centre (NaN: no
        other face), weights float32[N] of the last round, faces per identity int64[G]).
    """
    weights = np.ones(len(codes), np.float64)
    faces = np.bincount(codes[codes >= 0], minlength=groups)
    for round_ in range(rounds + 1):
        sums = group_sums(embeddings, codes, groups, weights)
        counts = group_sums(weights, codes, groups)
        own = leave_one_out_cosine(embeddings, codes, sums, counts, weights)
        if round_ == rounds:
            break
        agree = np.nan_to_num(own, nan=1.0) >= keep_cosine
        kept = group_sums(agree.astype(np.float64), codes, groups)
        none_kept = np.zeros(len(codes), bool)
        none_kept[codes >= 0] = kept[codes[codes >= 0]] == 0
        weights = np.where(agree | none_kept, 1.0, 0.0)
    return normalise(sums), own, weights.astype(np.float32), faces
