"""The anchor: streaming vs in-memory training batches, in this process without Ray, at LFW size."""
from __future__ import annotations

import copy
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from train_bench.config import ANCHOR_RATIO_TARGET, BenchConfig
from train_bench.datasets import plan


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
    from workers.training.head import restrict, to_local
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

    def timed(batches) -> float:   # a fresh TrainStep (as a new run), the worker's head, schedule and generators
        torch.manual_seed(cfg.seed)
        head = restrict(CombinedLoss(len(split.train), backbone.embedding_dim, tc.loss), shard.identities)
        net = FaceTrainNet(copy.deepcopy(backbone), head)
        step_fn = TrainStep(net, torch.device("cpu"), lr=tc.lr, head_lr_multiplier=tc.head_lr_multiplier,
                            weight_decay=tc.weight_decay, total_epochs=1, warmup_epochs=tc.warmup_epochs,
                            min_lr_ratio=tc.min_lr_ratio, grad_clip=tc.grad_clip)
        step_fn.train()
        t0 = time.perf_counter()
        for b in batches:
            step_fn(b.crops, to_local(shard.identities, b.labels), (b.step + 1) / steps,
                    step_generator(cfg.seed, 0, b.step, 0))
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
