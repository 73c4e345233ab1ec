"""Pass 1 of an audit, one CPU task per faces shard: what each face's findings need, without its crop.

A shard's face rows -> decode the stored crops -> sharpness and a 16 x 16 thumbnail -> one Arrow table
(:data:`SCAN_COLUMNS`) back to the driver: keys, identity, box, score, landmarks, embedding, sharpness,
thumbnail. The crops (5 kB each) stay in the task; what returns is about 0.9 kB per face.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from workers import dataset, records
from workers.audit.duplicates import THUMB, thumbnails
from workers.audit.quality import laplacian_sharpness

KEYS = [S.IMAGE_ID, S.URI, S.IDENTITY, S.SHARD, S.FACE_INDEX]
THUMBNAIL = "thumbnail"
SHARPNESS = "sharpness"
SCAN_COLUMNS = [*KEYS, S.BOX, S.SCORE, S.LANDMARKS, S.EMBEDDING, SHARPNESS, THUMBNAIL]


def decode_each(encoded) -> tuple[np.ndarray, np.ndarray]:
    """(uint8[N, S, S, 3] RGB crops, ok bool[N]): crops that do not decode are zeros and not ok."""
    good, ok = records.decode_crops_checked(encoded)
    crops = np.zeros((len(ok), *good.shape[1:]), np.uint8)
    crops[ok] = good
    return crops, ok


def scan_shard(row: dict, *, root: str, all_faces: bool, with_embedding: bool,
               storage_options: dict | None) -> dict:
    """Scan one faces shard (a Ray task).

    Args:
        row: {"shard": name}.
        root: dataset root.
        all_faces: keep every face, not only ``face_index == 0``.
        with_embedding: read the faces table's embedding (False: the driver joins another table's).

    Returns:
        {"shard", "faces", "bad_crops", "table_ipc"}: the rows of :data:`SCAN_COLUMNS` (no embedding
        column without ``with_embedding``) as Arrow IPC; a crop that does not decode gets NaN sharpness
        and a zero thumbnail.
    """
    columns = [*KEYS, S.BOX, S.SCORE, S.LANDMARKS, S.CROP] + ([S.EMBEDDING] if with_embedding else [])
    faces = dataset.read_shard_faces(root, row["shard"], columns, storage_options)
    if not all_faces:
        faces = faces.filter(pc.equal(faces[S.FACE_INDEX], 0))
    crops, ok = decode_each(faces.column(S.CROP))
    sharp = np.where(ok, laplacian_sharpness(crops), np.nan).astype(np.float32)
    thumbs = np.where(ok[:, None], thumbnails(crops), 0).astype(np.uint8)
    table = faces.drop_columns([S.CROP]).append_column(SHARPNESS, pa.array(sharp, pa.float32()))
    thumb_col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(THUMB * THUMB), len(thumbs),
                                                     [None, pa.py_buffer(np.ascontiguousarray(thumbs).tobytes())])
    table = table.append_column(THUMBNAIL, thumb_col)
    return {"shard": row["shard"], "faces": table.num_rows, "bad_crops": int((~ok).sum()),
            "table_ipc": records.table_to_ipc(table)}
