"""Benchmark jobs.train at scale: peak RSS per Ray Train worker and of the driver, time to first step, samples/s.

    python scripts/bench_train.py                                   # 200k and 1M faces, 20 steps, 2 workers
    python scripts/bench_train.py --sizes 5000 --steps 3 --work /tmp/bench_train_tiny
    python scripts/bench_train.py --sizes lfw,200000 --skip-anchor --json out.json

Per size, a synthetic faces table (a real facemill dataset: marker + Delta ``records`` table, committed with
``workers.dataset.commit_records``, ``--chunk`` faces per commit) is built from the face rows (face_index 0)
of a prepared LFW dataset: synthetic face ``i`` is LFW face ``i mod M`` (sorted by image_id) with its stored
JPEG crop and other columns, re-labelled identity ``syn<i // faces_per_identity>``, uri
``synthetic://<identity>/<n>.jpg`` and its own image_id (plus a matching image row). The synthetic identities
are for memory and throughput only, never for accuracy. Tables are cached under ``--work`` and reused while
their face count and the LFW table version match. The size ``lfw`` trains on the LFW dataset itself.

Each size runs ``python -m jobs.train`` (1 epoch of ``--steps`` steps, ``--workers`` workers, an embedded local
Ray of its own) as a subprocess. Every 0.2 s the script walks that process's tree in /proc: a process's peak
RSS is the largest VmHWM (the kernel's own peak resident set) seen; Ray Train workers are the processes whose
title was ever ``ray::RayTrainWorker...``; the driver is the jobs.train process. A worker's JPEG share is the
crop bytes of the identities ``plan_shards`` gives it (the split and shards jobs.train computes). Time to
first step: the chief writes metrics row 0 just before its epoch loop (after Ray start-up, the split, the
workers' start, its shard load, the model, the probe batch and the held-out evaluation of the starting
weights); the time from launching the subprocess until row 0 is seen, plus one mean step (``train_time_s /
steps`` of row 1), is the reported time to the end of the first step. ``loop_start_from_row1_s`` (when row 1
was seen minus its ``epoch_time_s``) cross-checks the loop start. samples/s is row 1's ``samples_per_s``
(all workers, training steps only). The held-out split is ``--heldout-identities`` identities, so the chief
evaluates a few hundred pairs.

Anchor (``--skip-anchor`` skips it), in this process without Ray, at LFW size: worker 0's shard of W workers,
the same ``PKSampler``, ``TrainStep`` and steps, run (a) streaming: JPEG bytes + ``prefetch_batches`` (the
worker's decoding threads) and (b) in-memory: every crop decoded up front (``load_faces``, the old path) and
batches indexed from that array; interleaved a, b, a, b, ... with a fresh TrainStep each; pinned to
``--anchor-cpus`` cores (a worker's share of the machine) and as many torch threads. Reports the range of
samples/s, the ratio of medians streaming / in-memory and the bytes each path holds.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench_train.py` from anywhere
    sys.path.insert(0, str(REPO))

import schemas as S  # noqa: E402
from workers import dataset, records  # noqa: E402
from workers.training.data import DataConfig, read_face_index, split_faces  # noqa: E402
from workers.training.stream import plan_shards  # noqa: E402

NOTE = ("NOTE: synthetic identities are re-labelled LFW crops (each crop reused under many identities): "
        "these numbers are for memory and throughput only, never for accuracy.")
RSS_SLACK = int(1.5 * (1 << 30))   # target: worker peak RSS <= its JPEG share + 1.5 GB
FIRST_STEP_TARGET_S = 120.0
ANCHOR_RATIO_TARGET = 0.9
MAX_CHUNK = 20_000                 # faces per commit: a 30k-uri commit_records predicate segfaults delta-rs


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark invocation (every field is a ``--flag``; see the module docstring)."""

    sizes: tuple[str, ...] = ("200000", "1000000")
    steps: int = 20
    workers: int = 2
    work: str = "/tmp/bench_train"
    lfw: str = "/tmp/study/lfw"
    json: str = ""
    skip_anchor: bool = False
    people_per_batch: int = 16
    images_per_person: int = 4
    faces_per_identity: int = 10
    chunk: int = 10_000
    heldout_identities: int = 8
    seed: int = 0
    local_cpus: int = 2
    anchor_repeats: int = 3
    anchor_cpus: int = 1
    timeout_s: float = 3600.0
    train_args: str = ""


