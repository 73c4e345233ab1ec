"""Reading listed files safely: regular files only, a byte cap, retries of transient failures.

Reading never opens what is not a regular file (a FIFO would block, ``/dev/zero`` never ends) and never
holds more than ``max_bytes`` of one file; such files come back as :class:`NotAFileError` /
:class:`FileTooLargeError`, which :func:`error_reason` maps to the recorded reasons.
"""
from __future__ import annotations

import os
import stat
import time
from collections import defaultdict
from typing import Any

import schemas as S
from workers.storage import is_remote, local_path, permanent_error, url_to_fs

MAX_BYTES = 512 * 2**20
_READ_CHUNK = 1 << 20


class NotAFileError(OSError):
    """A FIFO, device, socket or folder where a file was listed; it is never opened for reading."""


class FileTooLargeError(OSError):
    """A file larger than ``read_many``'s ``max_bytes``; at most ``max_bytes + 1`` of it were read."""


def error_reason(exc: BaseException) -> str:
    """The recorded reason (a ``schemas.ERR_*``) for an exception returned by :func:`read_many`.

    Args:
        exc: the exception in place of a file's bytes.

    Returns:
        ERR_NOT_A_FILE (a FIFO, device, socket or folder), ERR_MISSING (no such file), ERR_TOO_LARGE (over
        the byte cap) or ERR_READ (anything else: storage errors, denied access, out of memory).
    """
    if isinstance(exc, (NotAFileError, IsADirectoryError)):
        return S.ERR_NOT_A_FILE
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return S.ERR_MISSING
    if isinstance(exc, FileTooLargeError):
        return S.ERR_TOO_LARGE
    return S.ERR_READ


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, (NotAFileError, FileTooLargeError, MemoryError)) or permanent_error(exc)


def read_many(uris: list[str], storage_options: dict | None = None, retries: int = 6,
              max_bytes: int = MAX_BYTES) -> list[bytes | Exception]:
    """Read whole files (object stores: concurrently); failures come back as exceptions, in order.

    Local files are checked with ``stat`` before they are opened: anything but a regular file comes back as
    :class:`NotAFileError` unopened, a file over ``max_bytes`` as :class:`FileTooLargeError` unread (and a
    file that grows while read is cut off there). Object-store files are fetched with one ranged GET each
    of at most ``max_bytes + 1`` bytes (no HEAD): more means :class:`FileTooLargeError`.

    Args:
        uris: local paths or URLs (``s3://bucket/key``).
        storage_options: fsspec options.
        retries: retries of transient failures (connection refused, timeouts, 5xx), with exponential
            backoff (about 30 s in all for 6). Missing files, denied access, non-files, files over the cap
            and MemoryError are not retried.
        max_bytes: the most bytes one file may have.

    Returns:
        Per uri, its bytes or the exception that stopped it (see :func:`error_reason`).

    Raises:
        ValueError: ``max_bytes`` is negative.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    out: list = [None] * len(uris)
    todo = list(range(len(uris)))
    remote_fs: dict[str, Any] = {}
    for attempt in range(retries + 1):
        for i in (i for i in todo if not is_remote(uris[i])):
            out[i] = _read_local(local_path(uris[i]), max_bytes)
        by_scheme: dict[str, list[int]] = defaultdict(list)
        for i in todo:
            if is_remote(uris[i]):
                by_scheme[uris[i].split("://", 1)[0]].append(i)
        for scheme, idx in by_scheme.items():
            if scheme not in remote_fs:
                remote_fs[scheme] = url_to_fs(uris[idx[0]], storage_options)[0]
            for i, got in zip(idx, _read_remote(remote_fs[scheme], [uris[i] for i in idx], max_bytes)):
                out[i] = got
        todo = [i for i in todo if isinstance(out[i], Exception) and not _permanent(out[i])]
        if not todo or attempt == retries:
            break
        time.sleep(0.5 * 2 ** attempt)
    return out


def _read_local(path: str, max_bytes: int) -> bytes | Exception:
    """A regular local file's bytes, or the exception; never opens a FIFO or device, never holds more than
    ``max_bytes + 1`` bytes."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return NotAFileError(f"{path}: not a regular file ({_kind(st.st_mode)})")
        if st.st_size > max_bytes:
            return FileTooLargeError(f"{path}: {st.st_size} bytes exceeds max_bytes={max_bytes}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)                    # the file opened may not be the one stat saw
            if not stat.S_ISREG(st.st_mode):
                return NotAFileError(f"{path}: not a regular file ({_kind(st.st_mode)})")
            parts, total = [], 0
            while total <= max_bytes:            # st_size is a hint: /proc files say 0, files grow
                chunk = os.read(fd, min(max(st.st_size + 1, _READ_CHUNK), max_bytes + 1 - total))
                if not chunk:
                    break
                parts.append(chunk)
                total += len(chunk)
            if total > max_bytes:
                return FileTooLargeError(f"{path}: more than max_bytes={max_bytes} bytes")
            return b"".join(parts)
        finally:
            os.close(fd)
    except Exception as exc:  # noqa: BLE001 - MemoryError included: returned as data
        return exc


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _read_remote(fs, uris: list[str], max_bytes: int) -> list[bytes | Exception]:
    """One ranged GET per object, all at once (s3fs gathers them); an empty object answers 416."""
    paths = [fs._strip_protocol(u) for u in uris]
    try:
        got = fs.cat_ranges(paths, [0] * len(paths), [max_bytes + 1] * len(paths), on_error="return")
    except Exception as exc:  # noqa: BLE001 - the whole request failed (endpoint down): retry all
        got = [exc] * len(paths)
    out: list = []
    for uri, g in zip(uris, got):
        if isinstance(g, (bytes, bytearray)) and len(g) > max_bytes:
            g = FileTooLargeError(f"{uri}: more than max_bytes={max_bytes} bytes")
        elif isinstance(g, OSError) and _range_unsatisfiable(g):
            g = b""                              # a range from byte 0 is unsatisfiable only for 0 bytes
        out.append(bytes(g) if isinstance(g, bytearray) else g)
    return out


def _range_unsatisfiable(exc: BaseException) -> bool:
    text = str(exc)
    return "InvalidRange" in text or "range is not satisfiable" in text.lower()
