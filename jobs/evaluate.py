"""evaluate: LFW-protocol face verification of a prepared dataset (k-fold accuracy, VAL@FAR, ROC AUC).

    python -m jobs.evaluate --faces out/lfw --pairs ../shared/data/lfw/pairs.txt --output out/lfw/eval
    python -m jobs.evaluate --faces out/lfw --pairs ../shared/data/lfw/pairs.txt --embeddings sface-ft \\
        --output out/lfw/eval-ft
    python -m jobs.evaluate --faces out/lfw --pairs ../shared/data/lfw/pairs.txt --folds 2 --output /tmp/quick

Any pairs file works: LFW text layout, or a .csv/.parquet pairs table (e.g. held-out pairs). Runs in the
driver only (no Ray): it reads one 128-float vector per face.
"""
from __future__ import annotations

import argparse
import json

from jobs._common import add_endpoint_option, fail, or_fail, storage_options


def parse_args(argv=None):
    from workers.evaluation.evaluate import EvaluateConfig

    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--faces", required=True, help="dataset root written by prepare, local or s3://")
    p.add_argument("--pairs", required=True, help="pairs file: LFW pairs.txt layout, or a .csv/.parquet pairs table")
    p.add_argument("--output", required=True, help="folder for eval.json and roc.png, local or s3://")
    p.add_argument("--embeddings", default="", help="embeddings/<name> table written by reprocess "
                                                    "(default: the faces table's own embeddings)")
    p.add_argument("--degrade", default="", help="evaluate on a degraded domain: lowres:16, jpeg:10+gray, mask, "
                                                 "blur:2, ... (stored crops degraded per image, re-embedded)")
    p.add_argument("--embedder", default="sface", help="with --degrade: the model that embeds the degraded crops")
    p.add_argument("--folds", type=int, default=0, help="use only the first K folds (0: all)")
    p.add_argument("--far", type=float, default=1e-3, help="false accept rate of VAL@FAR")
    add_endpoint_option(p)
    args = p.parse_args(argv)
    try:
        return EvaluateConfig(faces=args.faces, pairs=args.pairs, output=args.output, embeddings=args.embeddings,
                              folds=args.folds, far_target=args.far, degrade=args.degrade,
                              embedder=args.embedder,
                              storage_options=storage_options(args.s3_endpoint_url))
    except ValueError as exc:
        fail(str(exc))


def main(argv=None) -> dict:
    from workers.evaluation.evaluate import run_evaluate

    cfg = parse_args(argv)
    result = or_fail(lambda: run_evaluate(cfg))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
