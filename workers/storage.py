"""Local and ``s3://`` storage (fsspec / s3fs): input listing, batched reads, and the output layout.

Output layout of a dataset root::

    <root>/images/<shard>.parquet      one row per input file of the shard        (schemas.IMAGES_SCHEMA)
    <root>/faces/<shard>.parquet       one row per face                             (schemas.faces_schema)
    <root>/_committed/<shard>.json     written last: the shard exists only once this exists
    <root>/summary.json, _runs/<run_id>.json, report.html

A shard is visible only through its commit marker, and each data file appears whole (local: written to a
temporary name then renamed; S3: a single PUT), so a killed run never exposes a partial shard. Files of a
shard without a marker are ignored by readers and overwritten or removed by the next run.
"""
from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import schemas as S
from workers.decode import IMAGE_EXTENSIONS

COMMITTED = "_committed"
RUNS = "_runs"
LOCK = "_lock.json"


class StorageError(RuntimeError):
    """An input or output location is unusable (missing, unreadable, not writable)."""


def url_to_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """fsspec filesystem and path for a local path or URL (``s3://bucket/key``)."""
    opts = dict(storage_options or {})
    if uri.startswith("s3://"):
        endpoint = opts.pop("endpoint_url", None) or os.environ.get("FACEMILL_S3_ENDPOINT_URL")
        if endpoint:
            opts.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
        opts.setdefault("skip_instance_cache", True)
        opts.setdefault("use_listings_cache", False)
    return fsspec.core.url_to_fs(uri, **opts)


def join(root: str, *parts: str) -> str:
    """Join path parts under a local path or URL."""
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)


