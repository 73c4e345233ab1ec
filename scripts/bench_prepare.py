"""Benchmark facemill's prepare face stage against facenet-pytorch's MTCNN, on LFW, in one process.

    python scripts/bench_prepare.py --device cpu --images 128 --mosaics 8 --batch 32
    python scripts/bench_prepare.py --device cuda --images 2048 --mosaics 128 --batch 256 --repeat 3 --ray

Workloads (seeded, built in memory; ``prepare_bench/workloads.py``):

* ``lfw``: N random LFW images (250 x 250 JPEG files, read once into memory);
* ``mosaic``: 1000 x 1000 mosaics of 16 random LFW images (4 x 4 grid of 250 x 250 tiles), JPEG-encoded
  in memory (quality 95) so that decoding them costs what decoding a real 1 MP file costs.

Per workload and repeat, on the same decoded images and the same batches (``prepare_bench/runs.py``):

* facemill face stage: ``FaceEngine.process`` (pad/upload, MTCNN, align, SFace embed, copy to host);
* facemill breakdown: the same call with the engine's profiling hook (``workers.faces.profile``) timing its
  stages (upload, P-Net pyramid, R-Net with the crop canvas, O-Net, align, embed, to-host) and
  the detector's parts (resize, net, crops, NMS), then write = the pipeline's own ``face_shard_row`` +
  ``write_shard`` (JPEG-encode crops, one Delta commit), synchronising CUDA around each;
* anchor: facenet-pytorch 2.6.0 ``MTCNN.detect`` (detection only) with its own weights
  (``prepare_bench/anchor.py``; a torchvision stand-in where torchvision cannot be imported).

``--ray`` also runs the whole prepare pipeline (``workers.pipeline.run_prepare``) on an embedded local Ray,
writing a dataset to a temporary folder. Prints a table and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/bench_prepare.py` from anywhere
    sys.path.insert(0, str(REPO))

from prepare_bench.anchor import STANDIN_NMS, load_anchor  # noqa: E402
from prepare_bench.measure import GpuSampler, Phases, peak_rss_mib  # noqa: E402
from prepare_bench.runs import STATS, load_facemill, run_ray, run_workload  # noqa: E402
from prepare_bench.table import print_table  # noqa: E402
from prepare_bench.workloads import lfw_files, lfw_workload, mosaic_workload  # noqa: E402

DEFAULT_LFW = REPO.parent / "shared" / "data" / "lfw" / "images"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python scripts/bench_prepare.py", description=__doc__.splitlines()[0])
    p.add_argument("--lfw", type=Path, default=DEFAULT_LFW, help="LFW images folder (<identity>/<file>.jpg)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--images", type=int, default=256, help="random LFW images (lfw workload)")
    p.add_argument("--mosaics", type=int, default=16, help="1000x1000 mosaics of 16 LFW faces (mosaic workload)")
    p.add_argument("--batch", type=int, default=32, help="images per batch (both systems)")
    p.add_argument("--mosaic-batch", type=int, default=0, help="images per mosaic batch (0: --batch)")
    p.add_argument("--workloads", default="lfw,mosaic", help="comma-separated: lfw, mosaic")
    p.add_argument("--repeat", type=int, default=1, help="timed passes per system")
    p.add_argument("--stat", choices=tuple(STATS), default="median",
                   help="statistic over the repeats (min: best of N, for machines shared with other jobs)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed warm-up passes over all batches (0: the first batch only)")
    p.add_argument("--no-parts", action="store_true",
                   help="do not time MTCNN's resizes / nets / crops / NMS inside the breakdown (fewer syncs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--embed-precision", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="facemill's embedder precision (EngineConfig.embed_precision)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--ray", action="store_true", help="also run the Ray prepare pipeline (a Delta dataset in a tmp dir)")
    p.add_argument("--ray-shard-size", type=int, default=32)
    p.add_argument("--ray-shards-per-call", type=int, default=1)
    p.add_argument("--ray-actors", type=int, default=0, help="face actors (0: one per GPU, or 1 on CPU)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=1.0)
    p.add_argument("--json", type=Path, default=Path("bench.json"), help="where to write the results")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    bad = [w for w in args.workloads if w not in ("lfw", "mosaic")]
    if bad:
        p.error(f"--workloads must name lfw and/or mosaic, got {bad}")
    for name in ("images", "mosaics", "batch", "repeat"):
        if getattr(args, name) < (0 if name in ("images", "mosaics") else 1):
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    return args


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from workers.decode import decode_image
    from workers.faces.embedders import default_embed_batch
    from workers.faces.mtcnn import default_crop_chunk, default_stage1_pixels

    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    gpu_index = visible if visible.isdigit() else str(device.index or 0)
    sampler = GpuSampler(gpu_index).start() if device.type == "cuda" else GpuSampler(gpu_index)
    phases = Phases(torch, device, sampler)

    machine = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda, "nvidia_smi": sampler.active,
    }
    log(f"bench_prepare: device {device}, torch {torch.__version__} ({machine['torch_threads']} threads), "
        f"{os.cpu_count()} CPUs" + (f", {machine['gpu']}" if machine["gpu"] else ""))

    t_load = time.perf_counter()
    engine, spec = load_facemill(device, args.embed_precision)
    anchor, anchor_info = load_anchor(device)
    log(f"models loaded in {time.perf_counter() - t_load:.1f} s; anchor: facenet-pytorch "
        f"{anchor_info.get('anchor_version')}, NMS {anchor_info['anchor_nms']}")

    files = lfw_files(args.lfw)
    builders = {"lfw": lambda: lfw_workload(files, args.images, args.seed),
                "mosaic": lambda: mosaic_workload(files, args.mosaics, args.seed)}
    mtcnn = engine.config.mtcnn
    results = {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]) if argv is None else argv,
               "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "machine": machine, **anchor_info,
               "facemill_config": json.loads(json.dumps(dataclasses.asdict(engine.config), default=str)),
               "facemill_chunks": {"crop_chunk": mtcnn.crop_chunk or default_crop_chunk(device),
                                   "stage1_pixels": mtcnn.stage1_pixels or default_stage1_pixels(device),
                                   "embed_batch_size": engine.config.embed_batch_size or default_embed_batch(device)},
               "workloads": {}}
    tmp_root = Path(tempfile.mkdtemp(prefix="facemill-bench-"))
    ray_started = False
    try:
        for name in args.workloads:
            work = builders[name]()
            if not work.blobs:
                continue
            batch_size = args.mosaic_batch if name == "mosaic" and args.mosaic_batch else args.batch
            log(f"[{name}] {len(work.blobs)} images, batches of {batch_size}, {args.repeat} repeat(s)")
            results["workloads"][name] = res = run_workload(
                work, batch_size, args, engine, spec, anchor, phases, tmp_root, log, decode_image)
            if args.ray:
                if not ray_started:
                    from jobs._common import connect_ray

                    connect_ray(local_cpus=os.cpu_count())
                    ray_started = True
                log(f"[{name}] Ray prepare pipeline")
                res["ray"] = run_ray(work, device.type, args, tmp_root, log, phases)
    finally:
        sampler.stop()
        if ray_started:
            import ray

            ray.shutdown()
        shutil.rmtree(tmp_root, ignore_errors=True)
    results["peak_rss_mib_process"] = round(peak_rss_mib(), 1)
    results["anchor_nms_standin_s"] = round(STANDIN_NMS.seconds, 3)
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
