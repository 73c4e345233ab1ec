"""The audit folder: one Delta table per finding (:mod:`schemas.audit`), ``summary.json``, ``report.html``.

Each audit run replaces each table whole (one Delta overwrite transaction per table) and writes
``summary.json`` last, naming the run and the table versions it wrote: a reader that goes through
:func:`read_audit` reads exactly those versions, so a later or concurrent run cannot mix its rows into
what a summary describes.
"""
from __future__ import annotations

import pyarrow as pa

import schemas as S
from workers import delta, storage
from workers.storage import StorageError

SUMMARY = "summary.json"
REPORT = "report.html"


def table_uri(output: str, name: str) -> str:
    if name not in S.audit.AUDIT_SCHEMAS:
        raise ValueError(f"unknown audit table {name!r} (known: {', '.join(S.audit.AUDIT_TABLES)})")
    return storage.join(output, name)


def write_audit_table(output: str, name: str, table: pa.Table, storage_options: dict | None = None) -> int:
    """Replace audit table ``name`` under ``output`` by ``table`` (cast to its schema); returns its version."""
    from deltalake import write_deltalake

    uri = table_uri(output, name)
    data = table.select(S.audit.AUDIT_SCHEMAS[name].names).cast(S.audit.AUDIT_SCHEMAS[name])
    opts = delta.delta_options(uri, storage_options)
    target = delta.table_uri(uri)
    write_deltalake(target, data, mode="overwrite", schema_mode="overwrite", storage_options=opts)
    return int(delta.table_version(uri, storage_options))


def read_summary(output: str, storage_options: dict | None = None) -> dict:
    """The summary of the last complete audit in ``output``.

    Raises:
        StorageError: no complete audit there.
    """
    summary = storage.read_json(storage.join(output, SUMMARY), storage_options)
    if not summary or "tables" not in summary:
        raise StorageError(f"{output!r} holds no complete audit (no {SUMMARY}): run jobs.audit first")
    return summary


def read_audit(output: str, name: str, storage_options: dict | None = None, columns: list[str] | None = None
               ) -> pa.Table:
    """Audit table ``name`` at the version the last complete audit wrote.

    Raises:
        StorageError: no complete audit, or it did not write that table (e.g. clusters without --cluster).
    """
    from deltalake import DeltaTable

    summary = read_summary(output, storage_options)
    version = summary["tables"].get(name)
    if version is None:
        raise StorageError(f"the audit in {output!r} has no {name!r} table")
    uri = table_uri(output, name)
    dt = DeltaTable(delta.table_uri(uri), version=int(version),
                    storage_options=delta.delta_options(uri, storage_options))
    return delta.arrow_dataset(dt, uri).to_table(columns=columns)
