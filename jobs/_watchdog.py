"""Reap an embedded local Ray whose driver died without shutting it down (SIGKILL, OOM kill).

Ray's head processes share the driver's fate, but the agents the raylet starts (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``) outlive a SIGKILLed driver. ``python -m jobs._watchdog DRIVER_PID PID:START ...``
runs in its own session, polls the driver, and once it is gone (plus a grace period for Ray's own
shutdown) SIGKILLs every listed process that is still the same process (same start time in /proc).
"""
from __future__ import annotations

import os
import signal
import sys
import time


def start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start_time(pid) is not None and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def main(argv: list[str]) -> None:
    driver, targets = int(argv[0]), [tuple(a.split(":", 1)) for a in argv[1:]]
    while alive(driver):
        time.sleep(1.0)
    time.sleep(3.0)  # let Ray's own fate-sharing go first
    for pid, started in targets:
        if start_time(int(pid)) == started:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main(sys.argv[1:])
