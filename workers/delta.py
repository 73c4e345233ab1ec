"""Where a dataset's Delta tables live and how they are opened: locations, delta-rs options, versions,
vacuum, retried writes and scans of the current version."""
from __future__ import annotations

import os
import random
import time

import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from workers import storage
from workers.storage import StorageError

MARKER_FILE = "_facemill.json"


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


def table_uri(uri: str) -> str:
    return uri if storage.is_remote(uri) else os.path.abspath(storage.local_path(uri))


def arrow_dataset(dt, uri: str):
    """``dt.to_pyarrow_dataset()`` of the Delta table at ``uri``; a local table's files are read through Arrow's
    own file system.

    delta-rs's default reads every file through a Python file-system handler, whose buffers need the GIL to be
    freed. Arrow's IO threads free them after a scan (the pre-buffer cache), and a process that exits meanwhile
    aborts with ``terminate called without an active exception`` (delta-rs #2184; a thread cannot take the GIL
    once Python is finalising). Measured: 5 of 40 exits right after two table reads, on a loaded 2-core box,
    and one CI run of a job's bad-input exit. Remote tables keep the handler: their credentials and endpoint
    are delta-rs's.
    """
    if storage.is_remote(uri):
        return dt.to_pyarrow_dataset()
    from pyarrow import fs as pa_fs

    return dt.to_pyarrow_dataset(filesystem=pa_fs.SubTreeFileSystem(table_uri(uri), pa_fs.LocalFileSystem()))


def open_table(uri: str, storage_options: dict | None = None):
    """The DeltaTable at ``uri``, or None where none exists."""
    from deltalake import DeltaTable

    turi = table_uri(uri)
    opts = delta_options(uri, storage_options)
    if not DeltaTable.is_deltatable(turi, storage_options=opts):
        return None
    return DeltaTable(turi, storage_options=opts)


def table_version(uri: str, storage_options: dict | None = None) -> int | None:
    """Current version of the Delta table at ``uri`` (None where there is none)."""
    dt = open_table(uri, storage_options)
    return None if dt is None else int(dt.version())


def vacuum(uri: str, storage_options: dict | None = None) -> int:
    """Delta's own vacuum of the table at ``uri``: removes data files that the log retired more than the
    retention period (7 days) ago, and nothing else. Returns the number of files removed."""
    dt = open_table(uri, storage_options)
    return 0 if dt is None else len(dt.vacuum(dry_run=False))


def retrying(write, what: str, attempts: int = 12) -> None:
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


def list_width(table: pa.Table, column: str) -> int | None:
    if column not in table.column_names:
        return None
    typ = table.schema.field(column).type
    if pa.types.is_fixed_size_list(typ):
        return typ.list_size
    lengths = pc.list_value_length(table.column(column)).drop_null()
    return int(lengths[0].as_py()) if len(lengths) else None


def scan(uri: str, storage_options: dict | None, columns: list[str], filter_) -> pa.Table | None:
    dt = open_table(uri, storage_options)
    if dt is None:
        return None
    return arrow_dataset(dt, uri).to_table(columns=columns, filter=filter_)
