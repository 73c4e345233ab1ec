"""The filesystem layer: local paths and ``s3://`` (fsspec / s3fs) behind one set of helpers.

Everything that touches bytes on storage goes through here: path joining, "is this remote", whole-file
atomic writes with retries, conditional writes (create-if-absent, replace-if-unchanged) for the run lease,
and the classification of errors a retry cannot fix. Input listing lives in :mod:`workers.inputs`, the
dataset tables in :mod:`workers.dataset`.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import time
import uuid
import fsspec

RUNS = "_runs"


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


def is_remote(uri: str) -> bool:
    """True for URLs of object stores (``s3://...``); False for local paths and ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> str:
    """The filesystem path of a local path or ``file://`` URL."""
    return uri[len("file://"):] if uri.startswith("file://") else uri


def join(root: str, *parts: str) -> str:
    """Join path parts under a local path or URL."""
    return posixpath.join(root.rstrip("/"), *parts) if "://" in root else os.path.join(root, *parts)


def exists(uri: str, storage_options: dict | None = None) -> bool:
    """Whether a file or folder exists at ``uri``."""
    fs, path = url_to_fs(uri, storage_options)
    return fs.exists(path)


def read_json(uri: str, storage_options: dict | None = None) -> dict | None:
    """A JSON file's content, or None if it does not exist."""
    fs, path = url_to_fs(uri, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, NotADirectoryError):
        return None


def write_json(uri: str, value: dict, storage_options: dict | None = None) -> None:
    """Write ``value`` as indented JSON, atomically (:func:`put_atomic`)."""
    put_atomic(uri, (json.dumps(value, indent=2, default=str) + "\n").encode(), storage_options)


def unstrip(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Full URI for a path returned by fs (which strips the protocol)."""
    return fs.unstrip_protocol(path) if "://" in uri else path


def permanent_error(exc: BaseException) -> bool:
    """Errors a retry cannot fix: the object or bucket is missing, or access is denied."""
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return True
    text = f"{type(exc).__name__} {exc}"
    return any(k in text for k in ("NoSuchBucket", "AccessDenied", "Forbidden", "InvalidAccessKeyId"))


def put_atomic(uri: str, data: bytes, storage_options: dict | None = None, retries: int = 6) -> None:
    """Write a whole file so that it appears complete or not at all; retries transient failures."""
    fs, path = url_to_fs(uri, storage_options)
    for attempt in range(retries + 1):
        try:
            if is_remote(uri):
                fs.pipe_file(path, data)  # one PUT: S3 objects appear atomically
            else:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                _write_local(path, data)
            return
        except Exception as exc:  # noqa: BLE001 - classify, then retry or raise
            if permanent_error(exc) or attempt == retries:
                raise
            time.sleep(0.5 * 2 ** attempt)


# --------------------------------------------------------------------------------------------------
# Conditional writes (compare-and-swap on one small file): S3 conditional PUTs (If-None-Match: *,
# If-Match: <etag>); on a local or mounted filesystem the same under an exclusive flock of the file's
# folder, with the content's sha1 as its tag. Used by the run lease (workers.lease).
# --------------------------------------------------------------------------------------------------

def _precondition_failed(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, FileExistsError) or any(
        k in text for k in ("PreconditionFailed", "pre-conditions", "412", "ConditionalRequestConflict"))


@contextlib.contextmanager
def _folder_lock(path: str):
    """Exclusive flock of ``path``'s folder (created if missing), held for the block."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _local_tag(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def _write_local(path: str, data: bytes) -> None:
    """Write to a temporary name beside ``path``, fsync, then rename over it (readers see all or nothing)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_tagged(uri: str, storage_options: dict | None = None) -> tuple[bytes, str] | None:
    """(content, tag) of a small file, or None if it does not exist. The tag changes with every write."""
    fs, path = url_to_fs(uri, storage_options)
    if not is_remote(uri):
        with _folder_lock(path):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
        return data, hashlib.sha1(data).hexdigest()
    try:
        data = fs.cat_file(path)
        return data, str(fs.info(path)["ETag"])
    except FileNotFoundError:
        return None


def put_if_absent(uri: str, data: bytes, storage_options: dict | None = None) -> str | None:
    """Create a file only if none exists; returns its tag, or None if it already existed."""
    fs, path = url_to_fs(uri, storage_options)
    if not is_remote(uri):
        with _folder_lock(path):
            if os.path.lexists(path):
                return None
            _write_local(path, data)
        return hashlib.sha1(data).hexdigest()
    bucket, key, _ = fs.split_path(path)
    try:
        return str(fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"])
    except Exception as exc:  # noqa: BLE001 - a failed precondition is an answer, anything else raises
        if _precondition_failed(exc):
            return None
        raise


def replace_if_match(uri: str, data: bytes, tag: str, storage_options: dict | None = None) -> str | None:
    """Replace a file only if it still has ``tag``; returns the new tag, or None if it had changed."""
    fs, path = url_to_fs(uri, storage_options)
    if not is_remote(uri):
        with _folder_lock(path):
            if _local_tag(path) != tag:
                return None
            _write_local(path, data)
        return hashlib.sha1(data).hexdigest()
    bucket, key, _ = fs.split_path(path)
    try:
        return str(fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=tag)["ETag"])
    except Exception as exc:  # noqa: BLE001
        if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
            return None
        raise


def delete_if_match(uri: str, tag: str, storage_options: dict | None = None) -> bool:
    """Delete a file only if it still has ``tag`` (on S3: checked just before the DELETE)."""
    fs, path = url_to_fs(uri, storage_options)
    if not is_remote(uri):
        with _folder_lock(path):
            if _local_tag(path) != tag:
                return False
            os.remove(path)
        return True
    try:
        if str(fs.info(path)["ETag"]) != tag:
            return False
        fs.rm_file(path)
        return True
    except FileNotFoundError:
        return False


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


