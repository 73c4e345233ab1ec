"""Measuring: wall and CPU time, host memory, GPU memory and utilisation; the engine's stage timer."""
from __future__ import annotations

import contextlib
import resource
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

from workers.faces.profile import STAGES as ENGINE_STAGES

STAGES = (*ENGINE_STAGES, "write")   # the engine's stages, then the benchmark's own write


def _vm_hwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started (getrusage; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class GpuSampler:
    """Samples ``nvidia-smi`` utilisation and memory in a background thread (a no-op without nvidia-smi)."""

    def __init__(self, gpu_index: str, interval_ms: int = 200):
        self.gpu_index, self.interval_ms = gpu_index, interval_ms
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, util %, memory used MiB)
        self._proc = None
        self._thread = None

    def start(self) -> "GpuSampler":
        exe = shutil.which("nvidia-smi")
        if exe is None:
            return self
        try:
            self._proc = subprocess.Popen(
                [exe, f"--id={self.gpu_index}", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", str(self.interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self._proc = None
            return self
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                self.samples.append((time.perf_counter(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue

    @property
    def active(self) -> bool:
        return self._proc is not None

    def summary(self, windows: list[tuple[float, float]]) -> dict | None:
        """Mean and max utilisation (%) and max memory used (MiB) over the samples inside the windows."""
        if not self.active:
            return None
        inside = [s for s in list(self.samples) if any(t0 <= s[0] <= t1 for t0, t1 in windows)]
        if not inside:
            return {"samples": 0}
        util = [s[1] for s in inside]
        return {"samples": len(inside), "util_mean": round(statistics.fmean(util), 1),
                "util_max": max(util), "mem_used_max_mib": max(s[2] for s in inside)}

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)


class Phases:
    """Wall-clock windows, peak host RSS and peak GPU memory of named phases (a phase may recur)."""

    def __init__(self, torch_mod, device, sampler: GpuSampler):
        self.torch, self.device, self.sampler = torch_mod, device, sampler
        self.windows: dict[str, list[tuple[float, float]]] = {}
        self.rss_mib: dict[str, float] = {}
        self.gpu_mib: dict[str, float] = {}
        self.cpu_s: dict[str, list[float]] = {}
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        per_phase_rss = _reset_vm_hwm()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            t1 = time.perf_counter()
            self.windows.setdefault(name, []).append((t0, t1))
            self.cpu_s.setdefault(name, []).append(time.process_time() - c0)
            hwm = _vm_hwm_kib() if per_phase_rss else None
            rss = hwm / 1024 if hwm is not None else peak_rss_mib()
            self.rss_mib[name] = max(self.rss_mib.get(name, 0.0), rss)
            if self.cuda:
                peak = self.torch.cuda.max_memory_allocated(self.device) / 2**20
                self.gpu_mib[name] = max(self.gpu_mib.get(name, 0.0), peak)

    def report(self, name: str, stat=statistics.median) -> dict:
        """Peaks, GPU samples and process CPU seconds (``stat`` over the occurrences) of a phase."""
        return {"cpu_s": round(stat(self.cpu_s[name]), 3) if name in self.cpu_s else None,
                "peak_rss_mib": round(self.rss_mib.get(name, float("nan")), 1),
                "peak_gpu_mib": round(self.gpu_mib[name], 1) if name in self.gpu_mib else None,
                "gpu": self.sampler.summary(self.windows.get(name, []))}


class StageClock:
    """The engine's profiling hook (``workers.faces.profile.StageTimer``) as clocks: accumulated wall and
    CPU seconds per stage and wall seconds per "<stage>.<part>"; synchronises CUDA around each.

    Args:
        sync: called before and after each timed span (``torch.cuda.synchronize`` on CUDA).
        parts: time the detector's parts too (False: ``part`` does nothing, fewer syncs).
    """

    def __init__(self, sync, parts: bool = True):
        self.sync, self.timed_parts = sync, parts
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.cpu_seconds = dict.fromkeys(STAGES, 0.0)
        self.parts: dict[str, float] = {}
        self.current: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str):
        self.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        self.current = name
        try:
            yield
        finally:
            self.sync()
            self.current = None
            self.seconds[name] += time.perf_counter() - t0
            self.cpu_seconds[name] += time.process_time() - c0

    def part(self, name: str):
        return self._part(name) if self.timed_parts else contextlib.nullcontext()

    @contextlib.contextmanager
    def _part(self, name: str):
        key = f"{self.current}.{name}"
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.parts[key] = self.parts.get(key, 0.0) + time.perf_counter() - t0
