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
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench_train.py` from anywhere
    sys.path.insert(0, str(REPO))

from train_bench.anchor import anchor  # noqa: E402
from train_bench.config import (ANCHOR_RATIO_TARGET, FIRST_STEP_TARGET_S, MAX_CHUNK, NOTE, RSS_SLACK,  # noqa: E402
                                BenchConfig)
from train_bench.datasets import lfw_identity_bytes, plan, synthetic_dataset  # noqa: E402
from train_bench.table import print_tables  # noqa: E402
from train_bench.watch import judge, train_run  # noqa: E402
from workers import dataset  # noqa: E402


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
