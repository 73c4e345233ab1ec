"""A facemill dataset on Delta Lake: one table of record, views of it, embeddings tables beside it.

Layout of a dataset root (local folder or ``s3://`` prefix)::

    <root>/_facemill.json              marks the folder as a facemill dataset (format, schema version)
    <root>/records/                    Delta table (schemas.records_schema): per input file one image row
                                       (face_index -1) and one row per face
    <root>/embeddings/<name>/          Delta tables written by reprocess (schemas.stored_embeddings_schema)
    <root>/_lease.json                 the run lease while a run writes (workers.lease)
    <root>/summary.json, _runs/<run_id>.json, report.html

Why one table: Delta transactions are per table. A shard commit replaces *all* rows of its images (their
image rows and their face rows) in one transaction: ``write_deltalake(mode="overwrite", predicate=...)``
deletes every row of those uris and inserts the new ones atomically. An image that was replaced by one
with no face, or by a broken file, so loses its old faces in the same commit that records its new status;
readers see the table's current version, never a half-written shard, and need no markers or read-side
deduplication. The predicate bounds the uri range as well as listing the uris, so Delta's file statistics
skip every data file outside the shard's range (shards are contiguous in uri order).

Concurrent commits (several write tasks of one run) are the transaction log's job: a conflicting commit
is retried. Files are never deleted here except through Delta's own vacuum, which removes only data
files the log itself retired, after the retention period.
"""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from workers import storage
from workers.storage import StorageError

MARKER_FILE = "_facemill.json"
FORMAT = "delta"


# --------------------------------------------------------------------------------------------------
# Locations and options
# --------------------------------------------------------------------------------------------------

def records_uri(root: str) -> str:
    return storage.join(root, S.RECORDS)


def embeddings_uri(root: str, name: str) -> str:
    """Folder of the embeddings table ``name`` of a dataset root.

    Raises:
        ValueError: ``name`` is not one plain path component.
    """
    if not name or name != name.strip() or any(c in name for c in "/\\:'\"") or name.startswith((".", "_")):
        raise ValueError(f"embeddings table name must be one plain path component, got {name!r}")
    return storage.join(root, S.EMBEDDINGS, name)


def delta_options(uri: str, storage_options: dict | None = None) -> dict[str, str] | None:
    """delta-rs storage options for ``uri`` from facemill's fsspec options.

    S3: the endpoint (``endpoint_url``, ``$FACEMILL_S3_ENDPOINT_URL`` or ``$AWS_ENDPOINT_URL``), plain HTTP
    allowed for it, and conditional PUTs by ETag for safe concurrent commits. Credentials and region come
    from the usual AWS variables.
    """
    if not storage.is_remote(uri):
        return None
    opts = dict(storage_options or {})
    out = {"conditional_put": "etag"}
    endpoint = (opts.get("endpoint_url") or os.environ.get("FACEMILL_S3_ENDPOINT_URL")
                or os.environ.get("AWS_ENDPOINT_URL"))
    if endpoint:
        out["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            out["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        out["AWS_REGION"] = region
    # delta-rs does not always pick up key variables next to explicit options: pass them on (else it asks
    # the instance metadata service, which hangs off EC2)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(key):
            out[key] = os.environ[key]
    return out


def _table_uri(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.abspath(storage.local_path(uri))


def _open(uri: str, storage_options: dict | None):
    """The DeltaTable at ``uri``, or None where none exists."""
    from deltalake import DeltaTable

    turi = _table_uri(uri)
    opts = delta_options(uri, storage_options)
    if not DeltaTable.is_deltatable(turi, storage_options=opts):
        return None
    return DeltaTable(turi, storage_options=opts)


# --------------------------------------------------------------------------------------------------
# The dataset as a whole
# --------------------------------------------------------------------------------------------------

def read_marker(root: str, storage_options: dict | None = None) -> dict | None:
    """The dataset marker (``_facemill.json``), or None where the root is no facemill dataset."""
    return storage.read_json(storage.join(root, MARKER_FILE), storage_options)


def check_output(root: str, storage_options: dict | None = None) -> dict | None:
    """Refuse an output location that is not, and cannot become, a facemill dataset.

    Returns:
        The marker of an existing dataset, or None for a new (missing or empty) location.

    Raises:
        StorageError: the location is a file, holds other things (facemill never writes into, or
            cleans up, a folder it did not create), or holds a dataset of the old layout.
    """
    marker = read_marker(root, storage_options)
    if marker is not None:
        if marker.get("format") != FORMAT or str(marker.get("schema_version")) != S.SCHEMA_VERSION:
            raise StorageError(f"{root!r} is a facemill dataset of format {marker.get('format')!r} schema "
                               f"{marker.get('schema_version')!r}; this facemill reads {FORMAT!r} schema "
                               f"{S.SCHEMA_VERSION!r}")
        return marker
    fs, path = storage.url_to_fs(root, storage_options)
    if fs.exists(path) and not fs.isdir(path):
        raise StorageError(f"output {root!r} is a file, not a folder")
    try:
        entries = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)] if fs.exists(path) else []
    except FileNotFoundError:
        entries = []
    # facemill's own control files (a lease taken just before the marker, a writability probe) do not
    # make a folder foreign: a run killed between its lease and its marker must not lock the folder out
    entries = [e for e in entries if e not in ("", ".", "_lease.json") and not e.startswith("_probe-")]
    if not entries:
        return None
    if "_committed" in entries:
        raise StorageError(
            f"{root!r} holds a facemill dataset of the old layout (schema 1: images/, faces/, _committed/); "
            f"prepare it again into a new --output (the old folder is left as it is)")
    raise StorageError(f"output {root!r} exists, is not empty and is not a facemill dataset (no {MARKER_FILE}): "
                       f"facemill writes only into a new or empty folder or one of its own datasets")


