"""The run lease of a dataset: one run writes a dataset at a time, and a crashed run's claim expires.

The lease is one small file, ``<root>/_lease.json``, changed only by compare-and-swap
(:func:`workers.storage.put_if_absent` / :func:`workers.storage.replace_if_match`), so two runs that
start at the same instant cannot both take it. The holder renews it from a background thread every
``ttl_s / 4``; a run that dies stops renewing, and its lease expires ``ttl_s`` after the last renewal
(on the same host a dead holder's pid frees it at once). A run that finds its lease changed by someone
else has lost it and stops before its next commit.

Concurrent *commits* are Delta Lake's job (optimistic concurrency in the transaction log); the lease
only keeps two runs from doing the same work twice and from vacuuming under each other.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from workers import storage
from workers.storage import StorageError

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 120.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _body(run_id: str, command: str, started: float, ttl_s: float) -> bytes:
    now = time.time()
    return json.dumps({"run_id": run_id, "command": command, "host": socket.gethostname(), "pid": os.getpid(),
                       "started_at": started, "renewed_at": now, "expires_at": now + ttl_s}).encode()


def _expired(held: dict | None, now: float) -> bool:
    """A lease nobody holds any more: past its expiry, unreadable, or held by a dead pid of this host."""
    if held is None:
        return True
    if now > float(held.get("expires_at", 0)):
        return True
    return held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1)))


class Lease:
    """A held run lease; renews itself until :meth:`release`.

    Attributes:
        root: the dataset root.
        run_id: the holder's run.
        ttl_s: seconds a lease stays valid without renewal.
    """

    def __init__(self, root: str, run_id: str, command: str, tag: str, ttl_s: float,
                 storage_options: dict | None, started: float):
        self.root, self.run_id, self.command, self.ttl_s = root, run_id, command, ttl_s
        self._uri = storage.join(root, LEASE_FILE)
        self._opts = storage_options
        self._tag = tag
        self._started = started
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{run_id}", daemon=True)
        self._thread.start()

    def body(self) -> bytes:
        return _body(self.run_id, self.command, self._started, self.ttl_s)

    def renew(self) -> None:
        """Extend the lease now; marks it lost if someone else changed it."""
        with self._lock:
            if self._lost or self._tag is None:
                return
            tag = storage.replace_if_match(self._uri, self.body(), self._tag, self._opts)
            if tag is None:
                self._lost = f"the lease of {self.root!r} was taken over by another run"
            self._tag = tag

    def _renew_loop(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
                last_ok = time.time()
            except Exception as exc:  # noqa: BLE001 - storage down: try again; give up once it expired
                if time.time() - last_ok > self.ttl_s:
                    self._lost = f"the lease of {self.root!r} could not be renewed for {self.ttl_s:g} s ({exc})"
            if self._lost:
                return

    def check(self) -> None:
        """Raise if the lease was lost (the run must stop before it commits more).

        Raises:
            StorageError: the lease was lost.
        """
        if self._lost:
            raise StorageError(self._lost)

    def release(self) -> None:
        """Stop renewing and remove the lease file if it is still this run's."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self._tag is not None and not self._lost:
                try:
                    storage.delete_if_match(self._uri, self._tag, self._opts)
                except Exception:  # noqa: BLE001 - it expires by itself
                    pass
            self._tag = None

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def take_lease(root: str, run_id: str, command: str, storage_options: dict | None = None,
               ttl_s: float = DEFAULT_TTL_S) -> Lease:
    """Take the run lease of ``root`` (atomically), or fail with one line.

    Args:
        root: dataset root (local or s3://).
        run_id: the run taking it.
        command: what the run is (``prepare``, ``reprocess``), shown to a run that finds it taken.
        storage_options: fsspec options.
        ttl_s: seconds without renewal after which the lease expires.

    Raises:
        StorageError: another live run holds the lease.
    """
    if ttl_s <= 0:
        raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
    uri = storage.join(root, LEASE_FILE)
    started = time.time()
    for _ in range(5):
        tag = storage.put_if_absent(uri, _body(run_id, command, started, ttl_s), storage_options)
        if tag is not None:
            return Lease(root, run_id, command, tag, ttl_s, storage_options, started)
        found = storage.read_tagged(uri, storage_options)
        if found is None:
            continue  # released between our two calls: try again
        data, old_tag = found
        try:
            held = json.loads(data)
        except ValueError:
            held = None
        now = time.time()
        if not _expired(held, now):
            raise StorageError(
                f"{root!r} is in use by run {held.get('run_id')!r} ({held.get('command')}, pid {held.get('pid')} on "
                f"{held.get('host')}, lease renewed {now - float(held.get('renewed_at', now)):.0f} s ago); wait for "
                f"it to finish (if it crashed, its lease expires in {float(held['expires_at']) - now:.0f} s)")
        tag = storage.replace_if_match(uri, _body(run_id, command, started, ttl_s), old_tag, storage_options)
        if tag is not None:
            return Lease(root, run_id, command, tag, ttl_s, storage_options, started)
    raise StorageError(f"could not take the lease of {root!r}: it changed hands 5 times while we tried")