# ------------------------------------------------------------------------------------------------------
# Datasets

def _relabel(table: pa.Table, columns: dict[str, list]) -> pa.Table:
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


def _source(lfw: str) -> tuple[pa.Table, pa.Table, int]:
    """(image rows, face rows) of LFW's first faces with an identity, row-aligned, sorted by image_id; D."""
    faces = dataset.read_table(lfw, S.RECORDS, filter=(pc.field(S.FACE_INDEX) == 0) & pc.field(S.IDENTITY).is_valid())
    faces = faces.take(pc.sort_indices(faces, sort_keys=[(S.IMAGE_ID, "ascending")]))
    images = dataset.read_table(lfw, S.RECORDS, filter=pc.field(S.FACE_INDEX) == S.IMAGE_ROW)
    owner = pd.Index(images.column(S.IMAGE_ID).to_numpy(zero_copy_only=False)).get_indexer(
        faces.column(S.IMAGE_ID).to_numpy(zero_copy_only=False))
    images = images.take(pa.array(owner)).set_column(images.schema.get_field_index(S.NUM_FACES), S.NUM_FACES,
                                                     pa.array(np.ones(len(owner), np.int32)))
    return images, faces, int(dataset.read_marker(lfw)["embedding_dim"])


def synthetic_dataset(cfg: BenchConfig, size: int, log=print) -> tuple[str, pd.Series]:
    """Build (or reuse) the synthetic dataset of ``size`` faces.

    Returns:
        (dataset root, int64 JPEG bytes per identity, indexed by identity name).
    """
    root, meta_path = Path(cfg.work) / f"synthetic-{size}", Path(cfg.work) / f"synthetic-{size}.json"
    per = cfg.faces_per_identity
    want = {"faces": size, "faces_per_identity": per, "source": cfg.lfw,
            "source_version": dataset.table_version(dataset.records_uri(cfg.lfw))}
    names = [f"syn{k:07d}" for k in range(-(-size // per))]
    if meta_path.exists() and dataset.read_marker(str(root)) is not None:
        meta = json.loads(meta_path.read_text())
        if ({k: meta.get(k) for k in want} == want
                and dataset.read_table(str(root), S.FACES, columns=[S.FACE_INDEX]).num_rows == size):
            log(f"  reusing {root}")
            return str(root), pd.Series(np.asarray(meta["identity_bytes"], np.int64), index=names)
    meta_path.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    images, faces, dim = _source(cfg.lfw)
    m = faces.num_rows
    dataset.create_dataset(str(root), dim)
    for c, start in enumerate(range(0, size, cfg.chunk)):
        i = np.arange(start, min(size, start + cfg.chunk))
        ident = [names[k] for k in (i // per).tolist()]
        uris = [f"synthetic://{n}/{j}.jpg" for n, j in zip(ident, (i % per).tolist())]
        cols = {S.IMAGE_ID: records.image_ids(uris), S.URI: uris, S.IDENTITY: ident, S.SHARD: [f"syn-{c:05d}"] * len(i)}
        src = pa.array(i % m)
        dataset.commit_records(str(root), pa.concat_tables([_relabel(images.take(src), cols),
                                                            _relabel(faces.take(src), cols)]))
        log(f"  built {i[-1] + 1}/{size} faces ({time.perf_counter() - t0:.0f} s)")
    lengths = pc.binary_length(faces.column(S.CROP)).to_numpy().astype(np.int64)
    i = np.arange(size)
    identity_bytes = np.bincount(i // per, weights=lengths[i % m], minlength=len(names)).astype(np.int64)
    meta_path.write_text(json.dumps({**want, "source_faces": m, "identity_bytes": identity_bytes.tolist()}))
    return str(root), pd.Series(identity_bytes, index=names)


def lfw_identity_bytes(root: str) -> pd.Series:
    table = dataset.read_table(root, S.FACES, columns=[S.IDENTITY, S.CROP], filter=pc.field(S.FACE_INDEX) == 0)
    lengths = pd.Series(pc.binary_length(table.column(S.CROP)).to_numpy().astype(np.int64))
    return lengths.groupby(table.column(S.IDENTITY).to_numpy(zero_copy_only=False)).sum()


def plan(cfg: BenchConfig, root: str, identity_bytes: pd.Series | None = None) -> dict:
    """The split and shards jobs.train will compute (same seed and fraction), and each worker's JPEG share."""
    index = read_face_index(DataConfig(faces=root))
    counts = index[S.IDENTITY].value_counts()
    fraction = min(0.5, cfg.heldout_identities / max(1, int((counts >= 2).sum())))
    data = DataConfig(faces=root, heldout_fraction=fraction, seed=cfg.seed)
    split = split_faces(index, data)
    owner, _ = plan_shards(split, cfg.workers, cfg.people_per_batch, cfg.seed, cfg.steps)
    per_identity = (identity_bytes if identity_bytes is not None else counts * 0).reindex(list(split.train))
    return {"data": data, "split": split, "faces": len(index), "identities": len(counts),
            "train_identities": len(split.train), "heldout_fraction": fraction,
            "share_bytes": [int(per_identity.to_numpy()[owner == w].sum()) for w in range(cfg.workers)],
            "share_faces": [int(np.asarray(split.train_counts)[owner == w].sum()) for w in range(cfg.workers)]}


# ------------------------------------------------------------------------------------------------------
# jobs.train in a subprocess, watched through /proc

def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time in clock ticks) of a live, non-zombie process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[1]), int(fields[19])) if fields[0] != "Z" else None


class TreeWatcher(threading.Thread):
    """Samples the process tree under ``root_pid`` and the metrics file every ``interval`` seconds.

    ``procs[pid]``: start time, first cmdline, ``ray::`` titles seen, peak VmHWM and RssAnon (bytes); a process
    stays watched after its parent exits. ``rows_seen[n]``: seconds after ``t0`` when the metrics file first
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
                                               "hwm": 0, "anon": 0})
            if title.startswith("ray::"):
                info["titles"].add(title.strip()[:80])
            for key, field in (("hwm", "VmHWM"), ("anon", "RssAnon")):
                info[key] = max(info[key], int(status.get(field, "0 kB").split()[0]) * 1024)
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
                     "titles": sorted(i["titles"])} for p, i in watch.procs.items()), key=lambda d: -d["peak_rss"])
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


# ------------------------------------------------------------------------------------------------------
# Anchor: streaming vs in-memory, in this process, at LFW size

def anchor(cfg: BenchConfig, log=print) -> dict:
    saved = os.sched_getaffinity(0)
    if cfg.anchor_cpus > 0:
        os.sched_setaffinity(0, sorted(saved)[:cfg.anchor_cpus])   # before torch starts its thread pool
    try:
        pa.default_memory_pool().release_unused()
        Path("/proc/self/clear_refs").write_text("5")              # reset this process's VmHWM
        result = _anchor(cfg, log)
        hwm = Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]
        return {**result, "process_peak_rss": int(hwm) * 1024}
    finally:
        os.sched_setaffinity(0, saved)


def _anchor(cfg: BenchConfig, log) -> dict:
    import torch

    from workers.faces.embedders import load_embedder
    from workers.training.config import TrainConfig
    from workers.training.data import load_faces
    from workers.training.losses import CombinedLoss
    from workers.training.step import FaceTrainNet, TrainStep, step_generator
    from workers.training.stream import Batch, open_worker_shard, prefetch_batches
    from workers.training.worker import DECODE_THREADS, PREFETCH_BATCHES

    torch.set_num_threads(max(1, cfg.anchor_cpus))
    planned = plan(cfg, cfg.lfw)
    data, split = planned["data"], planned["split"]
    t = time.perf_counter()
    shard = open_worker_shard(data, split, cfg.workers, 0, cfg.people_per_batch, cfg.images_per_person, cfg.steps)
    load_stream = time.perf_counter() - t
    t = time.perf_counter()
    decoded = load_faces(data, [split.train[i] for i in shard.identities.tolist()])
    load_memory = time.perf_counter() - t
    labels = shard.identities[decoded.labels]
    if not np.array_equal(labels, shard.faces.labels):
        raise RuntimeError("load_faces and load_encoded_faces order the shard's faces differently")
    steps, batch = shard.steps_per_epoch, shard.sampler.batch_size
    threads = min(max(1, DECODE_THREADS[0]), DECODE_THREADS[1])     # worker.py's count at cpus_per_worker 1
    backbone, tc = load_embedder("sface").module, TrainConfig(data=data, output="")

    def timed(batches) -> float:   # a fresh TrainStep (as a new run), the worker's schedule and generators
        torch.manual_seed(cfg.seed)
        net = FaceTrainNet(copy.deepcopy(backbone), CombinedLoss(len(split.train), backbone.embedding_dim, tc.loss))
        step_fn = TrainStep(net, torch.device("cpu"), lr=tc.lr, head_lr_multiplier=tc.head_lr_multiplier,
                            weight_decay=tc.weight_decay, total_epochs=1, warmup_epochs=tc.warmup_epochs,
                            min_lr_ratio=tc.min_lr_ratio, grad_clip=tc.grad_clip)
        step_fn.train()
        t0 = time.perf_counter()
        for b in batches:
            step_fn(b.crops, b.labels, (b.step + 1) / steps, step_generator(cfg.seed, 0, b.step, 0))
        return time.perf_counter() - t0

    def streaming(n: int):
        return prefetch_batches(shard.faces, shard.sampler, 0, n, threads=threads, depth=max(PREFETCH_BATCHES, threads))

    def in_memory(n: int):
        for s in range(n):
            index = shard.sampler.indices_for_step(0, s)
            yield Batch(step=s, index=index, crops=decoded.crops[index], labels=labels[index])

    timed(streaming(1)), timed(in_memory(1))    # warm-up, untimed
    rates: dict[str, list[float]] = {"streaming": [], "in_memory": []}
    for r in range(cfg.anchor_repeats):
        for name, make in (("streaming", streaming), ("in_memory", in_memory)):
            rates[name].append(round(steps * batch / timed(make(steps)), 2))
            log(f"  anchor {r + 1}/{cfg.anchor_repeats} {name}: {rates[name][-1]} samples/s")
    ratio = statistics.median(rates["streaming"]) / statistics.median(rates["in_memory"])
    return {"dataset": cfg.lfw, "faces_in_shard": len(shard.faces), "steps": steps, "batch": batch,
            "decode_threads": threads, "torch_threads": torch.get_num_threads(), "cpus": cfg.anchor_cpus,
            "held_bytes": {"streaming": shard.faces.nbytes, "in_memory": int(decoded.crops.nbytes)},
            "load_s": {"streaming": round(load_stream, 2), "in_memory": round(load_memory, 2)},
            "samples_per_s": rates, "ratio_median": round(ratio, 3),
            "ratio_range": [round(min(rates["streaming"]) / max(rates["in_memory"]), 3),
                            round(max(rates["streaming"]) / min(rates["in_memory"]), 3)],
            "pass": ratio >= ANCHOR_RATIO_TARGET}


# ------------------------------------------------------------------------------------------------------

def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _s(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def print_tables(results: list[dict], a: dict | None) -> None:
    print("\n" + NOTE)
    head = (f"{'size':>8} {'faces':>8} {'ids':>7} {'share MB':>9} {'worker peak MB':>15} {'over share':>10} "
            f"{'target MB':>9} {'driver MB':>9} {'1st step s':>10} {'samples/s':>9}  rss  1st  done")
    print(head + "\n" + "-" * len(head))
    for r in results:
        ok, run, share = {k: "ok" if v else "FAIL" for k, v in r["pass"].items()}, r["run"], min(r["share_bytes"])
        over = max(run["worker_peak_rss"]) - share if run["worker_peak_rss"] else None
        print(f"{r['size']:>8} {r['faces']:>8} {r['identities']:>7} {_mb(share):>9} "
              f"{'/'.join(_mb(x) for x in run['worker_peak_rss']) or '-':>15} {_mb(over):>10} "
              f"{_mb(share + RSS_SLACK):>9} "
              f"{_mb(run['driver_peak_rss']):>9} {_s(run['time_to_first_step_s']):>10} {_s(run['samples_per_s']):>9}"
              f"  {ok['worker_rss']:>4} {ok['first_step']:>4} {ok['completes']:>4}")
    if a:
        print(f"\nanchor at LFW size: worker 0 of {a['workers']} ({a['faces_in_shard']} faces), {a['steps']} steps "
              f"of {a['batch']}, {a['cpus']} CPU(s), {a['torch_threads']} torch / {a['decode_threads']} decode threads")
        print(f"{'path':>10} {'held MB':>8} {'load s':>7} {'samples/s min..median..max':>28} {'vs in-memory':>18}")
        low, high = a["ratio_range"]
        for name in ("in_memory", "streaming"):
            v = a["samples_per_s"][name]
            rel = "1.00" if name == "in_memory" else f"{a['ratio_median']:.2f} ({low:.2f}..{high:.2f})"
            print(f"{name:>10} {_mb(a['held_bytes'][name]):>8} {a['load_s'][name]:>7.1f} "
                  f"{f'{min(v):.1f}..{statistics.median(v):.1f}..{max(v):.1f}':>28} {rel:>18}")
        print(f"target streaming / in-memory >= {ANCHOR_RATIO_TARGET}: {'ok' if a['pass'] else 'FAIL'}; "
              f"this process's peak RSS over both paths: {_mb(a['process_peak_rss'])} MB")


def parse_args(argv=None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(d.sizes), help="comma-separated face counts, or 'lfw'")
    p.add_argument("--skip-anchor", action="store_true")
    for f in dataclasses.fields(BenchConfig):
        if f.name not in ("sizes", "skip_anchor"):
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    if any(s != "lfw" and not s.isdigit() for s in sizes):
        p.error(f"--sizes takes face counts or 'lfw', got {args.sizes!r}")
    if not 0 < args.chunk <= MAX_CHUNK:
        p.error(f"--chunk must be in 1..{MAX_CHUNK} (commit_records of 30k uris segfaults delta-rs): {args.chunk}")
    return BenchConfig(**{**vars(args), "sizes": sizes})


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    Path(cfg.work).mkdir(parents=True, exist_ok=True)
    if dataset.read_marker(cfg.lfw) is None:
        raise SystemExit(f"error: {cfg.lfw!r} is not a prepared facemill dataset (run jobs.prepare on LFW first)")
    print(NOTE, flush=True)
    results = []
    for size in cfg.sizes:
        print(f"size {size}:", flush=True)
        root, identity_bytes = ((cfg.lfw, lfw_identity_bytes(cfg.lfw)) if size == "lfw"
                                else synthetic_dataset(cfg, int(size)))
        planned = plan(cfg, root, identity_bytes)
        pa.default_memory_pool().release_unused()
        run = train_run(cfg, f"size-{size}", planned)
        keys = ("faces", "identities", "train_identities", "heldout_fraction", "share_bytes", "share_faces")
        results.append({"size": size, "dataset": root, "synthetic": size != "lfw", **{k: planned[k] for k in keys},
                        "run": run, "pass": judge(run, planned, cfg)})
        print("  " + json.dumps({k: run[k] for k in ("rc", "worker_peak_rss", "driver_peak_rss",
                                                     "time_to_first_step_s", "samples_per_s")}), flush=True)
    anchor_result = None if cfg.skip_anchor else {**anchor(cfg), "workers": cfg.workers}
    print_tables(results, anchor_result)
    out = {"note": NOTE, "config": dataclasses.asdict(cfg),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "mem_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
           "targets": {"worker_rss_slack_bytes": RSS_SLACK, "time_to_first_step_s": FIRST_STEP_TARGET_S,
                       "anchor_ratio": ANCHOR_RATIO_TARGET},
           "runs": results, "anchor": anchor_result}
    path = Path(cfg.json or Path(cfg.work) / "bench_train.json")
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
