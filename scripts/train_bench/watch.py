"""jobs.train in a subprocess, its process tree watched through /proc (peak RSS per process, metrics rows)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from train_bench.config import FIRST_STEP_TARGET_S, REPO, RSS_SLACK, BenchConfig


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live, non-zombie process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[1]), int(fields[19])) if fields[0] != "Z" else None


class TreeWatcher(threading.Thread):
    """Samples the process tree under ``root_pid`` and the metrics file every ``interval`` seconds.

    ``procs[pid]``: start time, first cmdline, ``ray::`` titles seen, peak VmHWM and RssAnon (bytes), and
    ``timeline``: (seconds after ``t0``, VmRSS MiB) about once a second; a process stays watched after its
    parent exits. ``rows_seen[n]``: seconds after ``t0`` when the metrics file first
    held ``n`` rows.
    """

    def __init__(self, root_pid: int, metrics: Path, t0: float, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.metrics, self.t0, self.interval = root_pid, metrics, t0, interval
        self.procs: dict[int, dict] = {}
        self.rows_seen: dict[int, float] = {}
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - keep sampling; reported in the JSON
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self.halt.wait(self.interval)

    def alive(self) -> list[int]:
        return [p for p, info in self.procs.items() if (_stat(p) or (0, -1))[1] == info["start"]]

    def sample(self) -> None:
        stats = {int(e.name): s for e in os.scandir("/proc") if e.name.isdigit() and (s := _stat(int(e.name)))}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = set(self.alive()), [self.root_pid]
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo += children.get(pid, [])
        for pid in tree & set(stats):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            except (OSError, ValueError):
                continue
            info = self.procs.setdefault(pid, {"start": stats[pid][1], "cmd": title[:100], "titles": set(),
                                               "hwm": 0, "anon": 0, "timeline": []})
            if title.startswith("ray::"):
                info["titles"].add(title.strip()[:80])
            for key, field in (("hwm", "VmHWM"), ("anon", "RssAnon")):
                info[key] = max(info[key], int(status.get(field, "0 kB").split()[0]) * 1024)
            now = round(time.monotonic() - self.t0, 1)
            if not info["timeline"] or now - info["timeline"][-1][0] >= 1.0:
                info["timeline"].append((now, int(status.get("VmRSS", "0 kB").split()[0]) // 1024))
        try:
            rows = sum(1 for line in self.metrics.read_text().splitlines() if line.strip())
        except FileNotFoundError:
            rows = 0
        for n in range(1, rows + 1):
            self.rows_seen.setdefault(n, time.monotonic() - self.t0)

    def stop_and_reap(self, grace_s: float = 30.0) -> list[int]:
        """Stop sampling; wait for the tree to exit, then TERM, then KILL what is left. Returns the pids killed."""
        self.halt.set()
        self.join()
        deadline = time.monotonic() + grace_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        killed = self.alive()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.alive():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if self.alive():
                time.sleep(5)
        return killed


def train_run(cfg: BenchConfig, label: str, planned: dict, log=print) -> dict:
    """Run jobs.train once on ``planned['data'].faces`` and measure it (see the module docstring)."""
    out = Path(cfg.work) / "runs" / label
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "jobs.train", "--faces", planned["data"].faces, "--output", str(out / "run"),
           "--workers", str(cfg.workers), "--epochs", "1", "--steps-per-epoch", str(cfg.steps),
           "--people-per-batch", str(cfg.people_per_batch), "--images-per-person", str(cfg.images_per_person),
           "--heldout-fraction", repr(planned["heldout_fraction"]), "--seed", str(cfg.seed),
           "--local-cpus", str(cfg.local_cpus), "--keep-checkpoints", "1", *cfg.train_args.split()]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # never join another Ray
    log(f"  {' '.join(cmd)}")
    t0 = time.monotonic()
    with open(out / "train.log", "w") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
        watch = TreeWatcher(proc.pid, out / "run" / "metrics.jsonl", t0)
        watch.start()
        try:
            rc = proc.wait(timeout=cfg.timeout_s)
        except subprocess.TimeoutExpired:
            rc = f"killed after {cfg.timeout_s:.0f} s"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            wall = time.monotonic() - t0
            killed = watch.stop_and_reap()
    metrics = out / "run" / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    row = next((r for r in rows if r.get("epoch") == 1), {})
    workers = sorted((i for i in watch.procs.values() if any("RayTrainWorker" in t for t in i["titles"])),
                     key=lambda i: -i["hwm"])
    loop_start, seen = watch.rows_seen.get(1), watch.rows_seen
    procs = sorted(({"pid": p, "peak_rss": i["hwm"], "peak_anon": i["anon"], "cmd": i["cmd"],
                     "titles": sorted(i["titles"]),
                     **({"rss_timeline_mib": i["timeline"]} if any("RayTrainWorker" in t for t in i["titles"]) else {})}
                    for p, i in watch.procs.items()), key=lambda d: -d["peak_rss"])
    if rc != 0:
        log(f"  jobs.train exited {rc}; last lines of {out / 'train.log'}:\n"
            + "\n".join((out / "train.log").read_text().splitlines()[-15:]))
    return {"label": label, "rc": rc, "wall_s": round(wall, 2), "log": str(out / "train.log"),
            "worker_peak_rss": [i["hwm"] for i in workers], "worker_peak_anon": [i["anon"] for i in workers],
            "driver_peak_rss": watch.procs.get(proc.pid, {}).get("hwm"), "loop_start_s": loop_start,
            "loop_start_from_row1_s": seen[2] - row["epoch_time_s"] if 2 in seen and row else None,
            "time_to_first_step_s": loop_start + row["train_time_s"] / row["steps"] if loop_start and row else None,
            **{k: row.get(k) for k in ("samples_per_s", "train_time_s", "epoch_time_s", "steps")},
            "killed_leftover_pids": killed, "sampler_errors": watch.errors[:3], "processes": procs[:12]}


def judge(run: dict, planned: dict, cfg: BenchConfig) -> dict:
    workers, first = run["worker_peak_rss"], run["time_to_first_step_s"]
    return {"worker_rss": len(workers) == cfg.workers and max(workers) <= min(planned["share_bytes"]) + RSS_SLACK,
            "first_step": first is not None and first <= FIRST_STEP_TARGET_S,
            "completes": run["rc"] == 0 and run["samples_per_s"] is not None}
