"""Arrow tables of the ``images`` and ``faces`` schemas from whole arrays (no per-row Python objects)."""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa

import schemas as S


def table_to_ipc(table: pa.Table) -> bytes:
    """A table as one Arrow IPC stream (how shard tables travel between Ray stages)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def table_from_ipc(data: bytes) -> pa.Table:
    """Inverse of :func:`table_to_ipc`."""
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def image_ids(uris: list[str]) -> list[str]:
    """Stable image ids: 16 hex digits of sha1(uri)."""
    return [hashlib.sha1(u.encode()).hexdigest()[:16] for u in uris]


def _fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)


def images_table(*, shard: str, uris: list[str], identities: list, fingerprints: list, widths: np.ndarray,
                 heights: np.ndarray, errors: list, details: list, num_faces: np.ndarray, settings: str,
                 run_id: str) -> pa.Table:
    """The ``images`` rows of one shard.

    Args:
        shard: shard key.
        uris, identities, fingerprints, errors, details: per image (errors: None or a schemas.ERR_* reason).
        widths, heights: int[N] (0 where the image failed to decode).
        num_faces: int[N].
        settings: digest of the settings that made the rows (``workers.pipeline.settings_digest``).
        run_id: the run writing these rows.

    Returns:
        Table with schema ``schemas.IMAGES_SCHEMA``.
    """
    n = len(uris)
    err = np.array([e is not None for e in errors], dtype=bool)
    nf = np.asarray(num_faces, dtype=np.int32)
    status = np.where(err, S.STATUS_ERROR, np.where(nf > 0, S.STATUS_OK, S.STATUS_NO_FACE))
    dims_mask = err
    return pa.table({
        S.IMAGE_ID: pa.array(image_ids(uris), pa.string()),
        S.URI: pa.array(uris, pa.string()),
        S.IDENTITY: pa.array(identities, pa.string()),
        S.SHARD: pa.array([shard] * n, pa.string()),
        S.WIDTH: pa.array(np.asarray(widths, np.int32), pa.int32(), mask=dims_mask),
        S.HEIGHT: pa.array(np.asarray(heights, np.int32), pa.int32(), mask=dims_mask),
        S.STATUS: pa.array(status.tolist(), pa.string()),
        S.ERROR: pa.array(errors, pa.string()),
        S.ERROR_DETAIL: pa.array(details, pa.string()),
        S.NUM_FACES: pa.array(nf, pa.int32()),
        S.FINGERPRINT: pa.array(fingerprints, pa.string()),
        S.SETTINGS: pa.array([settings] * n, pa.string()),
        S.RUN_ID: pa.array([run_id] * n, pa.string()),
    }, schema=S.IMAGES_SCHEMA)


def faces_table(*, shard: str, uris: list[str], identities: list, image_index: np.ndarray, boxes: np.ndarray,
                scores: np.ndarray, landmarks: np.ndarray, crops, embeddings: np.ndarray, embedder: str,
                embedder_version: str, run_id: str) -> pa.Table:
    """The ``faces`` rows of one shard.

    Args:
        shard: shard key.
        uris, identities: per image of the shard.
        image_index: int[F] image (into uris) of each face, non-decreasing.
        boxes: float[F, 4]; scores: float[F]; landmarks: float[F, 5, 2]; embeddings: float[F, D].
        crops: F encoded (JPEG) crops, as stored (see :func:`encode_crops`); None leaves the crop column
            out (the faces of a shard in flight between the face actor and the writer, whose raw pixels
            travel beside the table: the column only ever holds the stored encoding).
        embedder, embedder_version: the model that made the embeddings.
        run_id: the run writing these rows.

    Returns:
        Table with schema ``schemas.faces_schema(D)``.
    """
    idx = np.asarray(image_index, dtype=np.int64)
    f = idx.shape[0]
    dim = embeddings.shape[1] if embeddings.ndim == 2 else S.EMBEDDING_DIM
    counts = np.bincount(idx, minlength=len(uris))
    face_index = np.arange(f) - np.repeat(np.cumsum(counts) - counts, counts)
    ids = np.array(image_ids(uris), dtype=object)
    uri_arr = np.array(uris, dtype=object)
    ident_arr = np.array(identities, dtype=object)
    columns = {
        S.IMAGE_ID: pa.array(ids[idx].tolist(), pa.string()),
        S.URI: pa.array(uri_arr[idx].tolist(), pa.string()),
        S.IDENTITY: pa.array(ident_arr[idx].tolist(), pa.string()),
        S.SHARD: pa.array([shard] * f, pa.string()),
        S.FACE_INDEX: pa.array(face_index.astype(np.int32), pa.int32()),
        S.BOX: _fixed_list(boxes, 4),
        S.SCORE: pa.array(np.asarray(scores, np.float32), pa.float32()),
        S.LANDMARKS: _fixed_list(landmarks, 10),
        S.CROP: None,
        S.EMBEDDING: _fixed_list(embeddings, dim),
        S.EMBEDDER: pa.array([embedder] * f, pa.string()),
        S.EMBEDDER_VERSION: pa.array([embedder_version] * f, pa.string()),
        S.RUN_ID: pa.array([run_id] * f, pa.string()),
    }
    schema = S.faces_schema(dim)
    if crops is None:
        del columns[S.CROP]
        schema = schema.remove(schema.get_field_index(S.CROP))
    else:
        columns[S.CROP] = pa.array(crops, pa.binary()) if not isinstance(crops, pa.Array) else crops
    return pa.table(columns, schema=schema)


def with_crops(faces: pa.Table, crops: pa.BinaryArray) -> pa.Table:
    """Faces rows without a crop column (``faces_table(crops=None)``) with their encoded crops added, in
    the place ``schemas.faces_schema`` gives the column."""
    dim = faces.schema.field(S.EMBEDDING).type.list_size
    schema = S.faces_schema(dim)
    return faces.add_column(schema.get_field_index(S.CROP), schema.field(S.CROP), crops).cast(schema)


def records_table(images: pa.Table, faces: pa.Table) -> pa.Table:
    """The ``records`` rows of one shard: its image rows, then its face rows.

    Args:
        images: rows of ``schemas.IMAGES_SCHEMA``.
        faces: rows of ``schemas.faces_schema(D)`` for those images, crops encoded.

    Returns:
        Table with schema ``schemas.records_schema(D)``; face rows carry their image's fingerprint and
        settings, image rows have ``face_index == schemas.IMAGE_ROW``.
    """
    dim = faces.schema.field(S.EMBEDDING).type.list_size
    schema = S.records_schema(dim)
    n, f = images.num_rows, faces.num_rows
    owner = pd.Index(images.column(S.IMAGE_ID).to_numpy(zero_copy_only=False)).get_indexer(
        faces.column(S.IMAGE_ID).to_numpy(zero_copy_only=False))
    if (owner < 0).any():
        raise ValueError(f"{int((owner < 0).sum())} face rows belong to no image row of the shard")
    image_cols = {name: images.column(name) for name in images.column_names}
    image_cols[S.FACE_INDEX] = pa.array(np.full(n, S.IMAGE_ROW, np.int32))
    face_cols = {name: faces.column(name) for name in faces.column_names}
    for name in (S.FINGERPRINT, S.SETTINGS):
        face_cols[name] = images.column(name).take(pa.array(owner, pa.int64()))

    def part(cols: dict, rows: int) -> pa.Table:
        return pa.table({field.name: cols[field.name].cast(field.type) if field.name in cols
                         else pa.nulls(rows, field.type) for field in schema}, schema=schema)

    return pa.concat_tables([part(image_cols, n), part(face_cols, f)])


def encode_crops(crops: np.ndarray, quality: int = 95) -> pa.BinaryArray:
    """JPEG-encode raw RGB crops uint8[N, S, S, 3] for storage (one binary value per crop)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    # cv2 encodes one image per call; BGR order on disk is what every decoder expects.
    encoded = [cv2.imencode(".jpg", c[:, :, ::-1], params)[1].tobytes() for c in crops]
    return pa.array(encoded, pa.binary())


