"""audit: find mislabelled faces, near-duplicates, train/test leaks and low-quality faces; cluster faces.

    python -m jobs.audit --dataset out/lfw --against ../shared/data/lfw/pairs.txt --output out/lfw/audit
    python -m jobs.audit --dataset out/photos --cluster --output out/photos/audit     # unlabelled faces
    python -m jobs.train --faces out/lfw --exclude-audit out/lfw/audit ...             # train without them

Writes one Delta table per finding under --output (labels, identities, duplicates, quality, clusters;
columns in schemas/audit.py), summary.json and report.html. Every threshold below has the default that
scripts/bench_audit.py measured; each table keeps its scores, so a user can re-threshold without a rerun.
"""
from __future__ import annotations

import argparse
import json

from jobs._common import add_ray_options, connect_ray, fail, or_fail, storage_options


def parse_args(argv=None):
    from jobs._options import add_pool_options, pool_settings
    from workers.audit.clusters import ClusterSettings
    from workers.audit.config import AuditConfig
    from workers.audit.duplicates import DuplicateSettings
    from workers.audit.knn import SearchSettings
    from workers.audit.labels import LabelSettings
    from workers.audit.quality import QualitySettings
    from workers.runs import new_run_id

    lab, dup, qual, clu, srch = LabelSettings(), DuplicateSettings(), QualitySettings(), ClusterSettings(), \
        AuditConfig(root="-", output="-").search
    p = argparse.ArgumentParser(prog="python -m jobs.audit", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="dataset root written by prepare, local or s3://")
    p.add_argument("--output", default="", help="audit folder (default: <dataset>/audit)")
    p.add_argument("--embeddings", default="", help="audit embeddings/<name> (default: the faces table's own)")
    p.add_argument("--against", default="", help="an LFW-style pairs file or a dataset root: the evaluation set "
                                                 "whose near-copies among the faces are train/test leaks")
    p.add_argument("--against-dataset", default="", help="with a pairs file: the dataset holding its images "
                                                         "(default: --dataset)")
    p.add_argument("--cluster", action="store_true", help="also cluster the faces into identities (labels ignored)")
    p.add_argument("--all-faces", action="store_true", help="audit every face of an image, not only the first")
    t = p.add_argument_group("thresholds (cosines of unit embeddings)")
    t.add_argument("--label-own-max", type=float, default=lab.own_max,
                   help="a label suspect is at most this close to its identity's centre ...")
    t.add_argument("--label-other-min", type=float, default=lab.other_min,
                   help="... and at least this close to another identity's")
    t.add_argument("--split-max-cosine", type=float, default=lab.split_max_cosine,
                   help="an identity is two people when its two groups are at most this close")
    t.add_argument("--dup-cosine", type=float, default=dup.cosine_min, help="near-duplicates: embedding cosine")
    t.add_argument("--dup-pixels", type=float, default=dup.pixel_min, help="near-duplicates: thumbnail correlation")
    t.add_argument("--quality-below", type=float, default=qual.flag_below, help="flag faces of a lower quality score")
    t.add_argument("--cluster-seed", type=float, default=clu.seed, help="kNN edges that seed clusters")
    t.add_argument("--cluster-merge", type=float, default=clu.merge, help="average-linkage merge threshold")
    s = p.add_argument_group("search")
    s.add_argument("--k", type=int, default=srch.k, help="neighbours per face")
    s.add_argument("--nprobe", type=int, default=srch.nprobe, help="inverted lists searched (large sets, CPU)")
    add_pool_options(s, "search actors")
    p.add_argument("--run-id", default="", help="run id recorded in every row (default: generated)")
    add_ray_options(p)
    args = p.parse_args(argv)
    try:
        import dataclasses

        cfg = AuditConfig(
            root=args.dataset, output=args.output or args.dataset.rstrip("/") + "/audit",
            embeddings=args.embeddings, against=args.against, against_dataset=args.against_dataset,
            cluster=args.cluster, all_faces=args.all_faces,
            labels=dataclasses.replace(lab, own_max=args.label_own_max, other_min=args.label_other_min,
                                       split_max_cosine=args.split_max_cosine),
            duplicates=DuplicateSettings(candidate=min(dup.candidate, args.dup_cosine), cosine_min=args.dup_cosine,
                                         pixel_min=args.dup_pixels),
            quality=dataclasses.replace(qual, flag_below=args.quality_below),
            clusters=dataclasses.replace(clu, seed=args.cluster_seed, merge=args.cluster_merge),
            search=SearchSettings(k=args.k, nprobe=args.nprobe), pool=pool_settings(args),
            storage_options=storage_options(args.s3_endpoint_url), run_id=args.run_id or new_run_id())
    except ValueError as exc:
        fail(str(exc))
    return cfg, args


def main(argv=None) -> dict:
    from workers.audit.run import check_inputs, run_audit

    cfg, args = parse_args(argv)
    or_fail(lambda: check_inputs(cfg, dict(cfg.storage_options)))   # one line before Ray starts
    connect_ray(args.local_cpus)
    summary = or_fail(lambda: run_audit(cfg))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
