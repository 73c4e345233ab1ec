"""Synthetic faces datasets (re-labelled LFW rows, committed as a real facemill dataset) and the split and
shards jobs.train will compute on them."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from workers import dataset, records
from workers.training.data import DataConfig, read_face_index, split_faces
from workers.training.stream import plan_shards

from train_bench.config import BenchConfig


def _relabel(table: pa.Table, columns: dict[str, list]) -> pa.Table:
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


def _source(lfw: str) -> tuple[pa.Table, pa.Table, int]:
    """(image rows, face rows) of LFW's first faces with an identity, row-aligned, sorted by image_id; D."""
    faces = dataset.read_table(lfw, S.RECORDS, filter=(pc.field(S.FACE_INDEX) == 0) & pc.field(S.IDENTITY).is_valid())
    faces = faces.take(pc.sort_indices(faces, sort_keys=[(S.IMAGE_ID, "ascending")]))
    images = dataset.read_table(lfw, S.RECORDS, filter=pc.field(S.FACE_INDEX) == S.IMAGE_ROW)
    owner = pd.Index(images.column(S.IMAGE_ID).to_numpy(zero_copy_only=False)).get_indexer(
        faces.column(S.IMAGE_ID).to_numpy(zero_copy_only=False))
    images = images.take(pa.array(owner)).set_column(images.schema.get_field_index(S.NUM_FACES), S.NUM_FACES,
                                                     pa.array(np.ones(len(owner), np.int32)))
    return images, faces, int(dataset.read_marker(lfw)["embedding_dim"])


def synthetic_dataset(cfg: BenchConfig, size: int, log=print) -> tuple[str, pd.Series]:
    """Build (or reuse) the synthetic dataset of ``size`` faces.

    Returns:
        (dataset root, int64 JPEG bytes per identity, indexed by identity name).
    """
    root, meta_path = Path(cfg.work) / f"synthetic-{size}", Path(cfg.work) / f"synthetic-{size}.json"
    per = cfg.faces_per_identity
    want = {"faces": size, "faces_per_identity": per, "source": cfg.lfw,
            "source_version": dataset.table_version(dataset.records_uri(cfg.lfw))}
    names = [f"syn{k:07d}" for k in range(-(-size // per))]
    if meta_path.exists() and dataset.read_marker(str(root)) is not None:
        meta = json.loads(meta_path.read_text())
        if ({k: meta.get(k) for k in want} == want
                and dataset.read_table(str(root), S.FACES, columns=[S.FACE_INDEX]).num_rows == size):
            log(f"  reusing {root}")
            return str(root), pd.Series(np.asarray(meta["identity_bytes"], np.int64), index=names)
    meta_path.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    images, faces, dim = _source(cfg.lfw)
    m = faces.num_rows
    dataset.create_dataset(str(root), dim)
    for c, start in enumerate(range(0, size, cfg.chunk)):
        i = np.arange(start, min(size, start + cfg.chunk))
        ident = [names[k] for k in (i // per).tolist()]
        uris = [f"synthetic://{n}/{j}.jpg" for n, j in zip(ident, (i % per).tolist())]
        cols = {S.IMAGE_ID: records.image_ids(uris), S.URI: uris, S.IDENTITY: ident, S.SHARD: [f"syn-{c:05d}"] * len(i)}
        src = pa.array(i % m)
        dataset.commit_records(str(root), pa.concat_tables([_relabel(images.take(src), cols),
                                                            _relabel(faces.take(src), cols)]))
        log(f"  built {i[-1] + 1}/{size} faces ({time.perf_counter() - t0:.0f} s)")
    lengths = pc.binary_length(faces.column(S.CROP)).to_numpy().astype(np.int64)
    i = np.arange(size)
    identity_bytes = np.bincount(i // per, weights=lengths[i % m], minlength=len(names)).astype(np.int64)
    meta_path.write_text(json.dumps({**want, "source_faces": m, "identity_bytes": identity_bytes.tolist()}))
    return str(root), pd.Series(identity_bytes, index=names)


def lfw_identity_bytes(root: str) -> pd.Series:
    table = dataset.read_table(root, S.FACES, columns=[S.IDENTITY, S.CROP], filter=pc.field(S.FACE_INDEX) == 0)
    lengths = pd.Series(pc.binary_length(table.column(S.CROP)).to_numpy().astype(np.int64))
    return lengths.groupby(table.column(S.IDENTITY).to_numpy(zero_copy_only=False)).sum()


def plan(cfg: BenchConfig, root: str, identity_bytes: pd.Series | None = None) -> dict:
    """The split and shards jobs.train will compute (same seed and fraction), and each worker's JPEG share."""
    index = read_face_index(DataConfig(faces=root))
    counts = index[S.IDENTITY].value_counts()
    fraction = min(0.5, cfg.heldout_identities / max(1, int((counts >= 2).sum())))
    data = DataConfig(faces=root, heldout_fraction=fraction, seed=cfg.seed)
    split = split_faces(index, data)
    owner, _ = plan_shards(split, cfg.workers, cfg.people_per_batch, cfg.seed, cfg.steps)
    per_identity = (identity_bytes if identity_bytes is not None else counts * 0).reindex(list(split.train))
    return {"data": data, "split": split, "faces": len(index), "identities": len(counts),
            "train_identities": len(split.train), "heldout_fraction": fraction,
            "share_bytes": [int(per_identity.to_numpy()[owner == w].sum()) for w in range(cfg.workers)],
            "share_faces": [int(np.asarray(split.train_counts)[owner == w].sum()) for w in range(cfg.workers)]}
