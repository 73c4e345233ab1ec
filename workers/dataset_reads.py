"""Reads of a dataset at its current version: the marker, the records table and its views (images, faces),
embeddings tables (rows of current faces only), and the shard listings re-embedding plans from."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from workers import storage
from workers.delta import MARKER_FILE, embeddings_uri, list_width, open_table, records_uri, scan


def read_marker(root: str, storage_options: dict | None = None) -> dict | None:
    """The dataset marker (``_facemill.json``), or None where the root is no facemill dataset."""
    return storage.read_json(storage.join(root, MARKER_FILE), storage_options)


def _fixed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Cast stored arrays back to the fixed-size lists and nullability of ``schema`` (a view's columns)."""
    return table.cast(pa.schema([schema.field(n) for n in table.column_names], metadata=schema.metadata))


def read_table(root: str, table: str, storage_options: dict | None = None, columns: list[str] | None = None,
               filter=None) -> pa.Table:
    """Read a table of a dataset at its current version.

    Args:
        root: dataset root.
        table: ``schemas.IMAGES`` or ``schemas.FACES`` (views of the records table), ``schemas.RECORDS``,
            or ``"embeddings/<name>"`` (rows of current faces only: see :func:`read_embeddings`).
        storage_options: fsspec options.
        columns: subset of columns (None: all of the view's).
        filter: an extra ``pyarrow.compute`` expression over the columns (pushed down to the scan).

    Returns:
        The rows, with the view's schema (``schemas.IMAGES_SCHEMA``, ``schemas.faces_schema(D)``,
        ``schemas.embeddings_schema(D)``) restricted to ``columns``; no rows (and that schema) for a
        dataset without a records table.

    Raises:
        ValueError: unknown table.
    """
    if table.startswith(S.EMBEDDINGS + "/"):
        return read_embeddings(root, table.split("/", 1)[1], storage_options, columns)
    marker = read_marker(root, storage_options) or {}
    dim = int(marker.get("embedding_dim", S.EMBEDDING_DIM))
    if table == S.IMAGES:
        schema, where = S.IMAGES_SCHEMA, pc.field(S.FACE_INDEX) == S.IMAGE_ROW
    elif table == S.FACES:
        schema, where = S.faces_schema(dim), pc.field(S.FACE_INDEX) >= 0
    elif table == S.RECORDS:
        schema, where = S.records_schema(dim), None
    else:
        raise ValueError(f"read_table reads {S.IMAGES!r}, {S.FACES!r}, {S.RECORDS!r} or 'embeddings/<name>', "
                         f"got {table!r}")
    names = schema.names if columns is None else list(columns)
    unknown = [c for c in names if c not in schema.names]
    if unknown:
        raise ValueError(f"table {table!r} has no columns {unknown} (has {schema.names})")
    if filter is not None:
        where = filter if where is None else where & filter
    got = scan(records_uri(root), storage_options, names, where)
    if got is None:
        return pa.schema([schema.field(n) for n in names], metadata=schema.metadata).empty_table()
    return got if table == S.RECORDS else _fixed(got, schema)


def list_embeddings(root: str, storage_options: dict | None = None) -> list[str]:
    """Names of the embeddings tables of a dataset root."""
    fs, path = storage.url_to_fs(storage.join(root, S.EMBEDDINGS), storage_options)
    try:
        entries = fs.ls(path, detail=False) if fs.exists(path) else []
    except FileNotFoundError:
        entries = []
    names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
    return sorted(n for n in names if not n.startswith((".", "_"))
                  and open_table(embeddings_uri(root, n), storage_options) is not None)


def _current_mask(rows: pa.Table, current: pa.Table, keys: list[str]) -> np.ndarray:
    """bool[len(rows)]: whether each row's ``keys`` tuple appears in ``current``."""
    have = pd.MultiIndex.from_arrays([current.column(k).to_numpy(zero_copy_only=False) for k in keys])
    mine = pd.MultiIndex.from_arrays([rows.column(k).to_numpy(zero_copy_only=False) for k in keys])
    return np.asarray(mine.isin(have), dtype=bool)


def read_embeddings(root: str, name: str, storage_options: dict | None = None,
                    columns: list[str] | None = None) -> pa.Table:
    """Embeddings table ``name`` of a dataset: its rows for the faces that are current.

    A row counts while the face it was computed from is current: same image_id, face_index and shard in
    the records table. Rows of faces that were replaced since (their images reprocessed) are left out,
    so the result lines up with ``read_table(root, schemas.FACES)`` once every faces shard is re-embedded.

    Returns:
        Rows of ``schemas.embeddings_schema(D)`` restricted to ``columns`` (none if the table is missing).
    """
    keys = [S.IMAGE_ID, S.FACE_INDEX, S.SHARD]
    marker = read_marker(root, storage_options) or {}
    schema = S.embeddings_schema(int(marker.get("embedding_dim", S.EMBEDDING_DIM)))
    names = schema.names if columns is None else list(columns)
    got = scan(embeddings_uri(root, name), storage_options, sorted(set(names) | set(keys)), None)
    if got is None or got.num_rows == 0:
        return pa.schema([schema.field(n) for n in names], metadata=schema.metadata).empty_table()
    dim = list_width(got, S.EMBEDDING) or schema.field(S.EMBEDDING).type.list_size
    schema = S.embeddings_schema(dim)
    current = read_table(root, S.FACES, storage_options, columns=keys)
    keep = _current_mask(got, current, keys)
    got = got if keep.all() else got.filter(pa.array(keep))
    return _fixed(got.select(names), schema)


def face_shards(root: str, storage_options: dict | None = None) -> pd.Series:
    """Faces per shard among the current face rows: shard -> count, sorted by shard."""
    faces = read_table(root, S.FACES, storage_options, columns=[S.SHARD])
    return faces.column(S.SHARD).to_pandas().value_counts().sort_index()


def embedded_shards(root: str, name: str, storage_options: dict | None = None) -> pd.DataFrame:
    """Distinct (shard, embedder, embedder_version) rows of embeddings table ``name`` (empty if missing)."""
    got = scan(embeddings_uri(root, name), storage_options, [S.SHARD, S.EMBEDDER, S.EMBEDDER_VERSION], None)
    if got is None:
        return pd.DataFrame(columns=[S.SHARD, S.EMBEDDER, S.EMBEDDER_VERSION])
    return got.to_pandas().drop_duplicates(ignore_index=True)


def read_shard_faces(root: str, shard: str, columns: list[str], storage_options: dict | None = None) -> pa.Table:
    """The current face rows of one shard (a pushed-down filter: only that shard's files are read)."""
    return read_table(root, S.FACES, storage_options, columns=columns, filter=pc.field(S.SHARD) == shard)
