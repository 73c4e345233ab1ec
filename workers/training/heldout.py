"""The held-out protocol of a training run: LFW-like pairs over identities never trained on, per domain.

The pairs are built from the face index alone (no crops); only the faces that the pairs use are read, as
stored JPEG bytes (at most ``folds * pairs_per_fold * 2`` faces, ~5 kB each), and they are decoded, degraded
and embedded one batch at a time, so the chief holds no decoded held-out set however large the dataset.
Each domain (``clean`` and every ``heldout_degrade`` spec) is the same pairs with the crops degraded by
:func:`workers.faces.degrade.degrade` (deterministic per image key), scored with evaluation's own
:func:`workers.evaluation.evaluate.verification_metrics`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

import schemas as S
from workers.evaluation.evaluate import pair_scores, verification_metrics
from workers.evaluation.verification import FOLD, IMAGE1, IMAGE2, SAME, heldout_pairs
from workers.faces.degrade import degrade, parse_degrade
from workers.training.config import CLEAN
from workers.training.data import DataConfig, IdentitySplit, read_face_index, scan_faces
from workers.training.stream import decode_jpegs

#: crops uint8[B, S, S, 3] -> float32[B, D] unit vectors.
EmbedFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class HeldoutSet:
    """The held-out pairs and the stored crops of the faces they use.

    Attributes:
        pairs: pairs table keyed by face keys ``"<image_id>#<face_index>"``.
        keys: object[M] the face keys the pairs use, unique.
        crops: object[M] their stored crop bytes.
    """

    pairs: pd.DataFrame
    keys: np.ndarray
    crops: np.ndarray


def face_keys(index: pd.DataFrame) -> np.ndarray:
    """object[N] ``"<image_id>#<face_index>"`` of face-index rows."""
    return (index[S.IMAGE_ID].astype(str) + "#" + index[S.FACE_INDEX].astype(str)).to_numpy(dtype=object)


def heldout_protocol(names: np.ndarray, keys: np.ndarray, max_folds: int, max_pairs_per_fold: int,
                     seed: int) -> pd.DataFrame | None:
    """An LFW-like pairs table over held-out faces, as large as they allow.

    Uses ``min(max_folds, identities with >= 2 faces, identities // 2)`` folds (every fold needs a same pair
    and a second identity for different pairs) and halves the pairs per fold (kept even) until
    :func:`heldout_pairs` can build them.

    Args:
        names: object[N] identity of each face.
        keys: object[N] unique face keys.
        max_folds, max_pairs_per_fold: the largest protocol wanted.
        seed: pairs seed.

    Returns:
        Pairs table keyed by ``keys``, or None when fewer than 2 folds are possible.
    """
    mapping: dict[str, list[str]] = {}
    for name, key in zip(np.asarray(names).tolist(), np.asarray(keys).tolist()):
        mapping.setdefault(name, []).append(key)
    multi = sum(len(k) >= 2 for k in mapping.values())
    folds = min(max_folds, multi, len(mapping) // 2)
    if folds < 2:
        return None
    per_fold = max_pairs_per_fold - max_pairs_per_fold % 2
    while per_fold >= 2:
        try:
            return heldout_pairs(mapping, mapping.keys(), n_folds=folds, pairs_per_fold=per_fold, seed=seed)
        except ValueError:
            per_fold = (per_fold // 2) - (per_fold // 2) % 2
    return None


def load_heldout(data: DataConfig, split: IdentitySplit, max_folds: int, max_pairs_per_fold: int
                 ) -> HeldoutSet | None:
    """Build the held-out pairs of a split and read the crops of the faces they use (not decoded).

    Returns:
        The set, or None when the held-out identities allow fewer than 2 folds.
    """
    if not split.heldout:
        return None
    index = read_face_index(data, split.heldout)   # only the held-out identities' rows are read
    keys = face_keys(index)
    pairs = heldout_protocol(index[S.IDENTITY].to_numpy(dtype=object), keys, max_folds, max_pairs_per_fold,
                             data.seed)
    if pairs is None:
        return None
    used = pd.Index(pd.unique(pd.concat([pairs[IMAGE1], pairs[IMAGE2]], ignore_index=True)))
    # Read batch by batch as a worker's shard is (a few record batches in flight): one table scan with the
    # default readahead held ~650 MiB of other faces' crops at 1M faces while it filtered them out.
    crops = np.empty(len(used), dtype=object)
    found = np.zeros(len(used), dtype=bool)
    for batch in scan_faces(data, split.heldout, [S.IMAGE_ID, S.FACE_INDEX, S.CROP]):
        position = used.get_indexer(face_keys(batch.select([S.IMAGE_ID, S.FACE_INDEX]).to_pandas()))
        mine = np.nonzero(position >= 0)[0]
        crops[position[mine]] = batch.column(S.CROP).take(mine).to_pylist()
        found[position[mine]] = True
    if not found.all():
        raise ValueError(f"{int((~found).sum())} held-out faces vanished from {data.faces!r} while the "
                         f"run was set up")
    return HeldoutSet(pairs=pairs, keys=used.to_numpy(dtype=object), crops=crops)


def domain_embeddings(heldout: HeldoutSet, embed: EmbedFn, spec: str, batch_size: int) -> np.ndarray:
    """float32[M, D] embeddings of the held-out faces under the domain ``spec``, decoded batch by batch."""
    steps = parse_degrade(spec)
    chunks = []
    for start in range(0, len(heldout.keys), batch_size):
        crops = decode_jpegs(heldout.crops[start:start + batch_size])
        if steps:
            crops = degrade(crops, steps, heldout.keys[start:start + batch_size].tolist())
        chunks.append(np.asarray(embed(crops), dtype=np.float32))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def summarize(metrics: dict, num_pairs: int) -> dict[str, float]:
    """The JSON-friendly numbers of :func:`verification_metrics` kept in metrics rows."""
    accuracy, val = metrics["accuracy"], metrics["val_at_far"]
    return {"accuracy": accuracy["mean"], "accuracy_std": accuracy["std"], "val": val["val"],
            "val_std": val["val_std"], "far": val["far"], "far_target": float(val["far_target"]),
            "num_pairs": int(num_pairs), "num_folds": int(len(accuracy["folds"]))}


def heldout_metrics(heldout: HeldoutSet, embed: EmbedFn, domains: Sequence[str], far_target: float,
                    batch_size: int = 128) -> dict[str, dict[str, float]]:
    """Verification of ``embed`` on the held-out pairs, per domain.

    Returns:
        ``{domain: {accuracy, accuracy_std, val, val_std, far, far_target, num_pairs, num_folds}}`` with
        ``clean`` first.
    """
    out = {}
    same = heldout.pairs[SAME].to_numpy(bool)
    folds = heldout.pairs[FOLD].to_numpy(np.int64)
    for spec in (CLEAN, *[d for d in domains if d != CLEAN]):
        embeddings = domain_embeddings(heldout, embed, spec, batch_size)
        scores, valid = pair_scores(heldout.pairs, heldout.keys, embeddings)
        out[spec] = summarize(verification_metrics(scores, same, folds, valid, far_target), len(heldout.pairs))
    return out


def domain_column(spec: str) -> str:
    """Metrics-row prefix of a domain: ``heldout_`` for clean, ``heldout_lowres16_`` for ``lowres:16``."""
    if spec == CLEAN:
        return "heldout_"
    return "heldout_" + "".join(c if c.isalnum() else "_" for c in spec.replace(":", "")).strip("_") + "_"


def flatten(metrics: dict[str, dict[str, float]] | None) -> dict[str, float]:
    """``{domain: values}`` -> ``{heldout_accuracy, ..., heldout_lowres16_accuracy, ...}``."""
    return {f"{domain_column(spec)}{k}": v for spec, values in (metrics or {}).items() for k, v in values.items()}
