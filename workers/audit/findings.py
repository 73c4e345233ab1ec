"""The audit's tables from the scanned faces and their neighbours (pure numpy/pandas/pyarrow).

Inputs are the driver's arrays after both passes: ``faces`` (the scan table without embedding and
thumbnail), unit ``embeddings`` float32[N, D], ``thumbs`` uint8[N, T*T], identity ``codes`` int64[N]
with their ``names``, and the search results of :func:`workers.audit.search.unpack_results`.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

import schemas as S
from workers.audit.clusters import ClusterSettings, cluster_faces
from workers.audit.duplicates import DuplicateSettings, candidate_pairs, pixel_similarity, score_duplicates
from workers.audit.labels import LabelSettings, identity_splits, label_suspects
from workers.audit.quality import QualitySettings, quality_parts, quality_score
from workers.audit.scan import KEYS, SHARPNESS

A = S.audit


def _keys(faces: pa.Table, rows: np.ndarray | None = None, suffix: str = "") -> dict:
    take = faces if rows is None else faces.take(pa.array(rows, pa.int64()))
    return {k + suffix: take.column(k) for k in KEYS}


def _with_run(columns: dict, n: int, run_id: str) -> pa.Table:
    return pa.table({**columns, S.RUN_ID: pa.array([run_id] * n, pa.string())})


def labels_table(faces: pa.Table, own: np.ndarray, other_code: np.ndarray, other_cosine: np.ndarray,
                 names: np.ndarray, codes: np.ndarray, settings: LabelSettings, run_id: str) -> pa.Table:
    """One row per face with an identity: own/other cosines, the other identity, score, flagged."""
    rows = np.flatnonzero(codes >= 0)
    score, flagged = label_suspects(own[rows], other_cosine[rows], settings)
    other = np.where(other_code[rows] >= 0, names[np.maximum(other_code[rows], 0)], None)
    return _with_run({**_keys(faces, rows), A.OWN_COSINE: pa.array(own[rows], pa.float32(), from_pandas=True),
                      A.OTHER_IDENTITY: pa.array(other, pa.string()),
                      A.OTHER_COSINE: pa.array(other_cosine[rows], pa.float32(), from_pandas=True),
                      A.SCORE_: pa.array(score, pa.float32(), from_pandas=True),
                      A.FLAGGED: pa.array(flagged, pa.bool_())}, len(rows), run_id)


def identities_table(embeddings: np.ndarray, codes: np.ndarray, centres: np.ndarray, names: np.ndarray,
                     settings: LabelSettings, run_id: str) -> pa.Table:
    """One row per identity: its faces and, where it has enough of them, its best 2-way split."""
    faces = np.bincount(codes[codes >= 0], minlength=len(names))
    split = identity_splits(embeddings, codes, centres, settings).set_index("code")
    table = pd.DataFrame({"code": np.arange(len(names))}).join(split, on="code")
    sizes = [None if not isinstance(s, np.ndarray) else [int(x) for x in s] for s in table["group_sizes"]]
    flagged = table["flagged"].fillna(False).astype(bool).to_numpy()
    return _with_run({S.IDENTITY: pa.array(names, pa.string()), A.FACES_: pa.array(faces, pa.int32()),
                      A.GROUP_SIZES: pa.array(sizes, pa.list_(pa.int32())),
                      A.SPLIT_COSINE: pa.array(table["split_cosine"].to_numpy(np.float32), from_pandas=True),
                      A.GROUP_COHESION: pa.array(table["group_cohesion"].to_numpy(np.float32), from_pandas=True),
                      A.SCORE_: pa.array(table["score"].to_numpy(np.float32), from_pandas=True),
                      A.FLAGGED: pa.array(flagged, pa.bool_())}, len(names), run_id)


def duplicate_pairs(sims: np.ndarray, rows: np.ndarray, thumbs: np.ndarray, settings: DuplicateSettings
                    ) -> pd.DataFrame:
    """Candidate pairs among the faces (columns a, b, cosine, pixels, score, flagged)."""
    pairs = candidate_pairs(sims, rows, settings.candidate)
    pairs["pixels"] = pixel_similarity(thumbs[pairs["a"].to_numpy()], thumbs[pairs["b"].to_numpy()])
    pairs["score"], pairs["flagged"] = score_duplicates(pairs["cosine"].to_numpy(), pairs["pixels"].to_numpy(),
                                                        settings)
    return pairs


def duplicates_table(faces: pa.Table, pairs: pd.DataFrame, run_id: str, against: pa.Table | None = None,
                     leaks: pd.DataFrame | None = None) -> pa.Table:
    """Rows of candidate pairs (``a`` < ``b`` within the faces) and of leak pairs (``a`` a face, ``b`` a
    row of ``against``), with their kind: same_identity, cross_identity or leak."""
    parts = []
    for frame, other, leak in ((pairs, faces, False), (leaks, against, True)):
        if frame is None or other is None or not len(frame):
            continue
        a, b = frame["a"].to_numpy(np.int64), frame["b"].to_numpy(np.int64)
        ka, kb = _keys(faces, a, "_a"), _keys(other, b, "_b")
        if leak:
            kind = np.full(len(a), A.DUP_LEAK, object)
        else:
            ia, ib = ka[S.IDENTITY + "_a"].to_pandas(), kb[S.IDENTITY + "_b"].to_pandas()
            same = (ia.fillna("\0") == ib.fillna("\0")).to_numpy()
            kind = np.where(same, A.DUP_SAME_IDENTITY, A.DUP_CROSS_IDENTITY)
        parts.append(_with_run({**ka, **kb, A.COSINE: pa.array(frame["cosine"].to_numpy(np.float32)),
                                A.PIXEL_SIMILARITY: pa.array(frame["pixels"].to_numpy(np.float32)),
                                A.KIND: pa.array(kind.astype(str), pa.string()),
                                A.SCORE_: pa.array(frame["score"].to_numpy(np.float32)),
                                A.FLAGGED: pa.array(frame["flagged"].to_numpy(bool))}, len(a), run_id))
    if not parts:
        return A.DUPLICATES_SCHEMA.empty_table()
    return pa.concat_tables([p.cast(A.DUPLICATES_SCHEMA) for p in parts])


def quality_table(faces: pa.Table, settings: QualitySettings, run_id: str) -> pa.Table:
    """One row per face: the raw measures, their [0, 1] parts, the score and flagged (score < threshold)."""
    def fixed(name: str, width: int) -> np.ndarray:
        return faces.column(name).combine_chunks().flatten().to_numpy().reshape(-1, width)

    measures = quality_parts(fixed(S.BOX, 4), faces.column(S.SCORE).to_numpy(), fixed(S.LANDMARKS, 10),
                             faces.column(SHARPNESS).to_numpy(zero_copy_only=False))
    score, parts = quality_score(measures, settings)
    score = np.where(np.isnan(measures["sharpness"]), 0.0, score).astype(np.float32)  # undecodable crop
    cols = {**_keys(faces), **{k: pa.array(v, pa.float32(), from_pandas=True) for k, v in measures.items()},
            **{f"q_{k}": pa.array(v, pa.float32()) for k, v in parts.items()},
            A.SCORE_: pa.array(score, pa.float32()), A.FLAGGED: pa.array(score < settings.flag_below, pa.bool_())}
    return _with_run(cols, faces.num_rows, run_id)


def clusters_table(faces: pa.Table, embeddings: np.ndarray, sims: np.ndarray, rows: np.ndarray,
                   settings: ClusterSettings, run_id: str) -> pa.Table:
    """One row per face: its cluster id (0.. in face order) and confidence."""
    labels, confidence = cluster_faces(embeddings, sims, rows, settings)
    return _with_run({**_keys(faces), A.CLUSTER: pa.array(labels, pa.int64()),
                      A.CONFIDENCE: pa.array(confidence, pa.float32(), from_pandas=True)}, faces.num_rows, run_id)
