"""Verification of a faces dataset on a pairs protocol (LFW ``pairs.txt`` or held-out pairs).

Glue between storage and :mod:`workers.evaluation.verification`: read one embedding per image (the
faces table's own, or an ``embeddings/<name>`` table written by ``reprocess``), map each pair's image to
a row, score the pairs by cosine similarity and compute the LFW metrics. No Ray: the tables are small
(one 128-float vector per face).

Keys. A pair names its images by a key. LFW files give ``"<name>/<name>_<i:04d>.jpg"``, which is the
last two path components of the image's uri (:func:`image_keys`); held-out pairs tables may instead
give ``image_id`` values (:func:`pair_key_kind` tells them apart).

Several faces in one image: the face whose box centre is nearest the image centre is used
(:func:`nearest_centre_faces`), as LFW images are centred on the labelled person.

A pair whose image is absent from the dataset, or has no face, counts as wrong, everywhere: in the
k-fold accuracy and VAL (via ``valid``) and in the ROC / AUC (it gets the worst possible score).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

import schemas as S
from workers import dataset, plots, storage
from workers.evaluation import verification as V

KEY_PATH = "path"          # pair keys are "<identity>/<file>" (the uri's last two components)
KEY_IMAGE_ID = "image_id"  # pair keys are schemas.IMAGE_ID values
_IMAGE_ID_RE = re.compile(r"^[0-9a-f]{16}$")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """One evaluation run.

    Attributes:
        faces: dataset root written by prepare (local or s3://).
        pairs: pairs file: LFW text layout (``pairs.txt``) or a ``.csv`` / ``.parquet`` pairs table
            with the columns of :data:`verification.PAIR_COLUMNS`.
        output: folder for ``eval.json`` and ``roc.png`` (local or s3://).
        embeddings: name of an ``embeddings/<name>`` table of ``faces``; "" uses the faces table's own.
        folds: evaluate only the first ``folds`` folds of the file (0: all).
        far_target: false accept rate of the VAL@FAR metric.
        degrade: evaluate on a degraded domain (``lowres:16``, ``jpeg:10+gray``, ``mask``, ``blur:2``;
            :func:`workers.faces.degrade.parse_degrade`): the chosen faces' stored crops are degraded per
            image and re-embedded with ``embedder``. "" uses the stored embeddings.
        embedder: the model that embeds degraded crops (registry name or exported directory).
        storage_options: fsspec options (e.g. endpoint_url).
    """

    faces: str
    pairs: str
    output: str
    embeddings: str = ""
    folds: int = 0
    far_target: float = 1e-3
    degrade: str = ""
    embedder: str = "sface"
    storage_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.degrade:
            from workers.faces.degrade import parse_degrade

            parse_degrade(self.degrade)
            if self.embeddings:
                raise ValueError("--degrade re-embeds the stored crops with --embedder; it does not combine "
                                 "with --embeddings")
        if self.folds < 0:
            raise ValueError(f"folds must be >= 0 (0: all), got {self.folds}")
        if not 0.0 < self.far_target < 1.0:
            raise ValueError(f"far_target must be in (0, 1), got {self.far_target}")


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------

def image_keys(uris) -> np.ndarray:
    """Pair keys of image uris: their last two path components, ``".../Name/Name_0001.jpg"`` ->
    ``"Name/Name_0001.jpg"`` (a uri with one component is its own key).

    Args:
        uris: str[N] local paths or URLs (``/`` separated).

    Returns:
        object[N] of str.
    """
    parts = pd.Series(np.asarray(uris, dtype=object), dtype=object).str.rsplit("/", n=2)
    return parts.map(lambda p: "/".join(p[-2:])).to_numpy(dtype=object)


def pair_key_kind(pairs: pd.DataFrame) -> str:
    """:data:`KEY_IMAGE_ID` when every image key of ``pairs`` is an image id (16 hex digits), else
    :data:`KEY_PATH`."""
    keys = pd.concat([pairs[V.IMAGE1], pairs[V.IMAGE2]]).astype(str)
    return KEY_IMAGE_ID if len(keys) and keys.str.match(_IMAGE_ID_RE).all() else KEY_PATH


def nearest_centre_faces(groups: np.ndarray, boxes: np.ndarray, widths: np.ndarray, heights: np.ndarray,
                         face_index: np.ndarray) -> np.ndarray:
    """For each image, the face whose box centre is nearest the image centre.

    Args:
        groups: int[F] image of each face (any integer codes).
        boxes: float[F, 4], x1 y1 x2 y2 in pixels of the original image.
        widths, heights: float[F] size of each face's image in pixels (NaN where unknown: such faces
            lose to any face of known distance, then ties go to the lowest ``face_index``).
        face_index: int[F] face number within its image (tie-break).

    Returns:
        int64[G] rows (into the F faces) of the chosen face of each of the G distinct groups, in
        ascending group order.
    """
    groups = np.asarray(groups)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not groups.shape[0] == boxes.shape[0] == len(widths) == len(heights) == len(face_index):
        raise ValueError(f"groups, boxes, widths, heights, face_index need one length, got {groups.shape[0]}, "
                         f"{boxes.shape[0]}, {len(widths)}, {len(heights)}, {len(face_index)}")
    dx = (boxes[:, 0] + boxes[:, 2]) / 2 - np.asarray(widths, dtype=np.float64) / 2
    dy = (boxes[:, 1] + boxes[:, 3]) / 2 - np.asarray(heights, dtype=np.float64) / 2
    order = np.lexsort((np.asarray(face_index), dx * dx + dy * dy, groups))  # NaN distances sort last
    sorted_groups = groups[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = sorted_groups[1:] != sorted_groups[:-1]
    return order[first].astype(np.int64)


def pair_scores(pairs: pd.DataFrame, keys: np.ndarray, embeddings: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Cosine score of each pair.

    Args:
        pairs: pairs table.
        keys: str[M] unique keys of the rows of ``embeddings`` (convention of the pairs' image keys).
        embeddings: float[M, D].

    Returns:
        (scores float64[N], NaN where invalid; valid bool[N], False where an image is missing).
    """
    index1, index2, valid = V.lookup_pairs(pairs, keys)
    scores = np.full(len(pairs), np.nan)
    if valid.any():
        scores[valid] = V.cosine_scores(embeddings[index1[valid]], embeddings[index2[valid]])
    return scores, valid & np.isfinite(scores)


def verification_metrics(scores: np.ndarray, same: np.ndarray, folds: np.ndarray, valid: np.ndarray,
                         far_target: float = 1e-3) -> dict:
    """k-fold accuracy, VAL@FAR (thresholds chosen on the other folds) and ROC of scored pairs.

    Invalid pairs count as wrong: in accuracy and VAL by ``valid``; in the ROC by a worst-case score
    (below every valid score for a same pair, above for a different pair).

    Args:
        scores: float[N] similarities (NaN where not ``valid``).
        same: bool[N].
        folds: int[N], at least two distinct folds.
        valid: bool[N].
        far_target: false accept rate of VAL.

    Returns:
        dict: ``accuracy`` and ``val_at_far`` (the dicts of :func:`verification.kfold_accuracy` and
        :func:`verification.val_at_far`), ``auc`` (float) and ``roc`` ((fpr, tpr, thresholds)).
    """
    same = np.asarray(same, dtype=bool)
    accuracy = V.kfold_accuracy(scores, same, folds, valid)
    val = V.val_at_far(scores, same, far_target, folds=folds, valid=valid)
    worst = np.where(same, -2.0, 2.0)  # cosine scores lie in [-1, 1]
    roc_scores = np.where(valid, scores, worst)
    roc = V.roc_curve(roc_scores, same)
    return {"accuracy": accuracy, "val_at_far": val, "auc": V.roc_auc(roc_scores, same), "roc": roc}


# --------------------------------------------------------------------------------------------------
# Reading the dataset
# --------------------------------------------------------------------------------------------------

def load_pairs(path: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Read a pairs protocol: LFW text layout, or a ``.csv`` / ``.parquet`` pairs table.

    Raises:
        ValueError: a malformed file (the message names it), or a table without the pair columns.
        FileNotFoundError: no such file.
    """
    fs, fpath = storage.url_to_fs(path, storage_options)
    if not fs.exists(fpath):
        raise FileNotFoundError(f"pairs file {path!r} does not exist")
    if fs.isdir(fpath):
        raise ValueError(f"pairs file {path!r} is a folder; give the pairs file itself (e.g. pairs.txt)")
    lower = fpath.lower()
    if lower.endswith((".csv", ".parquet")):
        with fs.open(fpath, "rb") as f:
            frame = pd.read_parquet(f) if lower.endswith(".parquet") else pd.read_csv(f)
        absent = [c for c in V.PAIR_COLUMNS if c not in frame.columns]
        if absent:
            raise ValueError(f"pairs table {path!r} lacks columns {absent} (has {list(frame.columns)})")
        frame = frame[list(V.PAIR_COLUMNS)].astype({V.FOLD: np.int64, V.SAME: bool})
        return frame.astype({c: str for c in (V.NAME1, V.IMAGE1, V.NAME2, V.IMAGE2)})
    text = fs.cat_file(fpath).decode()
    try:
        return V.read_pairs(text if "\n" in text else text + "\n")
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}".replace("<text>: ", "")) from exc


def first_folds(pairs: pd.DataFrame, folds: int) -> pd.DataFrame:
    """The pairs of the first ``folds`` fold ids (sorted); all pairs when ``folds`` is 0."""
    if not folds:
        return pairs
    keep = np.unique(pairs[V.FOLD].to_numpy())[:folds]
    return pairs[pairs[V.FOLD].isin(keep)].reset_index(drop=True)


def _fixed_list_numpy(column: pa.ChunkedArray, width: int | None = None) -> np.ndarray:
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    width = width or arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def image_embeddings(root: str, embeddings: str = "", storage_options: dict | None = None, degrade: str = "",
                     embedder: str = "sface") -> dict:
    """One embedding per image of a dataset (the face nearest the image centre).

    Args:
        root: dataset root.
        embeddings: an ``embeddings/<name>`` table name, or "" for the faces table's own embeddings.
        storage_options: fsspec options.
        degrade: a degradation spec: the chosen faces' crops are degraded and re-embedded with ``embedder``
            (:func:`workers.evaluation.degraded.degraded_embeddings`); "" keeps the stored vectors.
        embedder: the model for ``degrade``.

    Returns:
        dict with ``path_keys`` and ``image_ids`` (object[M] each, unique), ``face_index`` (int[M], the
        chosen face of each image), ``embeddings``
        float32[M, D], ``embedder`` (sorted list of "name@version" in the table), ``faces`` (rows read)
        and ``duplicate_keys`` (images dropped because another uri had the same path key).

    Raises:
        ValueError: ``embeddings`` names a table that holds nothing.
    """
    dataset.require_dataset(root, storage_options)
    faces = dataset.read_table(root, S.FACES, storage_options,
                               columns=[S.IMAGE_ID, S.URI, S.SHARD, S.FACE_INDEX, S.BOX, S.EMBEDDING,
                                        S.EMBEDDER, S.EMBEDDER_VERSION])
    if embeddings:
        vectors = dataset.read_embeddings(root, embeddings, storage_options,
                                          columns=[S.IMAGE_ID, S.SHARD, S.FACE_INDEX, S.EMBEDDING,
                                                   S.EMBEDDER, S.EMBEDDER_VERSION])
        if vectors.num_rows == 0 and faces.num_rows:
            known = dataset.list_embeddings(root, storage_options)
            raise ValueError(f"embeddings table {embeddings!r} of {root!r} is empty or missing "
                             f"(known: {known}); run `python -m jobs.reprocess --output {root} --embedder ...`")
        faces = _join_faces(faces.drop_columns([S.EMBEDDING, S.EMBEDDER, S.EMBEDDER_VERSION]), vectors)
    images = dataset.read_table(root, S.IMAGES, storage_options,
                                columns=[S.IMAGE_ID, S.WIDTH, S.HEIGHT])
    n = faces.num_rows
    if n == 0:
        dim = S.EMBEDDING_DIM
        return {"path_keys": np.zeros(0, object), "image_ids": np.zeros(0, object), "face_index": np.zeros(0, int),
                "embeddings": np.zeros((0, dim), np.float32), "embedder": [], "faces": 0, "duplicate_keys": 0}
    ids = faces.column(S.IMAGE_ID).to_numpy(zero_copy_only=False).astype(object)
    size = pd.DataFrame({S.IMAGE_ID: images.column(S.IMAGE_ID).to_numpy(zero_copy_only=False),
                         S.WIDTH: images.column(S.WIDTH).to_pandas().astype("float64"),
                         S.HEIGHT: images.column(S.HEIGHT).to_pandas().astype("float64")})
    size = size.drop_duplicates(S.IMAGE_ID).set_index(S.IMAGE_ID)
    widths = size[S.WIDTH].reindex(ids).to_numpy()
    heights = size[S.HEIGHT].reindex(ids).to_numpy()
    codes, _ = pd.factorize(ids)
    rows = nearest_centre_faces(codes, _fixed_list_numpy(faces.column(S.BOX), 4), widths, heights,
                                faces.column(S.FACE_INDEX).to_numpy())
    if degrade:
        from workers.evaluation.degraded import degraded_embeddings

        vectors = degraded_embeddings(root, ids[rows], faces.column(S.FACE_INDEX).to_numpy()[rows], degrade,
                                      embedder, storage_options)
    else:
        vectors = _fixed_list_numpy(faces.column(S.EMBEDDING))[rows].astype(np.float32)
    uris = faces.column(S.URI).to_numpy(zero_copy_only=False)[rows]
    keys = image_keys(uris)
    unique = ~pd.Series(keys).duplicated().to_numpy()
    embedder = pd.Series(faces.column(S.EMBEDDER).to_pylist()) + "@" + pd.Series(
        faces.column(S.EMBEDDER_VERSION).to_pylist())
    return {"path_keys": keys[unique], "image_ids": ids[rows][unique], "embeddings": vectors[unique],
            "face_index": faces.column(S.FACE_INDEX).to_numpy()[rows][unique],
            "embedder": sorted(embedder.unique().tolist()), "faces": n,
            "duplicate_keys": int((~unique).sum())}


def _join_faces(faces: pa.Table, vectors: pa.Table) -> pa.Table:
    """Faces rows (box, uri) with the embedding of the same face (image_id, shard, face_index) in
    ``vectors``; faces without one are dropped."""
    on = [S.IMAGE_ID, S.SHARD, S.FACE_INDEX]
    left = faces.select(on).to_pandas().assign(_left=np.arange(faces.num_rows))
    right = vectors.select(on).to_pandas().assign(_right=np.arange(vectors.num_rows))
    both = left.merge(right, on=on, how="inner").sort_values("_left")
    out = faces.take(pa.array(both["_left"].to_numpy()))
    picked = vectors.take(pa.array(both["_right"].to_numpy()))
    for name in (S.EMBEDDING, S.EMBEDDER, S.EMBEDDER_VERSION):
        out = out.append_column(picked.schema.field(name), picked.column(name))
    return out


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def run_evaluate(cfg: EvaluateConfig, log=print) -> dict:
    """Evaluate, write ``eval.json`` and ``roc.png`` under ``cfg.output``; returns the eval.json content.

    Raises:
        FileNotFoundError: the pairs file is missing.
        ValueError: a malformed pairs file, fewer than two folds, an unknown embeddings table.
    """
    t0 = time.time()
    opts = dict(cfg.storage_options)
    dataset.require_dataset(cfg.faces, opts)  # before the pairs: a missing dataset is the first thing to say
    pairs = first_folds(load_pairs(cfg.pairs, opts), cfg.folds)
    if pairs[V.FOLD].nunique() < 2:
        raise ValueError(f"{cfg.pairs!r} gives {pairs[V.FOLD].nunique()} fold(s) "
                         f"(--folds {cfg.folds}); the k-fold protocol needs at least 2")
    table = image_embeddings(cfg.faces, cfg.embeddings, opts, degrade=cfg.degrade, embedder=cfg.embedder)
    kind = pair_key_kind(pairs)
    keys = table["image_ids"] if kind == KEY_IMAGE_ID else table["path_keys"]
    scores, valid = pair_scores(pairs, keys, table["embeddings"])
    same = pairs[V.SAME].to_numpy(dtype=bool)
    folds = pairs[V.FOLD].to_numpy(dtype=np.int64)
    m = verification_metrics(scores, same, folds, valid, cfg.far_target)
    wanted = pd.Series(pd.unique(pd.concat([pairs[V.IMAGE1], pairs[V.IMAGE2]])))
    absent = wanted[~wanted.isin(pd.Index(keys))].tolist()
    acc, val = m["accuracy"], m["val_at_far"]
    result = {
        "faces": cfg.faces, "embeddings": cfg.embeddings or S.FACES,
        "embedder": [cfg.embedder] if cfg.degrade else table["embedder"], "degrade": cfg.degrade or "clean",
        "pairs": cfg.pairs, "key": kind, "folds": int(len(acc["folds"])), "num_pairs": int(len(pairs)),
        "num_same": int(same.sum()), "num_missing_pairs": int((~valid).sum()),
        "num_missing_images": len(absent), "missing_images": sorted(absent)[:20],
        "images_with_faces": int(len(keys)), "faces_read": table["faces"],
        "duplicate_keys": table["duplicate_keys"],
        "accuracy": acc["mean"], "accuracy_std": acc["std"], "accuracy_sem": acc["sem"],
        "fold_accuracies": acc["fold_accuracies"].tolist(), "thresholds": acc["thresholds"].tolist(),
        "far_target": cfg.far_target, "val": val["val"], "val_std": val["val_std"], "far": val["far"],
        "far_std": val["far_std"], "auc": m["auc"], "schema_version": S.SCHEMA_VERSION,
        "wall_time_s": round(time.time() - t0, 3),
    }
    label = cfg.embeddings or (table["embedder"][0].split("@")[0] if table["embedder"] else "faces")
    label = f"{cfg.embedder} on {cfg.degrade}" if cfg.degrade else label
    title = f"{Path(cfg.pairs).name}: {result['folds']} folds, {len(pairs)} pairs"
    roc_png = _write_roc(cfg.output, {label: m["roc"]}, title, opts)
    storage.put_atomic(storage.join(cfg.output, "eval.json"), json.dumps(result, indent=2).encode(), opts)
    from workers.report import write_evaluate_report

    report = write_evaluate_report(cfg.output, {**result, "val_at_far": {**val, "far_target": cfg.far_target},
                                                "num_missing": result["num_missing_pairs"]}, roc_png, opts)
    result["eval_json"] = storage.join(cfg.output, "eval.json")
    result["roc_png"] = storage.join(cfg.output, "roc.png")
    result["report"] = report
    log(format_result(result))
    return result


def format_result(r: dict) -> str:
    """The one-line result."""
    return (f"facemill evaluate {r['embeddings']}: accuracy {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} "
            f"({r['folds']} folds, {r['num_pairs']} pairs, {r['num_missing_pairs']} missing), "
            f"VAL@FAR={r['far_target']:g} {r['val']:.4f}, AUC {r['auc']:.4f} -> {r['eval_json']}")


def _write_roc(output: str, curves: dict, title: str, opts: dict) -> bytes:
    """roc.png with a log false-accept axis (the region of VAL@FAR=1e-3 that a linear axis hides)."""
    with tempfile.TemporaryDirectory() as tmp:
        png = plots.plot_roc(curves, os.path.join(tmp, "roc.png"), title=title, log_fpr=True).read_bytes()
    storage.put_atomic(storage.join(output, "roc.png"), png, opts)
    return png
