"""reprocess: re-embed a prepared dataset from its stored crops, or process only new/changed input files.

    # re-embed with another embedder (registry name or exported directory): <root>/embeddings/<name>/
    python -m jobs.reprocess --output out/lfw --embedder runs/ft/embedder
    # incremental: only files new or changed since the last run (any jobs.prepare option may follow)
    ray job submit --submission-id facemill-reprocess-$(date +%Y%m%dT%H%M) --working-dir . -- \\
        python -m jobs.reprocess --incremental --input s3://bucket/faces --output s3://bucket/facemill

Both take the dataset's run lease before Ray starts; a run that finds it held by a live run exits with
status 2 and one line.
The run id recorded in every row is --run-id / --submission-id, else the Ray job's submission id.
"""
from __future__ import annotations

import argparse
import json
import os

from jobs._common import add_ray_options, connect_ray, fail, storage_options


def submission_id() -> str:
    """The submission id of the Ray job running this driver ("" outside ``ray job submit``)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
        return str(config.get("metadata", {}).get("job_submission_id") or "")
    except (ValueError, AttributeError):
        return ""


def parse_args(argv=None):
    from jobs._options import (
        PREPARE_ONLY, add_pool_options, add_precision_option, add_prepare_options, pool_settings, prepare_config)
    from workers.reprocess import ReembedConfig
    from workers.runs import new_run_id

    d = ReembedConfig(root="")
    p = argparse.ArgumentParser(prog="python -m jobs.reprocess", description=__doc__.splitlines()[0])
    p.add_argument("--incremental", action="store_true", help="process only new or changed files of --input")
    p.add_argument("--input", help="with --incremental: the images (as for jobs.prepare)")
    p.add_argument("--output", "--root", dest="output", required=True, help="dataset root, local or s3://")
    p.add_argument("--embedder", default=None, help="registry name or exported embedder directory "
                                                    "(re-embed: required; incremental: as prepare, default sface)")
    p.add_argument("--name", default="", help="re-embed: table name under embeddings/ (default: the embedder's name)")
    p.add_argument("--run-id", "--submission-id", dest="run_id", default="",
                   help="run id recorded in every row (default: the Ray job submission id, else generated)")
    p.add_argument("--shared-fs", action="store_true",
                   help="a local --output (and --input) is on a filesystem every Ray node sees")
    add_ray_options(p)
    actors = p.add_argument_group("actors (both modes)")
    add_pool_options(actors, "embed actors")
    add_precision_option(actors, d.precision)
    actors.add_argument("--batch-size", type=int, default=d.batch_size,
                        help="re-embed: crops per forward pass (0: by device)")
    add_prepare_options(p.add_argument_group("incremental only (as jobs.prepare)"), suppress=True)
    args = p.parse_args(argv)
    args.run_id = args.run_id or submission_id() or new_run_id()
    opts = storage_options(args.s3_endpoint_url)
    given = [f"--{name.replace('_', '-')}" for name in PREPARE_ONLY if hasattr(args, name)]
    try:
        if args.incremental:
            if not args.input:
                p.error("--incremental needs --input")
            if args.name:
                p.error("--name is for re-embedding")
            return prepare_config(args, opts, args.run_id), args
        if given:
            p.error(f"{given[0]} is for --incremental (re-embedding detects nothing)")
        if args.input:
            p.error("--input is for --incremental; re-embedding reads the crops already stored under --output")
        if not args.embedder:
            p.error("re-embedding needs --embedder (a registry name or an exported embedder directory)")
        cfg = ReembedConfig(
            root=args.output, embedder=args.embedder, name=args.name, pool=pool_settings(args),
            batch_size=args.batch_size, precision=args.embed_precision, storage_options=opts, run_id=args.run_id,
            shared_fs=args.shared_fs)
    except ValueError as exc:
        fail(str(exc))
    return cfg, args


def main(argv=None) -> dict:
    from workers.faces.weights import WeightsNotFound
    from workers.dataset import require_dataset
    from workers.faces.weights import check_embedder
    from workers.lease import take_lease
    from workers.pipeline import check_prepare
    from workers.reprocess import run_incremental, run_reembed
    from workers.storage import StorageError

    cfg, args = parse_args(argv)
    root = cfg.output if args.incremental else cfg.root
    opts = dict(cfg.storage_options)
    try:  # everything that can fail fast, before Ray starts
        if args.incremental:
            checked = check_prepare(cfg)
        else:
            check_embedder(cfg.embedder)
            require_dataset(root, opts)
        lease = take_lease(root, cfg.run_id, "reprocess", opts)
    except (StorageError, ValueError, WeightsNotFound) as exc:
        fail(str(exc))
    try:
        connect_ray(args.local_cpus)
        summary = (run_incremental(cfg, lease=lease, checked=checked) if args.incremental
                   else run_reembed(cfg, lease=lease))
    except (StorageError, ValueError, WeightsNotFound) as exc:
        fail(str(exc))
    finally:
        lease.release()
    if args.incremental and not summary["nothing_to_do"]:
        from workers.pipeline import print_summary

        print_summary(summary)
    elif not args.incremental:
        s = summary
        print(f"facemill reprocess {s['run_id']}: " + (
            "nothing to do (every shard already embedded with this embedder version)" if s["nothing_to_do"] else
            f"{s['faces']} faces of {s['shards_done']} shards embedded with {s['embedder']} {s['embedder_version']}"
            f" ({s['shards_skipped']} shards already done, {s['bad_crops']} bad crops); {s['wall_time_s']:.1f} s")
            + f" -> {cfg.root}/{s['table']}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
