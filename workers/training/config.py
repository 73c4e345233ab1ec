"""The configuration of a fine-tuning run, and the names of what it writes into its output folder.

Output layout::

    <output>/train.json              resolved config and run id
    <output>/split.json              train / held-out / excluded identity names
    <output>/metrics.jsonl           one JSON row per epoch (epoch 0 = before training)
    <output>/heldout.json            held-out verification before and after fine-tuning, per domain
    <output>/curves.png              loss parts, probe loss, held-out accuracy, lr
    <output>/embedder/               embedder.json + weights.pt (``load_embedder`` / ``--embedder``)
    <output>/embedder.json           the same spec pointing at embedder/weights.pt, so that
                                     ``load_embedder("<output>")`` works too (local outputs)
    <output>/ray/train/epoch_NNNN/   Ray Train checkpoints (:mod:`workers.training.checkpoint`)
"""
from __future__ import annotations

import dataclasses

from workers.faces.degrade import parse_degrade
from workers.training.augment import AugmentConfig
from workers.training.data import DataConfig
from workers.training.losses import LossConfig

#: Training precisions (as :data:`workers.training.step.PRECISIONS`, kept here so configs need no torch).
PRECISIONS = ("auto", "float32", "bfloat16", "float16")

RUN_FILE = "train.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"
HELDOUT_FILE = "heldout.json"
CURVES_FILE = "curves.png"
EMBEDDER_DIR = "embedder"
USE_GPU_CHOICES = ("auto", "true", "false")
#: The name of the un-degraded held-out domain.
CLEAN = "clean"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run.

    Attributes:
        data: faces table, excluded pairs, held-out split.
        output: run folder (local or ``s3://``); the same folder resumes.
        loss: loss weights, margin, mining rule, center_alpha.
        workers: data-parallel Ray Train workers.
        epochs: total epochs (a resumed run trains up to this many).
        people_per_batch: P identities per worker per step.
        images_per_person: K images per identity.
        steps_per_epoch: cap on steps per epoch, 0 = a full pass over the smallest identity shard
            (``min over workers of shard_identities // P`` steps, about ``num_train_identities // (workers * P)``).
        lr: peak learning rate of the backbone (AdamW).
        head_lr_multiplier: the classifier head, fresh at start, learns this much faster.
        weight_decay: AdamW decoupled weight decay of conv / linear weights (not of BN, PReLU, biases).
        warmup_epochs: linear warm-up length, in epochs (fractions allowed).
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step.
        grad_clip: max global gradient L2 norm (0: no clipping).
        freeze_stages: leading SFace stages kept frozen (0..15, see ``freeze_layers``).
        init: embedder to start from: registry name or exported embedder directory.
        use_gpu: "auto" (GPUs when the cluster has one per worker), "true" or "false".
        cpus_per_worker: CPUs reserved per worker (also torch threads on CPU).
        resume: require a checkpoint to resume from (a rerun resumes anyway when one exists).
        max_failures: worker-group failures Ray Train recovers from (from the last checkpoint).
        keep_checkpoints: newest checkpoints kept (each holds weights + AdamW moments, ~90 MB for SFace).
        heldout_folds: at most this many verification folds over held-out identities.
        heldout_pairs_per_fold: at most this many pairs per fold (halved until the identities allow).
        far_target: FAR of the reported VAL.
        eval_batch_size: held-out crops decoded (and degraded) per chunk; each chunk is embedded in forward
            passes of the device's size (``default_embed_batch``: 8 on CPU, where small passes are ~3x faster
            per face and keep the chief's evaluation from raising its peak memory; 256 on CUDA).
        augment: capture-condition augmentation (low resolution, JPEG, grayscale, blur, masks) drawn per
            image before the flip, deterministic from (seed, epoch, step, rank); all off by default.
        distill_weight: weight of the distillation term ``mean(1 - cos(f(augmented), f0(clean)))``, ``f0``
            the frozen starting model on the un-augmented crop (0: off): keeps the clean embedding,
            learns the degraded one.
        freeze_bn: keep the BatchNorm statistics of the starting model (BN layers in eval mode; their
            affine weights still train), so small augmented batches cannot drift them.
        checkpoint_activations: keep only a few activations of the backbone's trained blocks and recompute
            the rest in the backward pass (about 1/3 more compute for less memory per step); exact: the
            recomputation leaves the BatchNorm running statistics alone, so they move once per step.
        malloc_mmap_threshold_mb: glibc's ``M_MMAP_THRESHOLD`` in each worker, in MiB (0: glibc's default,
            which grows to 32 MiB as blocks are freed, so a step's freed activations stay in the heap as
            holes): blocks at least this large get their own mapping and go back to the OS when freed.
            Fewer resident bytes for more page faults (scripts/bench_train.py at 1M faces, CPU, with
            ``checkpoint_activations``: 8 -> peak RSS per worker 4,235/4,110 MiB instead of 4,891/4,729,
            samples/s 16.8 instead of 21.0).
        precision: autocast precision of the training forward pass (``workers.training.step.PRECISIONS``).
        heldout_degrade: degradations (:func:`workers.faces.degrade.parse_degrade` specs, e.g.
            ``lowres:16``) whose held-out verification is measured beside the clean one every epoch.
        run_id: recorded in the exported embedder's version ("" = generated, or reused on resume).
        storage_options: fsspec options for ``output`` (e.g. ``endpoint_url``).
    """

    data: DataConfig
    output: str
    loss: LossConfig = LossConfig()
    workers: int = 2
    epochs: int = 10
    people_per_batch: int = 16
    images_per_person: int = 4
    steps_per_epoch: int = 0
    lr: float = 1e-4
    head_lr_multiplier: float = 10.0
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 5.0
    freeze_stages: int = 0
    init: str = "sface"
    use_gpu: str = "auto"
    cpus_per_worker: float = 1.0
    resume: bool = False
    max_failures: int = 0
    keep_checkpoints: int = 3
    heldout_folds: int = 10
    heldout_pairs_per_fold: int = 300
    far_target: float = 1e-3
    eval_batch_size: int = 128
    augment: AugmentConfig = AugmentConfig()
    distill_weight: float = 0.0
    freeze_bn: bool = False
    checkpoint_activations: bool = False
    malloc_mmap_threshold_mb: int = 0
    precision: str = "auto"
    heldout_degrade: tuple[str, ...] = ()
    run_id: str = ""
    storage_options: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("workers", "epochs", "people_per_batch", "keep_checkpoints", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.images_per_person < 2:
            raise ValueError(f"images_per_person must be >= 2, got {self.images_per_person}")
        if self.steps_per_epoch < 0:
            raise ValueError(f"steps_per_epoch must be >= 0 (0 = full pass), got {self.steps_per_epoch}")
        if self.lr <= 0 or self.head_lr_multiplier <= 0:
            raise ValueError(f"lr and head_lr_multiplier must be > 0, got {self.lr}, {self.head_lr_multiplier}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_epochs < 0:
            raise ValueError(f"weight_decay, grad_clip, warmup_epochs must be >= 0, got "
                             f"{self.weight_decay}, {self.grad_clip}, {self.warmup_epochs}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.freeze_stages <= 15:
            raise ValueError(f"freeze_stages must be in 0..15, got {self.freeze_stages}")
        if self.use_gpu not in USE_GPU_CHOICES:
            raise ValueError(f"use_gpu must be one of {USE_GPU_CHOICES}, got {self.use_gpu!r}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.max_failures < -1:
            raise ValueError(f"max_failures must be >= -1 (-1 = unlimited), got {self.max_failures}")
        if self.heldout_folds < 2 or self.heldout_pairs_per_fold < 2:
            raise ValueError(f"heldout_folds and heldout_pairs_per_fold must be >= 2, got "
                             f"{self.heldout_folds}, {self.heldout_pairs_per_fold}")
        if not 0.0 <= self.far_target <= 1.0:
            raise ValueError(f"far_target must be in [0, 1], got {self.far_target}")
        if not 0 <= self.malloc_mmap_threshold_mb <= 32:
            raise ValueError(f"malloc_mmap_threshold_mb must be in [0, 32] (0: glibc's default), "
                             f"got {self.malloc_mmap_threshold_mb}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        for spec in self.heldout_degrade:
            if spec in ("", CLEAN) or not parse_degrade(spec):
                raise ValueError(f"heldout_degrade holds {spec!r}: name a degradation (the clean pairs are "
                                 f"always measured)")
