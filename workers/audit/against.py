"""Train/test leaks: faces of the audited set that are near-copies of an evaluation set's images.

The evaluation set is an LFW-style pairs file (its images are found by their ``<name>/<file>`` key at the
end of a uri, in the audited dataset or another prepared one) or a whole prepared dataset. Pure numpy/pandas.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

import schemas as S
from workers.audit.duplicates import DuplicateSettings, pixel_similarity, score_duplicates


def lfw_keys(uris) -> np.ndarray:
    """object[N]: ``"<folder>/<file>"`` of each uri (the key LFW pairs files name images by)."""
    parts = pd.Series(np.asarray(uris, dtype=object)).str.rsplit("/", n=2)
    return (parts.str[-2] + "/" + parts.str[-1]).to_numpy(dtype=object)


def pair_keys(pairs_path: str) -> set[str]:
    """Every image key named by a pairs file.

    Raises:
        ValueError, FileNotFoundError: the file is malformed or missing (from ``read_pairs``).
    """
    from workers.evaluation.verification import IMAGE1, IMAGE2, read_pairs

    pairs = read_pairs(pairs_path)
    return set(pairs[IMAGE1].tolist()) | set(pairs[IMAGE2].tolist())


def eval_rows(uris, keys: set[str] | None) -> np.ndarray:
    """int64 rows of the faces whose image is one of ``keys`` (every row when ``keys`` is None)."""
    if keys is None:
        return np.arange(len(uris), dtype=np.int64)
    return np.flatnonzero(pd.Index(lfw_keys(uris)).isin(list(keys))).astype(np.int64)


def leak_pairs(sims: np.ndarray, rows: np.ndarray, eval_thumbs: np.ndarray, thumbs: np.ndarray,
               skip: np.ndarray, settings: DuplicateSettings) -> pd.DataFrame:
    """Pairs (a: an audited face, b: an evaluation face) that are the same photo.

    Args:
        sims, rows: float32[Q, k], int64[Q, k]: each evaluation face's nearest audited faces.
        eval_thumbs: uint8[Q, T*T]; thumbs: uint8[N, T*T] of the audited faces.
        skip: bool[N], audited faces that are evaluation images themselves (not leaks of themselves).

    Returns:
        Columns a, b, cosine, pixels, score, flagged; candidates at cosine >= ``settings.candidate``.
    """
    q, k = rows.shape
    keep = (rows >= 0) & (np.nan_to_num(sims, nan=-2.0) >= settings.candidate)
    keep &= ~skip[np.maximum(rows, 0)]
    b = np.repeat(np.arange(q), k)[keep.ravel()]
    a = rows.ravel()[keep.ravel()]
    cosine = sims.ravel()[keep.ravel()].astype(np.float32)
    pixels = pixel_similarity(thumbs[a], eval_thumbs[b]) if len(a) else np.zeros(0, np.float32)
    score, flagged = score_duplicates(cosine, pixels, settings)
    return pd.DataFrame({"a": a, "b": b, "cosine": cosine, "pixels": pixels, "score": score, "flagged": flagged})


def identity_overlap(identities: pa.ChunkedArray, names: set[str], eval_images: np.ndarray) -> dict:
    """How many audited faces belong to an evaluation identity without being one of its images."""
    ids = identities.to_pandas()
    mask = ids.isin(list(names)).to_numpy().copy()
    mask[eval_images] = False
    return {"identities": int(ids[mask].nunique()), "faces": int(mask.sum())}
