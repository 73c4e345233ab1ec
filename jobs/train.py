"""train: fine-tune the SFace embedder on a prepared faces table with Ray Train (DDP).

    python -m jobs.train --faces out/lfw --exclude-pairs ../shared/data/lfw/pairs.txt --workers 2 --output runs/ft1
    ray job submit --working-dir . -- python -m jobs.train --faces s3://bucket/lfw --output s3://bucket/runs/ft1 \\
        --workers 8 --use-gpu auto

Rerunning with the same --output resumes from its newest checkpoint (any --workers); --epochs can be raised
to train further. The fine-tuned model is exported to <output>/embedder (use it as
`python -m jobs.prepare --embedder runs/ft1/embedder`; a local `runs/ft1` works too).
"""
from __future__ import annotations

import argparse
import json

from jobs._common import add_ray_options, connect_ray, fail, storage_options


def parse_args(argv=None):
    from workers.training.data import DataConfig
    from workers.training.config import PRECISIONS, USE_GPU_CHOICES, TrainConfig
    from workers.training.losses import LossConfig
    from workers.training.mining import MINING_MODES

    t, d, loss = TrainConfig(data=DataConfig(faces=""), output=""), DataConfig(faces=""), LossConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    p.add_argument("--faces", required=True, help="dataset root written by prepare (local or s3://)")
    p.add_argument("--output", required=True, help="run folder (local or s3://); the same folder resumes")
    p.add_argument("--exclude-pairs", default=None, help="pairs file whose identities are never trained on")
    p.add_argument("--exclude-audit", default=None, help="audit folder (jobs.audit): leave out the faces it flagged")
    p.add_argument("--init", default=t.init, help="registry name or exported embedder directory to start from")
    p.add_argument("--workers", type=int, default=t.workers)
    p.add_argument("--epochs", type=int, default=t.epochs)
    p.add_argument("--people-per-batch", type=int, default=t.people_per_batch, help="P identities per worker")
    p.add_argument("--images-per-person", type=int, default=t.images_per_person, help="K images per identity")
    p.add_argument("--steps-per-epoch", type=int, default=t.steps_per_epoch, help="cap; 0 = a full pass")
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--head-lr-multiplier", type=float, default=t.head_lr_multiplier)
    p.add_argument("--weight-decay", type=float, default=t.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=t.warmup_epochs)
    p.add_argument("--grad-clip", type=float, default=t.grad_clip, help="0 = no clipping")
    p.add_argument("--margin", type=float, default=loss.margin)
    p.add_argument("--mining", choices=MINING_MODES, default=loss.mining)
    p.add_argument("--triplet-weight", type=float, default=loss.triplet_weight)
    p.add_argument("--softmax-weight", type=float, default=loss.softmax_weight)
    p.add_argument("--center-weight", type=float, default=loss.center_weight)
    p.add_argument("--center-alpha", type=float, default=loss.center_alpha)
    p.add_argument("--freeze-stages", type=int, default=t.freeze_stages, help="leading SFace stages frozen (0..15)")
    p.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    p.add_argument("--all-faces", action="store_true", help="train on every face of an image, not face 0 only")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--use-gpu", choices=USE_GPU_CHOICES, default=t.use_gpu)
    p.add_argument("--cpus-per-worker", type=float, default=t.cpus_per_worker)
    p.add_argument("--resume", action="store_true", help="fail unless --output has a checkpoint to resume")
    p.add_argument("--max-failures", type=int, default=t.max_failures, help="worker failures to recover from")
    p.add_argument("--keep-checkpoints", type=int, default=t.keep_checkpoints)
    p.add_argument("--augment", default="", help="capture-condition augmentation probabilities, e.g. "
                   "lowres=0.5,jpeg=0.3,gray=0.2,mask=0.3,blur=0.2 (ranges: workers/training/augment.py)")
    p.add_argument("--distill-weight", type=float, default=t.distill_weight,
                   help="weight of 1 - cos(f(augmented), f0(clean)) against the frozen starting model (0: off)")
    p.add_argument("--freeze-bn", action="store_true", help="keep the starting model's BatchNorm statistics")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute the backbone's activations in the backward pass: far less memory per step, "
                        "~1/3 more compute (exact: BatchNorm statistics still move once per step)")
    p.add_argument("--malloc-mmap-threshold-mb", type=int, default=t.malloc_mmap_threshold_mb,
                   help="glibc: blocks of at least this many MiB get their own mapping, returned to the OS when "
                        "freed (0: glibc's default); 8 cut a CPU worker's peak RSS by ~650 MiB at 1M faces for "
                        "~20%% fewer samples/s")
    p.add_argument("--precision", choices=PRECISIONS, default=t.precision,
                   help="autocast of the forward pass: auto = bfloat16/float16 on CUDA, float32 on CPU; bfloat16 "
                        "is ~2x faster on CPUs with AVX512-BF16/AMX")
    p.add_argument("--heldout-degrade", default="", help="comma-separated domains measured on the held-out pairs "
                   "besides clean every epoch, e.g. lowres:16,jpeg:10+gray,mask")
    p.add_argument("--run-id", default="")
    add_ray_options(p)
    args = p.parse_args(argv)
    from workers.training.augment import parse_augment

    opts = storage_options(args.s3_endpoint_url)
    try:
        cfg = TrainConfig(
            data=DataConfig(faces=args.faces, exclude_pairs=args.exclude_pairs, exclude_audit=args.exclude_audit,
                            heldout_fraction=args.heldout_fraction, seed=args.seed, all_faces=args.all_faces,
                            storage_options=opts),
            output=args.output,
            loss=LossConfig(margin=args.margin, mining=args.mining, triplet_weight=args.triplet_weight,
                            softmax_weight=args.softmax_weight, center_weight=args.center_weight,
                            center_alpha=args.center_alpha),
            workers=args.workers, epochs=args.epochs, people_per_batch=args.people_per_batch,
            images_per_person=args.images_per_person, steps_per_epoch=args.steps_per_epoch, lr=args.lr,
            head_lr_multiplier=args.head_lr_multiplier, weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs, grad_clip=args.grad_clip, freeze_stages=args.freeze_stages,
            init=args.init, use_gpu=args.use_gpu, cpus_per_worker=args.cpus_per_worker, resume=args.resume,
            max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints, run_id=args.run_id,
            augment=parse_augment(args.augment), distill_weight=args.distill_weight, freeze_bn=args.freeze_bn,
            precision=args.precision, checkpoint_activations=args.checkpoint_activations,
            malloc_mmap_threshold_mb=args.malloc_mmap_threshold_mb,
            heldout_degrade=tuple(d.strip() for d in args.heldout_degrade.split(",") if d.strip()),
            storage_options=opts)
    except ValueError as exc:
        fail(str(exc))
    return cfg, args


def main(argv=None) -> dict:
    from ray.train import TrainingFailedError

    from workers.faces.weights import WeightsNotFound
    from workers.storage import StorageError
    from workers.training.run import run_training

    cfg, args = parse_args(argv)
    if cfg.data.exclude_audit:
        from workers.audit.store import read_summary

        try:   # one line before Ray starts: the folder must hold a complete audit
            read_summary(cfg.data.exclude_audit, dict(cfg.data.storage_options))
        except StorageError as exc:
            fail(str(exc))
    connect_ray(args.local_cpus)
    try:
        summary = run_training(cfg)
    except (StorageError, ValueError, WeightsNotFound, FileNotFoundError) as exc:
        fail(str(exc))
    except TrainingFailedError as exc:
        fail(f"training failed: {exc}")
    print(f"output: {summary['output']} (metrics.jsonl, heldout.json, curves.png, split.json, train.json)")
    print(f"embedder: {summary['embedder']}  (--embedder {summary['embedder']})")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
