"""Input listing: what files an input location holds, their identities, fingerprints and sizes.

A folder is an ``<identity>/.../<image>`` tree (identity = the first folder under the input root; files
directly in the root have none); a manifest is a ``.csv`` / ``.parquet`` with a ``uri`` column and optional
``identity`` and ``fingerprint`` columns. Every file found is either an input row or a skipped entry with
its reason (``not_an_image_extension``, ``hidden``: a dot-file or a file under a dot-folder, ``duplicate``:
a repeated manifest row, ``symlink_loop``: a linked folder that leads back to one of its ancestors,
``unreadable``: a folder that could not be listed): nothing vanishes. Local folders are walked following
symlinked folders and files. Reading the listed files is :mod:`workers.reading` (its names are importable
from here too).
"""
from __future__ import annotations

import asyncio
import os
import posixpath
from collections import defaultdict
from typing import Any

import fsspec.asyn
import pandas as pd

import schemas as S
from workers.decode import IMAGE_EXTENSIONS
from workers.reading import MAX_BYTES, FileTooLargeError, NotAFileError, error_reason, read_many  # noqa: F401 - re-exported
from workers.storage import StorageError, is_remote, local_path, permanent_error, unstrip, url_to_fs

SIZE = S.LISTING_SIZE
SKIP_EXTENSION = "not_an_image_extension"
SKIP_HIDDEN = "hidden"
SKIP_DUPLICATE = "duplicate"
SKIP_SYMLINK_LOOP = "symlink_loop"
SKIP_UNREADABLE = "unreadable"
_LIST_CONCURRENCY = 32                   # parent prefixes listed at once for manifest fingerprints


def _fingerprint(info: dict[str, Any]) -> str:
    """``f"{size}:{stamp}"`` of an fsspec listing entry (stamp: ETag for S3, else a modification time)."""
    etag = info.get("ETag") or info.get("etag")
    stamp = etag.strip('"') if etag else info.get("mtime") or info.get("LastModified") or info.get("created")
    return f"{info.get('size')}:{stamp}"


