"""Row-for-row comparison of two prepare outputs (test helper)."""
from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

import schemas as S
from workers import dataset


def _rel(uri: str) -> str:
    return "/".join(PurePosixPath(uri.split("://")[-1]).parts[-2:])


def tables(root: str, options: dict | None = None):
    images = dataset.read_table(root, S.IMAGES, options).to_pandas()
    faces = dataset.read_table(root, S.FACES, options).to_pandas()
    images["key"] = images[S.URI].map(_rel)
    faces["key"] = faces[S.URI].map(_rel)
    return (images.sort_values("key", ignore_index=True),
            faces.sort_values(["key", S.FACE_INDEX], ignore_index=True))


def assert_same_rows(a_root: str, b_root: str, a_opts: dict | None = None, b_opts: dict | None = None) -> int:
    """Both outputs hold the same images (by identity/file name) and the same faces; returns the row count."""
    (ai, af), (bi, bf) = tables(a_root, a_opts), tables(b_root, b_opts)
    cols = ["key", S.IDENTITY, S.STATUS, S.NUM_FACES, S.WIDTH, S.HEIGHT, S.ERROR]
    assert len(ai) == len(bi), (len(ai), len(bi))
    assert ai[S.URI].is_unique and bi[S.URI].is_unique, "duplicate image rows"
    assert ai[cols].equals(bi[cols])
    assert af["key"].tolist() == bf["key"].tolist() and af[S.FACE_INDEX].tolist() == bf[S.FACE_INDEX].tolist()
    assert np.allclose(np.stack(af[S.BOX]), np.stack(bf[S.BOX]), atol=0.05)
    assert np.allclose(np.stack(af[S.EMBEDDING]), np.stack(bf[S.EMBEDDING]), atol=1e-3)
    return len(ai)


def committed_shards(root: str, options: dict | None = None) -> set[str]:
    """Shards with rows in the dataset's current records (each shard is one Delta commit)."""
    table = dataset.read_table(root, S.IMAGES, options, columns=[S.SHARD])
    return set(table.column(S.SHARD).to_pylist())


def commits(root) -> int:
    """Commits in a local dataset's records log beyond its creation (cheap enough to poll)."""
    from pathlib import Path

    return max(0, len(list((Path(root) / S.RECORDS / "_delta_log").glob("*.json"))) - 1)
