"""Training data from a ``faces`` table: which identities train, which are held out, and their crops.

Pure pandas/numpy on top of :mod:`workers.dataset`; no Ray, no torch. Every training worker may call
:func:`load_faces` itself (the faces table of a fine-tuning set is small); it keeps the decoded crops in
memory as ``uint8[N, 112, 112, 3]``, about 37.6 kB per face: 0.5 GB for LFW's 13k faces, 12 GB for
VGGFace2's 330k, per worker. Beyond a few hundred thousand faces per node this should become a Ray Data
stream (``ray.train.get_dataset_shard``) instead of one in-memory copy per worker.

Rules:

* one face per image (``face_index == 0``, the first face the detector kept) unless ``all_faces``;
* faces without an identity are ignored;
* identities named in the ``--exclude-pairs`` file (e.g. LFW ``pairs.txt``) are dropped entirely, so a
  later LFW evaluation never sees a face it was trained on;
* only identities with at least ``min_faces`` (2) faces can train; of those, a seeded
  ``heldout_fraction`` is held out, and the held-out identities plus the single-face ones (never
  trainable) form the held-out verification set.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

import schemas as S
from workers import dataset
from workers.evaluation.verification import pair_identities, read_pairs, split_identities
from workers.records import decode_crops


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the faces come from and how identities are split.

    Attributes:
        faces: dataset root written by ``prepare`` (local or ``s3://``), holding a ``faces`` table.
        exclude_pairs: an LFW-style pairs file whose identities must never be trained on (or None).
        heldout_fraction: share of the trainable identities held out for verification, in [0, 1).
        seed: seed of the held-out split.
        min_faces: identities need at least this many faces to train (>= 2).
        all_faces: use every detected face of an image, not only ``face_index == 0``.
        storage_options: fsspec options (e.g. ``endpoint_url``) as ``(key, value)`` pairs.
    """

    faces: str
    exclude_pairs: str | None = None
    heldout_fraction: float = 0.2
    seed: int = 0
    min_faces: int = 2
    all_faces: bool = False
    storage_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.min_faces < 2:
            raise ValueError(f"min_faces must be >= 2, got {self.min_faces}")


@dataclasses.dataclass(frozen=True)
class IdentitySplit:
    """Disjoint identity sets of one training run (names sorted).

    Attributes:
        train: identities trained on; label ``i`` is ``train[i]``.
        heldout: identities never trained on, for verification: the held-out share of the trainable
            identities followed by the single-face identities (usable in different pairs only).
        excluded: identities of the faces table dropped because the pairs file names them.
        num_faces_train: faces of the training identities.
        num_faces_heldout: faces of the held-out identities.
    """

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    excluded: tuple[str, ...]
    num_faces_train: int
    num_faces_heldout: int

    def to_dict(self) -> dict:
        return {"train": list(self.train), "heldout": list(self.heldout), "excluded": list(self.excluded),
                "num_faces_train": self.num_faces_train, "num_faces_heldout": self.num_faces_heldout}


@dataclasses.dataclass(frozen=True, eq=False)
class FaceSet:
    """Decoded faces of a set of identities.

    Attributes:
        crops: uint8[N, H, W, 3] RGB aligned crops.
        labels: int64[N], index into ``identities``.
        identities: names; ``identities[labels[i]]`` is face ``i``'s identity.
        keys: str[N] (object array), unique face keys ``"<image_id>#<face_index>"``.
    """

    crops: np.ndarray
    labels: np.ndarray
    identities: tuple[str, ...]
    keys: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def excluded_identities(pairs_path: str | None) -> set[str]:
    """Identity names of a pairs file (``read_pairs`` layout), or an empty set for None."""
    if not pairs_path:
        return set()
    return pair_identities(read_pairs(pairs_path))