def _local_fingerprint(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _skip_reason(parts: tuple[str, ...]) -> str | None:
    """Why a file at these path parts (relative to the input root) is skipped, or None for an input."""
    if any(p.startswith(".") for p in parts):
        return SKIP_HIDDEN
    if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        return SKIP_EXTENSION
    return None


def _frame(uris: list[str], identities: list, fingerprints: list, sizes: list) -> pd.DataFrame:
    df = pd.DataFrame({S.URI: pd.Series(uris, dtype=object), S.IDENTITY: pd.Series(identities, dtype=object),
                       S.FINGERPRINT: pd.Series(fingerprints, dtype=object),
                       SIZE: pd.array(sizes, dtype="Int64")})
    return df.sort_values(S.URI, ignore_index=True, kind="stable")


def list_inputs(input_uri: str, storage_options: dict | None = None
                ) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """List the images of an input location.

    Args:
        input_uri: a folder (``<identity>/.../<image>`` tree: identity = the first folder under the root,
            None for files directly in it), or a manifest ``.csv`` / ``.parquet`` with a ``uri`` column and
            optional ``identity`` and ``fingerprint`` columns (relative uris are taken relative to the
            manifest's folder; an empty identity or fingerprint cell means none).
        storage_options: fsspec options (e.g. ``endpoint_url`` for S3).

    Returns:
        (images, skipped): a DataFrame with columns uri, identity, fingerprint (``f"{size}:{stamp}"``, a
        manifest's own value where given, None where the file is not there) and size (Int64 bytes, null
        where unknown), one row per unique uri sorted by uri; and skip reason -> sorted full uris of the
        entries skipped for it (only reasons that occurred).

    Raises:
        StorageError: the input does not exist, cannot be accessed or holds no image file; or a manifest
            has no uri column, an empty uri cell or a uri listed with two identities. One line each.
    """
    fs, path = url_to_fs(input_uri, storage_options)
    try:
        exists = fs.exists(path)
    except Exception as exc:  # noqa: BLE001 - credentials, endpoint, permissions
        raise StorageError(f"cannot access input {input_uri!r}: {_one_line(exc)}") from exc
    if not exists:
        raise StorageError(f"input {input_uri!r} does not exist")
    if path.lower().endswith((".csv", ".parquet")) and not fs.isdir(path):
        return _read_manifest(input_uri, fs, path, storage_options)
    local = not is_remote(input_uri)
    rows, skipped = _list_local(input_uri, fs, path) if local else _list_remote(input_uri, fs, path)
    if not rows[0]:
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(skipped.items())) or "nothing else"
        raise StorageError(f"input {input_uri!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                           f"skipped: {counts}")
    return _frame(*rows), {k: sorted(v) for k, v in sorted(skipped.items())}


def _list_local(input_uri: str, fs, root: str) -> tuple[tuple[list, ...], dict[str, list[str]]]:
    """Walk a local folder following symlinks; a linked folder that is its own ancestor is not entered."""
    skipped: dict[str, list[str]] = defaultdict(list)
    files: list[tuple[str, tuple[str, ...]]] = []
    if not os.path.isdir(root):
        files.append((root, (os.path.basename(root),)))
    stack = [(root, (), frozenset({os.path.realpath(root)}))] if os.path.isdir(root) else []
    while stack:
        folder, rel, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if folder == root:
                raise StorageError(f"cannot list input {input_uri!r}: {_one_line(exc)}") from exc
            skipped[SKIP_UNREADABLE].append(unstrip(input_uri, fs, folder))
            continue
        for entry in entries:
            parts = (*rel, entry.name)
            try:
                is_dir = entry.is_dir()          # follows a symlink
            except OSError:
                is_dir = False
            if not is_dir:
                files.append((entry.path, parts))
                continue
            real = os.path.realpath(entry.path)
            if real in ancestors:
                skipped[SKIP_SYMLINK_LOOP].append(unstrip(input_uri, fs, entry.path))
            else:
                stack.append((entry.path, parts, ancestors | {real}))
    uris, identities, fingerprints, sizes = [], [], [], []
    for path, parts in files:
        uri = unstrip(input_uri, fs, path)
        reason = _skip_reason(parts)
        if reason is not None:
            skipped[reason].append(uri)
            continue
        try:
            st = os.stat(path)                   # follows a symlink; a broken one is read as missing
            fingerprint, size = _local_fingerprint(st), st.st_size
        except OSError:
            fingerprint, size = None, None
        uris.append(uri), identities.append(parts[0] if len(parts) > 1 else None)
        fingerprints.append(fingerprint), sizes.append(size)
    return (uris, identities, fingerprints, sizes), skipped


def _list_remote(input_uri: str, fs, path: str) -> tuple[tuple[list, ...], dict[str, list[str]]]:
    """One recursive listing of an object-store prefix."""
    try:
        found = fs.find(path, detail=True)
    except Exception as exc:  # noqa: BLE001 - permissions, endpoint
        raise StorageError(f"cannot list input {input_uri!r}: {_one_line(exc)}") from exc
    root = path.rstrip("/") + "/"
    skipped: dict[str, list[str]] = defaultdict(list)
    uris, identities, fingerprints, sizes = [], [], [], []
    for p, info in sorted(found.items()):
        if info.get("type") == "directory" or p.endswith("/"):
            continue
        parts = tuple((p[len(root):] if p.startswith(root) else posixpath.basename(p)).split("/"))
        uri = unstrip(input_uri, fs, p)
        reason = _skip_reason(parts)
        if reason is not None:
            skipped[reason].append(uri)
            continue
        uris.append(uri), identities.append(parts[0] if len(parts) > 1 else None)
        fingerprints.append(_fingerprint(info)), sizes.append(info.get("size"))
    return (uris, identities, fingerprints, sizes), skipped


def _cell(value) -> str | None:
    """A manifest cell as text, None where empty (NaN, null, "" or blanks)."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    text = str(value)
    return text if text.strip() else None


def _read_manifest(input_uri: str, fs, path: str, storage_options: dict | None
                   ) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Rows of a manifest, with fingerprints and sizes from its files' listings (see list_inputs)."""
    try:
        with fs.open(path, "rb") as f:
            if path.lower().endswith(".parquet"):
                df = pd.read_parquet(f)
            else:  # only empty cells are missing: an identity "NA" or "null" is a name
                df = pd.read_csv(f, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as exc:  # noqa: BLE001 - unreadable or malformed
        raise StorageError(f"cannot read manifest {input_uri!r}: {_one_line(exc)}") from exc
    if S.MANIFEST_URI not in df.columns:
        raise StorageError(f"manifest {input_uri!r} has no {S.MANIFEST_URI!r} column (columns: {list(df.columns)})")
    cells = [_cell(v) for v in df[S.MANIFEST_URI]]
    empty = [i + 1 for i, c in enumerate(cells) if c is None]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        raise StorageError(f"manifest {input_uri!r} has {len(empty)} empty {S.MANIFEST_URI!r} "
                           f"cell{'s' if len(empty) > 1 else ''} (rows {shown}, counting data rows from 1)")
    remote = is_remote(input_uri)
    base = input_uri.rsplit("/", 1)[0] if remote else os.path.dirname(os.path.abspath(path))
    uris = []
    for c in cells:
        uri = c if "://" in c or c.startswith("/") else f"{base}/{c}"
        uris.append(os.path.normpath(uri) if "://" not in uri else uri)
    identities = ([_cell(v) for v in df[S.MANIFEST_IDENTITY]] if S.MANIFEST_IDENTITY in df.columns
                  else [None] * len(uris))
    own = [_cell(v) for v in df[S.FINGERPRINT]] if S.FINGERPRINT in df.columns else [None] * len(uris)
    rows = pd.DataFrame({S.URI: uris, S.IDENTITY: pd.Series(identities, dtype=object),
                         S.FINGERPRINT: pd.Series(own, dtype=object)})
    per_uri = rows.groupby(S.URI, sort=False)[S.IDENTITY].nunique(dropna=False)
    conflicts = per_uri[per_uri > 1]
    if len(conflicts):
        first = conflicts.index[0]
        seen = list(dict.fromkeys(rows.loc[rows[S.URI] == first, S.IDENTITY]))
        raise StorageError(f"manifest {input_uri!r}: {len(conflicts)} uris are listed with different identities, "
                           f"e.g. {first!r} as {seen[0]!r} and {seen[1]!r}")
    repeated = rows.duplicated(S.URI, keep="first")
    skipped = {SKIP_DUPLICATE: sorted(rows.loc[repeated, S.URI])} if repeated.any() else {}
    rows = rows[~repeated]
    unique = rows[S.URI].tolist()
    sizes, fingerprints = _stat_uris(unique, storage_options)
    fingerprints = [o if o is not None else f for o, f in zip(rows[S.FINGERPRINT], fingerprints)]
    return _frame(unique, rows[S.IDENTITY].tolist(), fingerprints, sizes), skipped


def _stat_uris(uris: list[str], storage_options: dict | None) -> tuple[list, list]:
    """(sizes, fingerprints) of files by uri, None where absent: ``os.stat`` for local files, one listing
    per distinct parent prefix (concurrent) for object stores, never a request per file.

    Raises:
        StorageError: a parent prefix could not be listed for a reason other than absence or denied access.
    """
    sizes: list = [None] * len(uris)
    fingerprints: list = [None] * len(uris)
    by_scheme: dict[str, list[int]] = defaultdict(list)
    for i, uri in enumerate(uris):
        if not is_remote(uri):
            try:
                st = os.stat(local_path(uri))
            except OSError:
                continue
            sizes[i], fingerprints[i] = st.st_size, _local_fingerprint(st)
        else:
            by_scheme[uri.split("://", 1)[0]].append(i)
    for idx in by_scheme.values():
        fs, _ = url_to_fs(uris[idx[0]], storage_options)
        paths = {i: fs._strip_protocol(uris[i]) for i in idx}
        by_parent: dict[str, list[int]] = defaultdict(list)
        for i, p in paths.items():
            by_parent[posixpath.dirname(p)].append(i)
        parents = list(by_parent)
        for parent, listing in zip(parents, _list_folders(fs, parents)):
            if isinstance(listing, Exception):
                if isinstance(listing, FileNotFoundError) or permanent_error(listing):
                    continue  # absent: read as missing; listing denied: rows go without fingerprints
                raise StorageError(f"cannot list {unstrip(uris[idx[0]], fs, parent)!r} for fingerprints: "
                                   f"{_one_line(listing)}") from listing
            entries = {e.get("name", "").rstrip("/"): e for e in listing}
            for i in by_parent[parent]:
                info = entries.get(paths[i])
                if info is not None and info.get("type") != "directory":
                    sizes[i], fingerprints[i] = info.get("size"), _fingerprint(info)
    return sizes, fingerprints


def _list_folders(fs, folders: list[str]) -> list[list[dict] | Exception]:
    """``fs.ls(folder, detail=True)`` of each folder, concurrently on async filesystems (s3fs)."""
    if isinstance(fs, fsspec.asyn.AsyncFileSystem) and not fs.asynchronous:
        async def one(folder, gate):
            async with gate:
                try:
                    return await fs._ls(folder, detail=True)
                except Exception as exc:  # noqa: BLE001 - returned as data
                    return exc

        async def every():
            gate = asyncio.Semaphore(_LIST_CONCURRENCY)
            return await asyncio.gather(*(one(f, gate) for f in folders))

        return list(fsspec.asyn.sync(fs.loop, every))
    out: list = []
    for folder in folders:
        try:
            out.append(fs.ls(folder, detail=True))
        except Exception as exc:  # noqa: BLE001 - returned as data
            out.append(exc)
    return out