def _unstrip(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Full URI for a path returned by fs (which strips the protocol)."""
    return fs.unstrip_protocol(path) if "://" in uri else path


def _fingerprint(info: dict[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    stamp = etag.strip('"') if etag else info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{info.get('size')}:{stamp}"


def list_inputs(input_uri: str, storage_options: dict | None = None) -> tuple[pd.DataFrame, list[str]]:
    """List the images of an input location.

    Args:
        input_uri: a folder (``<identity>/<image>`` tree, or flat: identity unknown), or a manifest
            ``.csv`` / ``.parquet`` with a ``uri`` column and an optional ``identity`` column (relative uris
            are taken relative to the manifest's folder).
        storage_options: fsspec options (e.g. ``endpoint_url`` for S3).

    Returns:
        (images, skipped): a DataFrame with columns uri, identity, fingerprint sorted by uri, and the
        files of a folder skipped because their extension is not an image's.

    Raises:
        StorageError: the input does not exist or is empty.
    """
    fs, path = url_to_fs(input_uri, storage_options)
    try:
        exists = fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - credentials, endpoint, permissions
        raise StorageError(f"cannot access input {input_uri!r}: {exc}") from exc
    if not exists:
        raise StorageError(f"input {input_uri!r} does not exist")
    lower = path.lower()
    if lower.endswith((".csv", ".parquet")) and not fs.isdir(path):
        return _read_manifest(input_uri, fs, path), []
    found = fs.find(path, detail=True)
    root = path.rstrip("/") + "/"
    rows, skipped = [], []
    for p, info in sorted(found.items()):
        rel = p[len(root):] if p.startswith(root) else posixpath.basename(p)
        name = posixpath.basename(rel)
        if name.startswith(".") or any(part.startswith((".", "_")) for part in rel.split("/")[:-1]):
            continue
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            skipped.append(_unstrip(input_uri, fs, p))
            continue
        parts = rel.split("/")
        identity = parts[-2] if len(parts) >= 2 else None
        rows.append((_unstrip(input_uri, fs, p), identity, _fingerprint(info)))
    if not rows:
        raise StorageError(f"input {input_uri!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return pd.DataFrame(rows, columns=[S.URI, S.IDENTITY, S.FINGERPRINT]), skipped


def _read_manifest(input_uri: str, fs, path: str) -> pd.DataFrame:
    with fs.open(path, "rb") as f:
        df = pd.read_parquet(f) if path.lower().endswith(".parquet") else pd.read_csv(f, dtype=str)
    if S.MANIFEST_URI not in df.columns:
        raise StorageError(f"manifest {input_uri!r} has no {S.MANIFEST_URI!r} column (columns: {list(df.columns)})")
    base = input_uri.rsplit("/", 1)[0] if "://" in input_uri else os.path.dirname(os.path.abspath(path))
    uris = df[S.MANIFEST_URI].astype(str)
    uris = uris.where(uris.str.contains("://") | uris.str.startswith("/"), base + "/" + uris)
    identity = df[S.MANIFEST_IDENTITY].astype("string") if S.MANIFEST_IDENTITY in df.columns else None
    out = pd.DataFrame({S.URI: uris, S.IDENTITY: identity, S.FINGERPRINT: None})
    return out.drop_duplicates(S.URI).sort_values(S.URI, ignore_index=True)


def _permanent(exc: BaseException) -> bool:
    """Errors a retry cannot fix: the object or bucket is missing, or access is denied."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(k in text for k in ("NoSuchBucket", "AccessDenied", "Forbidden", "InvalidAccessKeyId"))


def read_many(uris: list[str], storage_options: dict | None = None, retries: int = 6) -> list[bytes | Exception]:
    """Read whole files concurrently (s3fs fetches a list in parallel); failures come back as exceptions.

    Transient failures (connection refused, timeouts, 5xx) are retried with exponential backoff (about 30 s
    in all); missing files and denied access are not.
    """
    if not uris:
        return []
    fs, _ = url_to_fs(uris[0], storage_options)
    paths = [fs._strip_protocol(u) for u in uris]
    out: dict[str, bytes | Exception] = {}
    todo = paths
    for attempt in range(retries + 1):
        try:
            got = fs.cat(todo, on_error="return") if len(todo) > 1 else {todo[0]: _cat_one(fs, todo[0])}
        except Exception as exc:  # noqa: BLE001 - the whole request failed (endpoint down): retry all
            got = {p: exc for p in todo}
        out.update(got)
        todo = [p for p in todo if isinstance(out.get(p), Exception) and not _permanent(out[p])]
        if not todo or attempt == retries:
            break
        time.sleep(0.5 * 2 ** attempt)
    return [out.get(p, FileNotFoundError(p)) for p in paths]


def _cat_one(fs, path: str) -> bytes | Exception:
    try:
        return fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - returned as data, like fs.cat(on_error="return")
        return exc


def put_atomic(uri: str, data: bytes, storage_options: dict | None = None, retries: int = 6) -> None:
    """Write a whole file so that it appears complete or not at all; retries transient failures."""
    fs, path = url_to_fs(uri, storage_options)
    for attempt in range(retries + 1):
        try:
            if "://" in uri and not uri.startswith("file://"):
                fs.pipe_file(path, data)  # one PUT: S3 objects appear atomically
            else:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            return
        except Exception as exc:  # noqa: BLE001 - classify, then retry or raise
            if _permanent(exc) or attempt == retries:
                raise
            time.sleep(0.5 * 2 ** attempt)


def table_bytes(table: pa.Table) -> bytes:
    """Serialise a table as one Parquet file (zstd)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def check_writable(root: str, storage_options: dict | None = None) -> None:
    """Fail fast if the output location cannot be written (missing bucket, no permission).

    Raises:
        StorageError: with the reason.
    """
    probe = join(root, f"_probe-{uuid.uuid4().hex[:8]}")
    try:
        put_atomic(probe, b"ok", storage_options, retries=1)
        fs, path = url_to_fs(probe, storage_options)
        fs.rm_file(path)
    except Exception as exc:  # noqa: BLE001 - any failure means not writable
        raise StorageError(f"output {root!r} is not writable: {type(exc).__name__}: {exc}") from exc


def committed(root: str, storage_options: dict | None = None) -> dict[str, dict]:
    """Commit markers of a dataset root: shard -> marker JSON (empty if the root does not exist)."""
    fs, path = url_to_fs(join(root, COMMITTED), storage_options)
    try:
        names = fs.ls(path, detail=False) if fs.exists(path) else []
    except FileNotFoundError:
        names = []
    markers = [n for n in names if n.endswith(".json")]
    blobs = fs.cat(markers, on_error="raise") if markers else {}
    out = {}
    for name, blob in blobs.items():
        marker = json.loads(blob)
        out[marker["shard"]] = marker
    return out


def commit_shard(root: str, shard: str, tables: dict[str, pa.Table], marker: dict,
                 storage_options: dict | None = None) -> None:
    """Write a shard's data files, then its commit marker (the shard becomes visible at the marker)."""
    for name, table in tables.items():
        put_atomic(join(root, name, f"{shard}.parquet"), table_bytes(table), storage_options)
    marker = {**marker, "shard": shard, "committed_at": time.time(), "tables": sorted(tables)}
    put_atomic(join(root, COMMITTED, f"{shard}.json"), json.dumps(marker).encode(), storage_options)


def read_table(root: str, table: str, storage_options: dict | None = None, columns: list[str] | None = None,
               markers: dict[str, dict] | None = None) -> pa.Table:
    """Read one table of a dataset: committed shards only; for a uri in several shards the latest wins.

    Args:
        root: dataset root.
        table: ``schemas.IMAGES`` or ``schemas.FACES`` (embeddings tables: :func:`read_embeddings`).
        storage_options: fsspec options.
        columns: subset of columns (None: all).
        markers: commit markers, if already read.

    Returns:
        The table, with the schema of its files (empty with no rows if nothing is committed).
    """
    markers = committed(root, storage_options) if markers is None else markers
    if table not in (S.IMAGES, S.FACES):
        raise ValueError(f"read_table reads {S.IMAGES!r} or {S.FACES!r}, got {table!r}")
    shards = sorted((m["committed_at"], s) for s, m in markers.items() if table in m["tables"])
    fs, _ = url_to_fs(root, storage_options)
    paths = [url_to_fs(join(root, table, f"{s}.parquet"), storage_options)[1] for _, s in shards]
    if not paths:
        return _empty(table)
    want = None if columns is None else sorted(set(columns) | {S.URI, S.SHARD})
    tables = [pq.read_table(p, filesystem=fs, columns=want) for p in paths]
    out = pa.concat_tables(tables, promote_options="default")
    if len(tables) > 1:
        out = _latest_per_uri(out, [s for _, s in shards])
    return out if columns is None else out.select(columns)


def _latest_per_uri(t: pa.Table, shard_order: list[str]) -> pa.Table:
    """Drop rows of a uri that belong to a shard older than the uri's newest shard."""
    rank = {s: i for i, s in enumerate(shard_order)}
    df = pd.DataFrame({"uri": t.column(S.URI).to_pandas(), "r": t.column(S.SHARD).to_pandas().map(rank)})
    newest = df.groupby("uri")["r"].transform("max")
    keep = (df["r"] == newest).to_numpy()
    return t if keep.all() else t.filter(pa.array(keep))


def _empty(table: str) -> pa.Table:
    return {S.IMAGES: S.IMAGES_SCHEMA, S.FACES: S.FACES_SCHEMA}[table].empty_table()


def acquire_lock(root: str, run_id: str, storage_options: dict | None = None, stale_after_s: float = 6 * 3600,
                 force: bool = False) -> None:
    """Take the dataset's run lock so that two runs never write one dataset at once.

    Raises:
        StorageError: another live run holds the lock (younger than ``stale_after_s``) and not ``force``.
    """
    uri = join(root, LOCK)
    fs, path = url_to_fs(uri, storage_options)
    if fs.exists(path) and not force:
        held = json.loads(fs.cat_file(path))
        age = time.time() - held.get("at", 0)
        if age < stale_after_s:
            raise StorageError(
                f"{root!r} is locked by run {held.get('run_id')!r} (pid {held.get('pid')}, {age:.0f}s ago); "
                f"wait for it, or pass --force-unlock if that run is dead")
    put_atomic(uri, json.dumps({"run_id": run_id, "pid": os.getpid(), "at": time.time()}).encode(),
               storage_options)


def release_lock(root: str, run_id: str, storage_options: dict | None = None) -> None:
    """Remove the run lock if this run holds it."""
    fs, path = url_to_fs(join(root, LOCK), storage_options)
    try:
        if json.loads(fs.cat_file(path)).get("run_id") == run_id:
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def remove_uncommitted(root: str, tables: list[str], markers: dict[str, dict],
                       storage_options: dict | None = None) -> int:
    """Delete data files of shards that have no commit marker (left by a killed run). Returns the count."""
    fs, _ = url_to_fs(root, storage_options)
    removed = 0
    for table in tables:
        _, path = url_to_fs(join(root, table), storage_options)
        if not fs.exists(path):
            continue
        for p in fs.ls(path, detail=False):
            name = posixpath.basename(p)
            shard = name.split(".parquet")[0]
            if shard not in markers or ".tmp-" in name:
                fs.rm_file(p)
                removed += 1
    return removed


# --------------------------------------------------------------------------------------------------------
# Embeddings tables written by reprocess, beside the faces of a dataset root:
#
#     <root>/embeddings/<name>/<shard>.parquet           one row per face of faces shard <shard>
#     <root>/embeddings/<name>/_committed/<shard>.json   written last; names the embedder (name, version)
#                                                        and the faces marker's committed_at it was made from
#
# An embeddings shard is current while its faces shard is committed with that same committed_at; its rows
# count only for uris whose newest shard (images table, latest wins) is that shard.


def embeddings_root(root: str, name: str) -> str:
    """Folder of the embeddings table ``name`` of a dataset root.

    Raises:
        ValueError: ``name`` is not one plain path component.
    """
    if not name or name != name.strip() or any(c in name for c in "/\\:") or name.startswith((".", "_")):
        raise ValueError(f"embeddings table name must be one plain path component, got {name!r}")
    return join(root, S.EMBEDDINGS, name)


def list_embeddings(root: str, storage_options: dict | None = None) -> list[str]:
    """Names of the embeddings tables of a dataset root (those with at least one commit marker)."""
    fs, path = url_to_fs(join(root, S.EMBEDDINGS), storage_options)
    try:
        entries = fs.ls(path, detail=False) if fs.exists(path) else []
    except FileNotFoundError:
        entries = []
    names = [posixpath.basename(p.rstrip("/")) for p in entries]
    return sorted(n for n in names if not n.startswith((".", "_"))
                  and committed(embeddings_root(root, n), storage_options))


def commit_embeddings(root: str, name: str, shard: str, table: pa.Table, marker: dict,
                      storage_options: dict | None = None) -> None:
    """Write one shard of embeddings table ``name``, then its commit marker.

    Args:
        root: dataset root.
        name: embeddings table name.
        shard: the faces shard the rows were computed from.
        table: rows of ``schemas.embeddings_schema``.
        marker: must hold ``embedder``, ``embedder_version`` and ``faces_committed_at``.
    """
    missing = [k for k in ("embedder", "embedder_version", "faces_committed_at") if k not in marker]
    if missing:
        raise ValueError(f"embeddings marker of shard {shard!r} lacks {missing}")
    eroot = embeddings_root(root, name)
    put_atomic(join(eroot, f"{shard}.parquet"), table_bytes(table), storage_options)
    marker = {**marker, "shard": shard, "committed_at": time.time(), "rows": table.num_rows,
              "tables": [f"{S.EMBEDDINGS}/{name}"]}
    put_atomic(join(eroot, COMMITTED, f"{shard}.json"), json.dumps(marker).encode(), storage_options)


def current_embeddings(root: str, name: str, storage_options: dict | None = None,
                       markers: dict[str, dict] | None = None) -> dict[str, dict]:
    """Commit markers of the embeddings shards of ``name`` whose faces shard is committed and unchanged."""
    markers = committed(root, storage_options) if markers is None else markers
    own = committed(embeddings_root(root, name), storage_options)
    return {s: m for s, m in own.items()
            if s in markers and m.get("faces_committed_at") == markers[s]["committed_at"]}


def read_embeddings(root: str, name: str, storage_options: dict | None = None, columns: list[str] | None = None,
                    markers: dict[str, dict] | None = None) -> pa.Table:
    """Read embeddings table ``name`` of a dataset: its rows for the current faces (latest wins).

    Rows of shards without a marker, of shards whose faces were re-committed since, and of uris that a
    newer shard of the dataset holds are left out, so the result lines up with
    ``read_table(root, schemas.FACES)`` row for row once every faces shard has been re-embedded.

    Args:
        root: dataset root.
        name: embeddings table name.
        storage_options: fsspec options.
        columns: subset of columns (None: all).
        markers: the dataset's commit markers, if already read.

    Returns:
        The table with the schema of its files (``schemas.EMBEDDINGS_SCHEMA`` and no rows if none).
    """
    markers = committed(root, storage_options) if markers is None else markers
    own = current_embeddings(root, name, storage_options, markers)
    if not own:
        empty = S.EMBEDDINGS_SCHEMA.empty_table()
        return empty if columns is None else empty.select(columns)
    shards = sorted(own, key=lambda s: markers[s]["committed_at"])
    eroot = embeddings_root(root, name)
    fs, _ = url_to_fs(eroot, storage_options)
    want = None if columns is None else sorted(set(columns) | {S.URI, S.SHARD})
    tables = [pq.read_table(url_to_fs(join(eroot, f"{s}.parquet"), storage_options)[1], filesystem=fs,
                            columns=want) for s in shards]
    out = pa.concat_tables(tables, promote_options="default")
    newest = read_table(root, S.IMAGES, storage_options, columns=[S.URI, S.SHARD], markers=markers)
    current = pd.MultiIndex.from_arrays([newest.column(S.URI).to_pandas(), newest.column(S.SHARD).to_pandas()])
    rows = pd.MultiIndex.from_arrays([out.column(S.URI).to_pandas(), out.column(S.SHARD).to_pandas()])
    keep = rows.isin(current)
    out = out if keep.all() else out.filter(pa.array(keep))
    return out if columns is None else out.select(columns)


def remove_uncommitted_embeddings(root: str, name: str, storage_options: dict | None = None) -> int:
    """Delete data files of embeddings table ``name`` without a commit marker (left by a killed run)."""
    eroot = embeddings_root(root, name)
    fs, path = url_to_fs(eroot, storage_options)
    if not fs.exists(path):
        return 0
    own = committed(eroot, storage_options)
    removed = 0
    for info in fs.ls(path, detail=True):
        base = posixpath.basename(info["name"].rstrip("/"))
        if info.get("type") != "file" or not (base.endswith(".parquet") or ".tmp-" in base):
            continue
        if ".tmp-" in base or base.split(".parquet")[0] not in own:
            fs.rm_file(info["name"])
            removed += 1
    return removed
