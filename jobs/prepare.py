"""prepare: detect, align and embed every face of an image collection into Parquet.

    ray job submit --working-dir . -- python -m jobs.prepare --input ../shared/data/lfw/images --output out/lfw
    python -m jobs.prepare --input tests/data/sample --output out/sample   # embedded local Ray
"""
from __future__ import annotations

import argparse
import json

from jobs._common import add_ray_options, connect_ray, fail, storage_options


def parse_args(argv=None):
    from jobs._options import add_pool_options, add_precision_option, add_prepare_options, prepare_config
    from workers.runs import new_run_id

    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="folder (<identity>/<image> or flat), manifest .csv/.parquet, or s3://")
    p.add_argument("--output", required=True, help="dataset root, local or s3://")
    p.add_argument("--embedder", default="sface", help="registry name or exported embedder directory")
    add_prepare_options(p)
    add_precision_option(p)
    add_pool_options(p, "face actors")
    add_ray_options(p)
    p.add_argument("--run-id", default="", help="letters, digits, '.', '_', '-' (default: time + random)")
    p.add_argument("--shared-fs", action="store_true",
                   help="local --input/--output paths are on a filesystem every Ray node sees")
    args = p.parse_args(argv)
    try:
        cfg = prepare_config(args, storage_options(args.s3_endpoint_url), args.run_id or new_run_id())
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
