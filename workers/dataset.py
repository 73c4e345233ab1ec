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

This module holds the marker and the commits; Delta plumbing is :mod:`workers.delta`, reads are
:mod:`workers.dataset_reads`, and every public name of both is importable from here.
"""
from __future__ import annotations

import json
import time

import pyarrow as pa

import schemas as S
from workers import storage
from workers.dataset_reads import (embedded_shards, face_shards, list_embeddings, read_embeddings,
                                   read_marker, read_shard_faces, read_table)
from workers.delta import (MARKER_FILE, delta_options, embeddings_uri, list_width, open_table,
                           records_uri, retrying, table_uri, table_version, vacuum)
from workers.storage import StorageError

FORMAT = "delta"

__all__ = ["MARKER_FILE", "FORMAT", "MAX_COMMIT_URIS", "records_uri", "embeddings_uri", "delta_options", "table_uri",
           "open_table", "table_version", "vacuum", "retrying", "list_width", "read_marker", "check_output",
           "create_dataset", "require_dataset", "commit_records", "commit_embeddings", "delete_embeddings",
           "read_table", "list_embeddings", "read_embeddings", "face_shards", "embedded_shards", "read_shard_faces"]


# --------------------------------------------------------------------------------------------------
# The dataset as a whole
# --------------------------------------------------------------------------------------------------

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
    if open_table(records_uri(root), storage_options) is None:
        DeltaTable.create(table_uri(records_uri(root)), schema=S.records_schema(embedding_dim), mode="ignore",
                          name=S.RECORDS, storage_options=delta_options(root, storage_options))
    return marker


def require_dataset(root: str, storage_options: dict | None = None) -> dict:
    """The marker of an existing dataset with a records table.

    Raises:
        StorageError: no facemill dataset at ``root`` (one line, naming it).
    """
    marker = check_output(root, storage_options)
    if marker is None or open_table(records_uri(root), storage_options) is None:
        raise StorageError(f"{root!r} is not a facemill dataset (run `python -m jobs.prepare --output {root}` "
                           f"first)")
    return marker


# --------------------------------------------------------------------------------------------------
# Commits
# --------------------------------------------------------------------------------------------------

def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


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
    dim = list_width(rows, S.EMBEDDING) or S.EMBEDDING_DIM
    data = rows.cast(S.records_schema(dim))
    uri = table_uri(records_uri(root))
    opts = delta_options(root, storage_options)
    retrying(lambda: write_deltalake(uri, data, mode="overwrite", predicate=predicate, storage_options=opts),
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

    dim = list_width(table, S.EMBEDDING) or S.EMBEDDING_DIM
    uri = embeddings_uri(root, name)
    opts = delta_options(root, storage_options)
    if open_table(uri, storage_options) is None:
        DeltaTable.create(table_uri(uri), schema=S.stored_embeddings_schema(dim), mode="ignore",
                          name=f"{S.EMBEDDINGS}_{name}", storage_options=opts)
    data = table.cast(S.stored_embeddings_schema(dim))
    predicate = f"{S.SHARD} = {_literal(shard)}"
    retrying(lambda: write_deltalake(table_uri(uri), data, mode="overwrite", predicate=predicate,
                                      storage_options=opts), f"commit of embeddings shard {shard} to {uri!r}")


def delete_embeddings(root: str, name: str, shards: list[str], storage_options: dict | None = None) -> None:
    """Delete the rows of ``shards`` from embeddings table ``name`` (faces that are no longer current)."""
    dt = open_table(embeddings_uri(root, name), storage_options)
    if dt is None or not shards:
        return
    predicate = f"{S.SHARD} IN ({', '.join(_literal(s) for s in shards)})"
    retrying(lambda: dt.delete(predicate), f"delete of {len(shards)} stale embeddings shards")