def create_dataset(root: str, embedding_dim: int, storage_options: dict | None = None) -> dict:
    """Make ``root`` a facemill dataset (marker first, then the records table); idempotent.

    The marker is written before the table, so a kill between the two leaves a dataset without a table
    (which the next run creates), never a table in a folder facemill would refuse as foreign.

    Raises:
        StorageError: the dataset exists with another embedding size.
    """
    from deltalake import DeltaTable

    marker = read_marker(root, storage_options)
    if marker is None:
        marker = {"format": FORMAT, "schema_version": S.SCHEMA_VERSION, "embedding_dim": int(embedding_dim),
                  "created_at": time.time()}
        storage.put_if_absent(storage.join(root, MARKER_FILE), (json.dumps(marker, indent=2) + "\n").encode(), storage_options)
        marker = read_marker(root, storage_options) or marker
    if int(marker.get("embedding_dim", embedding_dim)) != int(embedding_dim):
        raise StorageError(f"{root!r} holds {marker['embedding_dim']}-D embeddings; an embedder of "
                           f"{embedding_dim}-D cannot write into it (use a new --output)")
    if _open(records_uri(root), storage_options) is None:
        DeltaTable.create(_table_uri(records_uri(root)), schema=S.records_schema(embedding_dim), mode="ignore",
                          name=S.RECORDS, storage_options=delta_options(root, storage_options))
    return marker


def require_dataset(root: str, storage_options: dict | None = None) -> dict:
    """The marker of an existing dataset with a records table.

    Raises:
        StorageError: no facemill dataset at ``root`` (one line, naming it).
    """
    marker = check_output(root, storage_options)
    if marker is None or _open(records_uri(root), storage_options) is None:
        raise StorageError(f"{root!r} is not a facemill dataset (run `python -m jobs.prepare --output {root}` "
                           f"first)")
    return marker


def table_version(uri: str, storage_options: dict | None = None) -> int | None:
    """Current version of the Delta table at ``uri`` (None where there is none)."""
    dt = _open(uri, storage_options)
    return None if dt is None else int(dt.version())


def vacuum(uri: str, storage_options: dict | None = None) -> int:
    """Delta's own vacuum of the table at ``uri``: removes data files that the log retired more than the
    retention period (7 days) ago, and nothing else. Returns the number of files removed."""
    dt = _open(uri, storage_options)
    return 0 if dt is None else len(dt.vacuum(dry_run=False))


# --------------------------------------------------------------------------------------------------
# Commits
# --------------------------------------------------------------------------------------------------

def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _retrying(write, what: str, attempts: int = 12) -> None:
    """Run a Delta write, retrying commit conflicts and transient storage failures (about 60 s in all)."""
    from deltalake.exceptions import CommitFailedError, SchemaMismatchError

    for attempt in range(attempts):
        try:
            write()
            return
        except (SchemaMismatchError, ValueError, TypeError):
            raise
        except CommitFailedError:
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
        except Exception as exc:  # noqa: BLE001 - storage down or slow: back off, then give up
            if storage.permanent_error(exc) or attempt == attempts - 1:
                raise StorageError(f"{what} failed: {type(exc).__name__}: {exc}") from exc
            time.sleep(min(8.0, 0.5 * 2 ** attempt))


#: Most uris one commit may replace: the predicate lists them, and delta-rs 1.6 crashes the process (SIGSEGV)
#: on an ``IN`` list of about 25,000 or more (seen at 30,000; 20,000 worked).
MAX_COMMIT_URIS = 10_000


