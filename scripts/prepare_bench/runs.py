"""The timed passes of one workload: facemill's face stage whole and by stage (through the engine's profiling
hook, then the pipeline's own writer), the anchor, and the optional Ray prepare pipeline."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from prepare_bench.anchor import STANDIN_NMS, agreement, anchor_boxes
from prepare_bench.measure import STAGES, Phases, StageClock
from prepare_bench.workloads import Workload, input_folder, same_shape_batches

STATS = {"median": statistics.median, "min": min}  # --stat: how repeats are summarised


def load_facemill(device, embed_precision: str = "float32"):
    from workers.faces.embedders import load_embedder
    from workers.faces.engine import EngineConfig, FaceEngine
    from workers.faces.mtcnn import MTCNN

    config = EngineConfig(embed_precision=embed_precision)
    embedder = load_embedder("sface", device)
    engine = FaceEngine(MTCNN.pretrained(config.mtcnn, device), embedder.module, config)
    return engine, embedder.spec


def write_batch(output: str, shard: str, uris: list[str], images: list[np.ndarray], res, spec) -> None:
    """Write one batch as a shard through the pipeline's own row builder and write task (crops JPEG-encoded,
    one Delta commit)."""
    from workers import dataset
    from workers.actors import face_shard_row, write_shard

    dataset.create_dataset(output, spec.embedding_dim)  # idempotent: a marker read once the table exists
    n = len(uris)
    row = {"shard": shard, "uris": uris, "identities": [None] * n, "fingerprints": [None] * n,
           "heights": [im.shape[0] for im in images], "widths": [im.shape[1] for im in images],
           "errors": [None] * n, "details": [None] * n}
    write_shard(face_shard_row(row, res, spec, "bench", "bench"), output=output, storage_options=None,
                crop_quality=95)


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 2) if seconds > 0 else None


def run_workload(work: Workload, batch_size: int, args, engine, spec, anchor, phases: Phases, tmp_root: Path,
                 log, decode_image) -> dict:
    name = work.name
    # Decode (shared by both systems: they get the same decoded pixels).
    decode_s = []
    for _ in range(args.repeat):
        with phases.phase(f"{name}/decode"):
            t0 = time.perf_counter()
            decoded = [decode_image(b) for b in work.blobs]
            decode_s.append(time.perf_counter() - t0)
    images = [d.image for d in decoded if d.image is not None]
    uris = [u for u, d in zip(work.uris, decoded) if d.image is not None]
    errors = len(decoded) - len(images)
    batches = same_shape_batches(images, batch_size)
    n = len(images)

    # Warm-up, not timed: lazy kernels, allocator, first imports of the write path.
    warm = batches if args.warmup else batches[:1]
    for _ in range(max(1, args.warmup)):
        for idx in warm:
            ims = [images[i] for i in idx]
            out = engine.process(ims)
            anchor_boxes(anchor, ims)
    write_batch(str(tmp_root / f"warmup_{name}"), "warmup", [uris[i] for i in warm[-1]],
                [images[i] for i in warm[-1]], out, spec)
    shutil.rmtree(tmp_root / f"warmup_{name}", ignore_errors=True)
    phases.sync()

    times = {"facemill": [], "breakdown": [], "anchor": []}
    stage_runs, part_runs, stage_cpu_runs, nms_runs = [], [], [], []
    faces = {}
    for r in range(args.repeat):
        with phases.phase(f"{name}/facemill"):
            t0 = time.perf_counter()
            fm_counts = []
            for idx in batches:
                out = engine.process([images[i] for i in idx])
                fm_counts.append(out.num_faces)
            phases.sync()
            times["facemill"].append(time.perf_counter() - t0)
        faces["facemill"] = int(sum(c.sum() for c in fm_counts))

        # The same work through the engine's profiling hook, then the write.
        clock = StageClock(phases.sync, parts=not args.no_parts)
        out_dir = tmp_root / f"write_{name}_{r}"
        fm_boxes: list[np.ndarray] = [np.zeros((0, 4), np.float32)] * n
        bd_counts = []
        with phases.phase(f"{name}/breakdown"):
            t0 = time.perf_counter()
            for k, idx in enumerate(batches):
                ims = [images[i] for i in idx]
                out = engine.process(ims, timer=clock)
                with clock.stage("write"):
                    write_batch(str(out_dir), f"bench-{k:05d}", [uris[i] for i in idx], ims, out, spec)
                bd_counts.append(out.num_faces)
                for j, i in enumerate(idx):
                    fm_boxes[i] = out.boxes[out.image_index == j]
            times["breakdown"].append(time.perf_counter() - t0)
        stage_runs.append(clock.seconds)
        stage_cpu_runs.append(clock.cpu_seconds)
        part_runs.append(clock.parts)
        shutil.rmtree(out_dir, ignore_errors=True)
        same = all(np.array_equal(a, b) for a, b in zip(fm_counts, bd_counts))

        with phases.phase(f"{name}/anchor"):
            t0 = time.perf_counter()
            an_boxes: list[np.ndarray] = [np.zeros((0, 4), np.float32)] * n
            nms0 = STANDIN_NMS.seconds
            for idx in batches:
                for i, b in zip(idx, anchor_boxes(anchor, [images[i] for i in idx])):
                    an_boxes[i] = b
            times["anchor"].append(time.perf_counter() - t0)
            nms_runs.append(STANDIN_NMS.seconds - nms0)
        faces["anchor"] = int(sum(len(b) for b in an_boxes))
        log(f"  repeat {r + 1}: facemill {times['facemill'][-1]:.2f} s, breakdown {times['breakdown'][-1]:.2f} s, "
            f"anchor {times['anchor'][-1]:.2f} s")

    stat = STATS[args.stat]
    stages = {s: round(stat([run[s] for run in stage_runs]), 4) for s in STAGES}
    stages_cpu = {s: round(stat([run[s] for run in stage_cpu_runs]), 4) for s in STAGES}
    part_keys = sorted({k for run in part_runs for k in run}, key=lambda k: (STAGES.index(k.split(".")[0]), k))
    parts = {k: round(stat([run.get(k, 0.0) for run in part_runs]), 4) for k in part_keys}
    for stage in () if args.no_parts else ("pnet", "rnet", "onet"):  # what the timed parts leave: indexing, nonzero, box math, syncs
        inner = sum(v for k, v in parts.items() if k.startswith(f"{stage}."))
        parts[f"{stage}.other"] = round(stages[stage] - inner, 4)
    detect = ("upload", "pnet", "rnet", "onet")
    dec = stat(decode_s)
    fm, an = stat(times["facemill"]), stat(times["anchor"])
    systems = {
        "decode": {"seconds": round(dec, 4), "images": n, "faces": None, **phases.report(f"{name}/decode", stat)},
        "facemill": {"seconds": round(fm, 4), "images": n, "faces": faces["facemill"],
                     **phases.report(f"{name}/facemill", stat)},
        "facemill_detect": {"seconds": round(sum(stages[s] for s in detect), 4), "images": n,
                            "faces": faces["facemill"], "note": "upload + P/R/O-Net stages of the breakdown pass",
                            **phases.report(f"{name}/breakdown", stat),
                            "cpu_s": round(sum(stages_cpu[s] for s in detect), 4)},
        "anchor": {"seconds": round(an, 4), "images": n, "faces": faces["anchor"],
                   "of_which_standin_nms_s": round(stat(nms_runs), 4), **phases.report(f"{name}/anchor", stat)},
    }
    for s in systems.values():
        s["img_per_s"] = _rate(n, s["seconds"])
        s["img_per_s_with_decode"] = _rate(n, s["seconds"] + dec) if s is not systems["decode"] else None
        s["faces_per_s"] = _rate(s["faces"], s["seconds"]) if s["faces"] is not None else None
    an_cpu = systems["anchor"]["cpu_s"]
    for key in ("facemill", "facemill_detect"):
        systems[key]["ratio_vs_anchor"] = round(an / systems[key]["seconds"], 3) if systems[key]["seconds"] else None
        cpu = systems[key]["cpu_s"]
        systems[key]["ratio_vs_anchor_cpu"] = round(an_cpu / cpu, 3) if cpu else None
        systems[key]["ratio_vs_anchor_with_decode"] = round((an + dec) / (systems[key]["seconds"] + dec), 3)
    return {
        "images": n, "decode_errors": errors, "batch": batch_size, "batches": len(batches),
        "image_shape": list(images[0].shape) if images else None,
        "times_s": {k: [round(t, 4) for t in v]
                    for k, v in {**times, "decode": decode_s, "anchor_standin_nms": nms_runs}.items()},
        "systems": systems,
        "breakdown_s": stages,
        "breakdown_share": {s: round(v / max(sum(stages.values()), 1e-12), 4) for s, v in stages.items()},
        "breakdown_parts_s": parts,
        "breakdown_cpu_s": stages_cpu,
        "breakdown_matches_process": same,
        "agreement": agreement(an_boxes, fm_boxes),
    }


def run_ray(work: Workload, device: str, args, tmp: Path, log, phases: Phases) -> dict:
    """The whole prepare pipeline (``workers.pipeline.run_prepare``) on the connected Ray, into ``tmp``."""
    import schemas as S
    from workers import dataset
    from workers.faces.engine import EngineConfig
    from workers.graph import PoolSettings
    from workers.pipeline import PrepareConfig, run_prepare

    inputs = input_folder(work, tmp)
    output = tmp / f"ray_out_{work.name}"
    pool = PoolSettings(shards_per_call=args.ray_shards_per_call, actors=args.ray_actors,
                        device="cuda" if device == "cuda" else "cpu", cpus_per_actor=args.ray_cpus_per_actor)
    cfg = PrepareConfig(input=inputs, output=str(output), shard_size=args.ray_shard_size, pool=pool,
                        run_id=f"bench-{work.name}", engine=EngineConfig(embed_precision=args.embed_precision))
    with phases.phase(f"{work.name}/ray"):
        t0 = time.perf_counter()
        summary = run_prepare(cfg, log=lambda msg: log(f"    {msg}"))
        wall = time.perf_counter() - t0
        rows = dataset.read_table(str(output), S.FACES, columns=[S.SHARD]).num_rows
    res = {"wall_s": round(wall, 3), "images": summary["images_in"], "faces": summary["faces"],
           "faces_rows_written": rows, "pipeline_wall_time_s": summary["wall_time_s"],
           "shard_size": cfg.shard_size, "actors": pool.actors, "cpus_per_actor": pool.cpus_per_actor}
    report = phases.report(f"{work.name}/ray")
    report["driver_cpu_s"] = report.pop("cpu_s")  # the Ray workers' CPU is not counted
    res.update(report)
    res["img_per_s"] = _rate(res["images"], res["wall_s"])
    res["faces_per_s"] = _rate(res["faces"], res["wall_s"])
    return res
