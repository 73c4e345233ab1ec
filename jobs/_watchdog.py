"""Reap an embedded local Ray whose driver died without shutting it down (SIGKILL, OOM kill).

Ray's head processes share the driver's fate, but processes the raylet starts (``ray::DashboardAgent``,
``ray::RuntimeEnvAgent``, idle workers) can outlive a SIGKILLed driver. Before the driver starts its Ray it
starts ``python -m jobs._watchdog DRIVER_PID`` in a session of its own. The watchdog polls the driver;
once it is gone (plus a grace period for Ray's own shutdown) it SIGKILLs every process that belongs to
that driver's Ray session: the session folder is named ``session_<date>_<time>_<driver pid>``, and every
Ray process has it on its command line or holds files in it open (its logs).
"""
from __future__ import annotations

import os
import re
import signal
import sys
import time

def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def session_pattern(driver: int) -> re.Pattern:
    """Matches paths inside the Ray session folder that ``driver`` created."""
    return re.compile(rf"/session_[0-9_-]+_{driver}(/|$|\s)".encode())


def owned_by(driver: int) -> list[int]:
    """Processes of the Ray session started by ``driver``: the session folder in their command line or
    among their open files (this process excluded)."""
    pattern = session_pattern(driver)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if pattern.search(f.read().replace(b"\0", b" ")):
                    found.append(int(entry))
                    continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if pattern.search(os.readlink(f"/proc/{entry}/fd/{fd}").encode()):
                    found.append(int(entry))
                    break
        except OSError:
            pass
    return found


def main(argv: list[str]) -> None:
    driver = int(argv[0])
    while alive(driver):
        time.sleep(1.0)
    time.sleep(3.0)  # let Ray's own fate-sharing go first
    for _ in range(3):
        for pid in owned_by(driver):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(1.0)


if __name__ == "__main__":
    main(sys.argv[1:])