def commit_records(root: str, rows: pa.Table, storage_options: dict | None = None) -> None:
    """Replace every row of the uris in ``rows`` by ``rows``, in one Delta transaction.

    Args:
        root: dataset root (created with :func:`create_dataset`).
        rows: records rows (``schemas.records_schema``) of one shard: every image row and face row of its uris.

    Raises:
        ValueError: more than :data:`MAX_COMMIT_URIS` uris (a shard that large must be cut smaller).
    """
    from deltalake import write_deltalake

    if rows.num_rows == 0:
        return
    uris = sorted(set(rows.column(S.URI).to_pylist()))
    if len(uris) > MAX_COMMIT_URIS:
        raise ValueError(f"one commit may replace at most {MAX_COMMIT_URIS} images, got {len(uris)}; "
                         f"use a smaller shard size")
    predicate = (f"{S.URI} >= {_literal(uris[0])} AND {S.URI} <= {_literal(uris[-1])} AND "
                 f"{S.URI} IN ({', '.join(_literal(u) for u in uris)})")
    dim = _list_width(rows, S.EMBEDDING) or S.EMBEDDING_DIM
    data = rows.cast(S.records_schema(dim))
    uri = _table_uri(records_uri(root))
    opts = delta_options(root, storage_options)
    _retrying(lambda: write_deltalake(uri, data, mode="overwrite", predicate=predicate, storage_options=opts),
              f"commit of {len(uris)} images to {root!r}")


def commit_embeddings(root: str, name: str, shard: str, table: pa.Table, storage_options: dict | None = None) -> None:
    """Replace the rows of faces shard ``shard`` in embeddings table ``name`` by ``table``, atomically.

    Args:
        root: dataset root.
        name: embeddings table name.
        shard: the faces shard the rows were computed from (every row's ``shard``).
        table: rows of ``schemas.embeddings_schema(D)``.
    """
    from deltalake import DeltaTable, write_deltalake

    dim = _list_width(table, S.EMBEDDING) or S.EMBEDDING_DIM
    uri = embeddings_uri(root, name)
    opts = delta_options(root, storage_options)
    if _open(uri, storage_options) is None:
        DeltaTable.create(_table_uri(uri), schema=S.stored_embeddings_schema(dim), mode="ignore",
                          name=f"{S.EMBEDDINGS}_{name}", storage_options=opts)
    data = table.cast(S.stored_embeddings_schema(dim))
    predicate = f"{S.SHARD} = {_literal(shard)}"
    _retrying(lambda: write_deltalake(_table_uri(uri), data, mode="overwrite", predicate=predicate,
                                      storage_options=opts), f"commit of embeddings shard {shard} to {uri!r}")


def delete_embeddings(root: str, name: str, shards: list[str], storage_options: dict | None = None) -> None:
    """Delete the rows of ``shards`` from embeddings table ``name`` (faces that are no longer current)."""
    dt = _open(embeddings_uri(root, name), storage_options)
    if dt is None or not shards:
        return
    predicate = f"{S.SHARD} IN ({', '.join(_literal(s) for s in shards)})"
    _retrying(lambda: dt.delete(predicate), f"delete of {len(shards)} stale embeddings shards")


def _list_width(table: pa.Table, column: str) -> int | None:
    if column not in table.column_names:
        return None
    typ = table.schema.field(column).type
    if pa.types.is_fixed_size_list(typ):
        return typ.list_size
    lengths = pc.list_value_length(table.column(column)).drop_null()
    return int(lengths[0].as_py()) if len(lengths) else None


# --------------------------------------------------------------------------------------------------
# Reads: the current version of each table
# --------------------------------------------------------------------------------------------------

def _scan(uri: str, storage_options: dict | None, columns: list[str], filter_) -> pa.Table | None:
    dt = _open(uri, storage_options)
    if dt is None:
        return None
    return dt.to_pyarrow_dataset().to_table(columns=columns, filter=filter_)


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
    got = _scan(records_uri(root), storage_options, names, where)
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
                  and _open(embeddings_uri(root, n), storage_options) is not None)


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
    got = _scan(embeddings_uri(root, name), storage_options, sorted(set(names) | set(keys)), None)
    if got is None or got.num_rows == 0:
        return pa.schema([schema.field(n) for n in names], metadata=schema.metadata).empty_table()
    dim = _list_width(got, S.EMBEDDING) or schema.field(S.EMBEDDING).type.list_size
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
    got = _scan(embeddings_uri(root, name), storage_options, [S.SHARD, S.EMBEDDER, S.EMBEDDER_VERSION], None)
    if got is None:
        return pd.DataFrame(columns=[S.SHARD, S.EMBEDDER, S.EMBEDDER_VERSION])
    return got.to_pandas().drop_duplicates(ignore_index=True)


def read_shard_faces(root: str, shard: str, columns: list[str], storage_options: dict | None = None) -> pa.Table:
    """The current face rows of one shard (a pushed-down filter: only that shard's files are read)."""
    return read_table(root, S.FACES, storage_options, columns=columns, filter=pc.field(S.SHARD) == shard)
