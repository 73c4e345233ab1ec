"""Near-duplicate faces: the same photo twice (re-encoded, resized, cropped a little, mirrored).

Two tests in turn: the embeddings are close (a k-nearest-neighbour candidate at cosine >= ``candidate``),
and the aligned crops look alike pixel for pixel (:func:`pixel_similarity` of small gray thumbnails, the
mirror image included). Two photos of one person from one event pass the first test only: the pixels of
two different photos differ in expression, light and background where a re-encoded copy's do not.
Pure numpy.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

THUMB = 32            # thumbnail side (pixels)
THUMB_REGION = 96     # central square of a 112 px crop that the thumbnail averages (3 x 3 blocks)
PAIR_CHUNK = 32768
SHIFT = 1             # thumbnails are compared at every offset up to this (3 crop pixels): re-detection
                      # of a resized or cropped copy moves its landmarks, and so its crop, a little


@dataclasses.dataclass(frozen=True)
class DuplicateSettings:
    """Thresholds of the near-duplicate finding.

    Attributes:
        candidate: pairs of faces at least this close (cosine) are compared pixel by pixel.
        cosine_min: a duplicate is at least this close in embedding ...
        pixel_min: ... and its thumbnails correlate at least this much (the mirror image included).
    """

    candidate: float = 0.8
    cosine_min: float = 0.85
    pixel_min: float = 0.92

    def __post_init__(self) -> None:
        if not -1.0 <= self.candidate <= self.cosine_min <= 1.0:
            raise ValueError(f"duplicate thresholds need -1 <= candidate <= cosine_min <= 1, got "
                             f"{self.candidate}, {self.cosine_min}")
        if not -1.0 <= self.pixel_min <= 1.0:
            raise ValueError(f"pixel_min must be a correlation in [-1, 1], got {self.pixel_min}")


def thumbnails(crops: np.ndarray) -> np.ndarray:
    """uint8[N, THUMB * THUMB]: gray block means of the central ``THUMB_REGION`` square of each crop.

    Args:
        crops: uint8[N, S, S, 3] aligned RGB crops (S >= THUMB_REGION; other sizes are centre-cut to it).
    """
    n, s = crops.shape[:2]
    region = min(THUMB_REGION, s - s % THUMB)
    o = (s - region) // 2
    gray = crops[:, o:o + region, o:o + region].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    block = region // THUMB
    means = gray[:, :block * THUMB, :block * THUMB].reshape(n, THUMB, block, THUMB, block).mean(axis=(2, 4))
    return np.clip(np.round(means), 0, 255).astype(np.uint8).reshape(n, THUMB * THUMB)


def _standardise(thumbs: np.ndarray) -> np.ndarray:
    x = thumbs.astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)


def pixel_similarity(a: np.ndarray, b: np.ndarray, shift: int = SHIFT) -> np.ndarray:
    """float32[P]: the best correlation of thumbnail ``a[i]`` with ``b[i]`` or its mirror image, each moved
    by up to ``shift`` pixels either way (``a``, ``b``: uint8[P, T*T]; the border of ``shift`` pixels of
    ``a`` is left out so every offset compares the same number of pixels)."""
    if len(a) > PAIR_CHUNK:   # bounded temporaries: [chunk, T*T] float32 per window
        return np.concatenate([pixel_similarity(a[i:i + PAIR_CHUNK], b[i:i + PAIR_CHUNK], shift)
                               for i in range(0, len(a), PAIR_CHUNK)])
    p, t, m = len(a), THUMB, shift
    if p == 0:
        return np.zeros(0, np.float32)
    ta = a.reshape(p, t, t).astype(np.float32)
    tb = b.reshape(p, t, t).astype(np.float32)
    core = _standardise(ta[:, m:t - m, m:t - m].reshape(p, -1))
    best = np.full(p, -1.0, np.float32)
    for other in (tb, tb[:, :, ::-1]):
        for dy in range(-m, m + 1):
            for dx in range(-m, m + 1):
                window = other[:, m + dy:t - m + dy, m + dx:t - m + dx].reshape(p, -1)
                best = np.maximum(best, np.einsum("pd,pd->p", core, _standardise(window)))
    return best.astype(np.float32)


def candidate_pairs(sims: np.ndarray, rows: np.ndarray, threshold: float) -> pd.DataFrame:
    """Unordered pairs (a < b) among each face's neighbours at cosine >= ``threshold``, each once.

    Args:
        sims, rows: float32[N, k], int64[N, k] neighbours of faces 0..N-1 in the same base.

    Returns:
        Columns a, b (int64 rows), cosine (float32).
    """
    n, k = rows.shape
    keep = (rows >= 0) & (np.nan_to_num(sims, nan=-2.0) >= threshold)
    a = np.repeat(np.arange(n), k)[keep.ravel()]
    b = rows.ravel()[keep.ravel()]
    s = sims.ravel()[keep.ravel()]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = pd.DataFrame({"a": lo, "b": hi, "cosine": s.astype(np.float32)})
    pairs = pairs[pairs["a"] != pairs["b"]]
    return pairs.drop_duplicates(["a", "b"]).sort_values(["a", "b"], ignore_index=True)


def score_duplicates(cosine: np.ndarray, pixels: np.ndarray, settings: DuplicateSettings = DuplicateSettings()
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(score float32[P]: the smaller of the two tests' margins over their thresholds, flagged bool[P])."""
    margin = np.minimum(cosine - settings.cosine_min, pixels - settings.pixel_min).astype(np.float32)
    return margin, (cosine >= settings.cosine_min) & (pixels >= settings.pixel_min)