def decode_crops(encoded) -> np.ndarray:
    """Stored crops (a pyarrow binary array or list of JPEG/PNG bytes) -> uint8[N, S, S, 3] RGB."""
    values = encoded.to_pylist() if hasattr(encoded, "to_pylist") else list(encoded)
    imgs = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1] for b in values]
    return np.stack(imgs) if imgs else np.zeros((0, 112, 112, 3), np.uint8)


def decode_crops_checked(encoded) -> tuple[np.ndarray, np.ndarray]:
    """Stored crops -> (uint8[K, S, S, 3] RGB of the K decodable ones, bool[N] decodable): a corrupt crop is
    counted, not raised. One whole-batch decode; one by one only after that failed."""
    values = encoded.to_pylist() if hasattr(encoded, "to_pylist") else list(encoded)
    try:
        return decode_crops(values), np.ones(len(values), bool)
    except Exception:  # noqa: BLE001 - find the bad crops
        pass
    ok, crops = np.zeros(len(values), bool), []
    for i, blob in enumerate(values):  # only after a whole-batch decode failed
        try:
            crops.append(decode_crops([blob])[0])
            ok[i] = True
        except Exception:  # noqa: BLE001 - a corrupt stored crop
            pass
    return (np.stack(crops) if crops else np.zeros((0, 112, 112, 3), np.uint8)), ok
