"""prepare: detect, align and embed every face of an image collection into Parquet.

    ray job submit --working-dir . -- python -m jobs.prepare --input ../shared/data/lfw/images --output out/lfw
    python -m jobs.prepare --input tests/data/sample --output out/sample   # embedded local Ray
"""
from __future__ import annotations

import argparse
import json

from jobs._common import connect_ray, fail, storage_options


def parse_args(argv=None):
    from workers.decode import DecodeConfig
    from workers.faces.align import AlignConfig
    from workers.faces.engine import EngineConfig
    from workers.faces.mtcnn import MTCNNConfig
    from workers.pipeline import PrepareConfig
    from workers.runs import new_run_id

    m, a, d = MTCNNConfig(), AlignConfig(), DecodeConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="folder (<identity>/<image> or flat), manifest .csv/.parquet, or s3://")
    p.add_argument("--output", required=True, help="dataset root, local or s3://")
    p.add_argument("--embedder", default="sface", help="registry name or exported embedder directory")
    p.add_argument("--min-face-size", type=int, default=m.min_face_size)
    p.add_argument("--thresholds", type=float, nargs=3, default=m.thresholds)
    p.add_argument("--factor", type=float, default=m.factor)
    p.add_argument("--select", choices=("all", "largest", "center"), default=m.select)
    p.add_argument("--max-faces", type=int, default=m.max_faces, help="per image, 0 = no limit")
    p.add_argument("--crop-size", type=int, default=a.size)
    p.add_argument("--crop-margin", type=float, default=a.margin)
    p.add_argument("--max-pixels", type=int, default=d.max_pixels)
    p.add_argument("--embed-precision", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="embedder precision: bfloat16 is ~2x faster on CPUs with AVX512-BF16 (see "
                        "docs/performance.md for its accuracy); float16 needs CUDA")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--shards-per-call", type=int, default=2)
    p.add_argument("--actors", type=int, default=0, help="face actors (0: one per GPU, or 1 on CPU)")
    p.add_argument("--gpus-per-actor", type=float, default=1.0)
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="intra-op threads per face actor (0: its CPUs; on a one-node CPU-only Ray, the node's cores "
                        "shared between the actors)")
    p.add_argument("--s3-endpoint-url", default=None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)")
    p.add_argument("--run-id", default="", help="letters, digits, '.', '_', '-' (default: time + random)")
    p.add_argument("--retry-errors", action="store_true",
                   help="reprocess every error row (transient errors such as read_failed are always retried)")
    p.add_argument("--shared-fs", action="store_true",
                   help="local --input/--output paths are on a filesystem every Ray node sees")
    p.add_argument("--local-cpus", type=int, default=None, help="CPUs of the embedded local Ray")
    args = p.parse_args(argv)
    try:
        cfg = PrepareConfig(
            input=args.input, output=args.output, embedder=args.embedder,
            engine=EngineConfig(
                mtcnn=MTCNNConfig(min_face_size=args.min_face_size, thresholds=tuple(args.thresholds),
                                  factor=args.factor, select=args.select, max_faces=args.max_faces),
                align=AlignConfig(size=args.crop_size, margin=args.crop_margin),
                embed_precision=args.embed_precision),
            decode=DecodeConfig(max_pixels=args.max_pixels), shard_size=args.shard_size,
            shards_per_call=args.shards_per_call, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
            cpus_per_actor=args.cpus_per_actor, device=args.device,
            storage_options=storage_options(args.s3_endpoint_url), run_id=args.run_id or new_run_id(),
            torch_threads=args.torch_threads, retry_errors=args.retry_errors, shared_fs=args.shared_fs)
    except ValueError as exc:
        fail(str(exc))
    return cfg, args


def main(argv=None) -> dict:
    from workers.faces.weights import WeightsNotFound
    from workers.lease import take_lease
    from workers.pipeline import check_prepare, print_summary, run_prepare
    from workers.storage import StorageError

    cfg, args = parse_args(argv)
    try:
        checked = check_prepare(cfg)  # fail fast, before Ray starts
        lease = take_lease(cfg.output, cfg.run_id, "prepare", dict(cfg.storage_options))
    except (StorageError, ValueError, WeightsNotFound) as exc:
        fail(str(exc))
    try:
        connect_ray(args.local_cpus)
        summary = run_prepare(cfg, checked=checked, lease=lease)
    except (StorageError, ValueError) as exc:
        fail(str(exc))
    finally:
        lease.release()
    print_summary(summary)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