def read_face_index(cfg: DataConfig) -> pd.DataFrame:
    """The faces usable for training or evaluation, without their crops.

    Returns:
        DataFrame with columns ``image_id``, ``identity``, ``face_index`` (one row per kept face: a
        non-null identity, and ``face_index == 0`` unless ``cfg.all_faces``), sorted by image_id then
        face_index.

    Raises:
        ValueError: the dataset holds no faces with an identity.
    """
    columns = [S.IMAGE_ID, S.IDENTITY, S.FACE_INDEX]
    table = dataset.read_table(cfg.faces, S.FACES, dict(cfg.storage_options), columns=columns)
    frame = _keep_rows(table.to_pandas())
    if frame.empty:
        raise ValueError(f"{cfg.faces!r} holds no faces with an identity in its {S.FACES!r} table "
                         f"({table.num_rows} face rows in all); prepare it from an <identity>/<image> "
                         f"tree or a manifest with an {S.IDENTITY!r} column")
    return frame if cfg.all_faces else frame[frame[S.FACE_INDEX] == 0].reset_index(drop=True)


def _keep_rows(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame[frame[S.IDENTITY].notna()]
    return frame.sort_values([S.IMAGE_ID, S.FACE_INDEX], ignore_index=True)


def split_faces(index: pd.DataFrame, cfg: DataConfig, exclude: set[str] | frozenset[str] = frozenset()
                ) -> IdentitySplit:
    """Split the identities of a face index into train / held-out / excluded.

    Args:
        index: rows of :func:`read_face_index` (columns ``identity``, ...).
        cfg: ``heldout_fraction``, ``seed``, ``min_faces``.
        exclude: identity names never to use.

    Returns:
        The split; depends only on the identities and their face counts, the fraction and the seed.

    Raises:
        ValueError: no identity has ``min_faces`` faces after exclusion.
    """
    counts = index[S.IDENTITY].value_counts()
    excluded = sorted(set(counts.index) & set(exclude))
    counts = counts.drop(excluded)
    trainable = counts[counts >= cfg.min_faces]
    singles = sorted(counts.index[counts < cfg.min_faces])
    if trainable.empty:
        raise ValueError(f"no identity has >= {cfg.min_faces} faces ({len(counts)} identities left after "
                         f"excluding {len(excluded)} named by the pairs file); nothing to train on")
    train, heldout = split_identities(trainable.index, cfg.heldout_fraction, cfg.seed)
    heldout_all = (*heldout, *singles)
    return IdentitySplit(train=tuple(train), heldout=heldout_all, excluded=tuple(excluded),
                         num_faces_train=int(counts[train].sum()),
                         num_faces_heldout=int(counts[list(heldout_all)].sum()))


def plan_split(cfg: DataConfig) -> IdentitySplit:
    """:func:`read_face_index` then :func:`split_faces` with the identities of ``cfg.exclude_pairs``."""
    return split_faces(read_face_index(cfg), cfg, excluded_identities(cfg.exclude_pairs))


def load_faces(cfg: DataConfig, identities: tuple[str, ...] | list[str]) -> FaceSet:
    """Read and decode the faces of ``identities`` (same row rules as :func:`read_face_index`).

    Args:
        cfg: where the faces are.
        identities: names to keep; their order defines the labels.

    Returns:
        FaceSet with faces sorted by image_id then face_index; an identity without faces simply has
        no rows.
    """
    columns = [S.IMAGE_ID, S.IDENTITY, S.FACE_INDEX, S.CROP]
    table = dataset.read_table(cfg.faces, S.FACES, dict(cfg.storage_options), columns=columns)
    frame = table.select([S.IMAGE_ID, S.IDENTITY, S.FACE_INDEX]).to_pandas()
    frame["_row"] = np.arange(len(frame))
    frame = _keep_rows(frame)
    if not cfg.all_faces:
        frame = frame[frame[S.FACE_INDEX] == 0]
    lookup = pd.Index(list(identities))
    labels = lookup.get_indexer(frame[S.IDENTITY].to_numpy(dtype=object))
    keep = labels >= 0
    frame, labels = frame[keep], labels[keep]
    crops = decode_crops(table.column(S.CROP).take(frame["_row"].to_numpy()))
    keys = frame[S.IMAGE_ID].astype(str) + "#" + frame[S.FACE_INDEX].astype(str)
    return FaceSet(crops=crops, labels=labels.astype(np.int64), identities=tuple(identities),
                   keys=keys.to_numpy(dtype=object))
