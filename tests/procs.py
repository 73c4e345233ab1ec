"""Process-tree helpers for tests that kill things (Linux /proc)."""
from __future__ import annotations

from pathlib import Path


def ppid(pid: int) -> int:
    """Parent pid of ``pid`` (-1 if it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return -1
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def pids_matching(pattern: str) -> list[int]:
    """Processes whose command line contains ``pattern`` (Ray workers show their class there)."""
    import os

    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if pattern in (d / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return [p for p in pids if p != os.getpid()]


def ray_workers(pattern: str) -> list[int]:
    """Worker processes of this process's Ray (children of its raylet) matching ``pattern``, not other Rays'."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [p for p in pids_matching(pattern) if ppid(p) == raylet]


def descendants(root: int) -> list[int]:
    """root and every process below it (from /proc PPid links)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            children.setdefault(ppid(int(d.name)), []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def kill_tree(proc) -> None:
    """SIGKILL a Popen'd process and every process below it, then reap it."""
    import os
    import signal

    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
