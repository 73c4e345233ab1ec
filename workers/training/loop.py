"""Fine-tuning SFace on Ray Train: the per-worker loop, its checkpoints, and the driver-side glue.

Every worker holds only its own identity shard, as stored JPEG bytes, and per step takes its own P x K
batch of it, decoded ahead of the step in background threads (:mod:`workers.training.stream`; identities
disjoint across workers), flips half of it horizontally, runs backbone + :class:`CombinedLoss` (classifier
head and centers live in one module, wrapped by DDP: NCCL on GPU, gloo on CPU), mines triplets on the device,
clips gradients, steps AdamW under a warm-up + cosine schedule, then moves the loss centers with
sums all-reduced across workers. Mixed precision (``torch.autocast``) is used on GPU only.

After each epoch rank 0 measures the loss on a fixed probe batch and the verification accuracy on
pairs of held-out identities, appends a row to ``metrics.jsonl`` and reports a checkpoint
(``epoch_NNNN/train_state.pt``) to ``<output>/ray/train``. A rerun with the same ``--output`` resumes
from the newest checkpoint (Ray Train restores it), with any number of workers. The driver then
exports the weights as an embedder. Output layout::

    <output>/train.json              resolved config and run id
    <output>/split.json              train / held-out / excluded identity names
    <output>/metrics.jsonl           one JSON row per epoch (epoch 0 = before training)
    <output>/heldout.json            held-out verification before and after fine-tuning
    <output>/curves.png              loss parts, probe loss, held-out accuracy, lr
    <output>/embedder/               embedder.json + weights.pt (``load_embedder`` / ``--embedder``)
    <output>/embedder.json           the same spec pointing at embedder/weights.pt, so that
                                     ``load_embedder("<output>")`` works too (local outputs)
    <output>/ray/train/epoch_NNNN/   Ray Train checkpoints

A metrics row (epoch N >= 1): ``loss`` ``softmax`` ``accuracy`` ``center`` ``triplet`` (unweighted, mean
per step over all workers), ``num_triplets`` (mined per worker-step), ``fraction_active``, ``lr`` (backbone
lr at the epoch's last step), ``samples``, ``train_time_s``, ``samples_per_s`` (all workers, training
steps only), ``epoch_time_s`` (with evaluation), ``probe_*`` (loss parts on the fixed probe batch, eval
mode) and ``heldout_*`` (``accuracy``, ``accuracy_std`` over folds, ``val``, ``val_std``, ``far`` at
``far_target``). Row 0 holds the ``probe_*`` / ``heldout_*`` values of the starting weights.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from workers import storage
from workers.evaluation.verification import (
    FOLD, SAME, cosine_scores, heldout_pairs, kfold_accuracy, lookup_pairs, val_at_far)
from workers.faces.embedders import (
    SPEC_FILE, WEIGHTS_FILE, Embedder, SFace, freeze_layers, load_embedder, save_embedder)
from workers.faces.weights import ModelSpec
from workers.training.augment import AugmentConfig, augment_batch
from workers.training.data import DataConfig, FaceSet, IdentitySplit, load_faces, plan_split
from workers.training.losses import CombinedLoss, LossConfig
from workers.training.stream import (
    open_worker_shard, plan_shards, prefetch_batches, probe_batch, probe_identities)

#: Decoding threads of a worker: its reserved CPUs, clamped to this range; batches decoded ahead of the step.
DECODE_THREADS = (2, 4)
PREFETCH_BATCHES = 3

CHECKPOINT_FILE = "train_state.pt"
CHECKPOINT_FORMAT = "facemill.train-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = ("epoch", "backbone", "loss", "optimizer", "scheduler", "scaler", "sampler", "identities",
                    "run_id", "init", "heldout_before", "heldout_last", "probe_before")

RAY_DIR = "ray"
RAY_RUN_NAME = "train"
RUN_FILE = "train.json"
SPLIT_FILE = "split.json"
METRICS_FILE = "metrics.jsonl"
HELDOUT_FILE = "heldout.json"
CURVES_FILE = "curves.png"
EMBEDDER_DIR = "embedder"
USE_GPU_CHOICES = ("auto", "true", "false")


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
        eval_batch_size: crops per forward pass when embedding the held-out faces.
        augment: capture-condition augmentation (low resolution, JPEG, grayscale, blur, masks) drawn per
            image before the flip, deterministic from (seed, epoch, step, rank); all off by default.
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


# --------------------------------------------------------------------------------------------------------
# Pure torch: model, schedule, augmentation, checkpoint state


class FaceTrainNet(nn.Module):
    """Backbone and loss head (classifier + centers) as one module, so that DDP syncs both.

    Args:
        backbone: maps float32[B, 3, 112, 112] RGB 0..255 to raw features float32[B, D].
        loss: the combined loss over the training identities.
    """

    def __init__(self, backbone: nn.Module, loss: CombinedLoss) -> None:
        super().__init__()
        self.backbone = backbone
        self.loss = loss

    def forward(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
        """Loss of one batch.

        Args:
            images: float32[B, 3, 112, 112] RGB 0..255.
            labels: int64[B] in [0, C).
            generator: random source of the ``facenet`` triplet pick.

        Returns:
            (total loss with grad, its parts as floats, raw features float[B, D]).
        """
        features = self.backbone(images)
        total, parts = self.loss(features, labels, generator)
        return total, parts, features


def warmup_cosine(progress: float, total: float, warmup: float, min_ratio: float) -> float:
    """Learning-rate multiplier after ``progress`` epochs of ``total``.

    Linear from 0 to 1 over ``warmup`` epochs, then a half cosine from 1 down to ``min_ratio`` at
    ``total``. Pass the progress reached at the end of the step (so the first step is not zero).
    """
    if warmup > 0 and progress < warmup:
        return progress / warmup
    span = max(total - warmup, 1e-12)
    t = min(max((progress - warmup) / span, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class WarmupCosine:
    """Sets every param group's ``lr`` to ``initial_lr * warmup_cosine(progress)``.

    The schedule is a function of epochs done (fractional), not of steps, so it stays the same when a
    run resumes with another number of workers (and so another number of steps per epoch).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_epochs: float, warmup_epochs: float,
                 min_ratio: float) -> None:
        self.optimizer = optimizer
        self.total_epochs = float(total_epochs)
        self.warmup_epochs = float(warmup_epochs)
        self.min_ratio = float(min_ratio)
        self.progress = 0.0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])

    def set_progress(self, progress: float) -> float:
        """Move to ``progress`` epochs; returns the multiplier applied."""
        self.progress = float(progress)
        factor = warmup_cosine(self.progress, self.total_epochs, self.warmup_epochs, self.min_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return factor

    def state_dict(self) -> dict[str, float]:
        return {"progress": self.progress, "total_epochs": self.total_epochs,
                "warmup_epochs": self.warmup_epochs, "min_ratio": self.min_ratio}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore the progress; the shape of the schedule stays that of this run's config."""
        self.set_progress(float(state["progress"]))


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image of float[B, C, H, W] left-right with probability ``p`` (one draw per image)."""
    flip = (torch.rand(images.shape[0], generator=generator) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def to_images(crops: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8[B, H, W, 3] RGB crops -> float32[B, 3, H, W] 0..255 on ``device``."""
    tensor = torch.from_numpy(np.ascontiguousarray(crops))
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True).permute(0, 3, 1, 2).float()


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """CPU generator seeded from ``(seed, *keys)`` (e.g. epoch, step, rank)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def param_groups(net: FaceTrainNet, lr: float, head_lr_multiplier: float, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: backbone weights (decayed), backbone BN / PReLU /
    biases (not decayed), classifier head (``lr * head_lr_multiplier``, decayed weight). Empty groups
    are left out."""
    decay, no_decay = [], []
    for param in net.backbone.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    head = [p for p in net.loss.parameters() if p.requires_grad]
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0},
              {"params": head, "lr": lr * head_lr_multiplier, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]


def save_checkpoint_state(state: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write a training state (the keys of ``_CHECKPOINT_KEYS``) as ``<directory>/train_state.pt``.

    Only tensors, numbers, strings, lists, dicts and None may appear, so that
    ``torch.load(weights_only=True)`` reads it back.
    """
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"training state lacks {missing}")
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check a training state written by :func:`save_checkpoint_state` (CPU tensors).

    Raises:
        ValueError: the folder has no ``train_state.pt``, or it is truncated, not a torch file, unsafe
            to unpickle, or not a facemill training checkpoint of this version (the message says which).
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        found = sorted(p.name for p in Path(directory).iterdir())[:5] if Path(directory).is_dir() else None
        raise ValueError(f"{str(directory)!r} is not a facemill training checkpoint: no {CHECKPOINT_FILE} "
                         f"(found {found})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, unsafe pickle
        raise ValueError(f"cannot read checkpoint {str(path)!r} ({path.stat().st_size} bytes): truncated or not "
                         f"a torch file: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        what = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{str(path)!r} is not a facemill training checkpoint (format {what!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} is a training checkpoint of version {state.get('version')!r}, "
                         f"this code reads version {CHECKPOINT_VERSION}")
    missing = [k for k in _CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {missing}: incomplete training checkpoint")
    return state


# --------------------------------------------------------------------------------------------------------
# Held-out verification (numpy)


def heldout_protocol(faces: FaceSet, max_folds: int, max_pairs_per_fold: int, seed: int) -> pd.DataFrame | None:
    """An LFW-like pairs table over the held-out faces, as large as they allow.

    Uses ``min(max_folds, identities with >= 2 faces, identities // 2)`` folds (every fold needs a same
    pair and a second identity for different pairs) and halves the pairs per fold (kept even) until
    :func:`heldout_pairs` can build them.

    Returns:
        Pairs table keyed by ``faces.keys``, or None when fewer than 2 folds are possible.
    """
    names = np.asarray(faces.identities, dtype=object)[faces.labels]
    mapping: dict[str, list[str]] = {}
    for name, key in zip(names.tolist(), faces.keys.tolist()):
        mapping.setdefault(name, []).append(key)
    multi = sum(len(keys) >= 2 for keys in mapping.values())
    folds = min(max_folds, multi, len(mapping) // 2)
    if folds < 2:
        return None
    per_fold = max_pairs_per_fold - max_pairs_per_fold % 2
    while per_fold >= 2:
        try:
            return heldout_pairs(mapping, mapping.keys(), n_folds=folds, pairs_per_fold=per_fold, seed=seed)
        except ValueError:
            per_fold = (per_fold // 2) - (per_fold // 2) % 2
    return None


def verification_metrics(embeddings: np.ndarray, keys: np.ndarray, pairs: pd.DataFrame,
                         far_target: float) -> dict[str, float]:
    """k-fold accuracy and VAL@FAR of cosine scores over a pairs table.

    Args:
        embeddings: float[N, D], row i for ``keys[i]``.
        keys: str[N] unique keys of the pairs table's images.
        pairs: pairs table.
        far_target: FAR of the VAL.

    Returns:
        ``accuracy``, ``accuracy_std`` (over folds, ddof 0), ``val``, ``val_std``, ``far``,
        ``far_target``, ``num_pairs``, ``num_folds``.
    """
    index1, index2, valid = lookup_pairs(pairs, keys)
    scores = cosine_scores(embeddings[np.maximum(index1, 0)], embeddings[np.maximum(index2, 0)])
    valid &= np.isfinite(scores)
    same, folds = pairs[SAME].to_numpy(bool), pairs[FOLD].to_numpy(np.int64)
    accuracy = kfold_accuracy(scores, same, folds, valid)
    val = val_at_far(scores, same, far_target, folds, valid)
    return {"accuracy": accuracy["mean"], "accuracy_std": accuracy["std"], "val": val["val"],
            "val_std": val["val_std"], "far": val["far"], "far_target": float(far_target),
            "num_pairs": int(len(pairs)), "num_folds": int(len(accuracy["folds"]))}


# --------------------------------------------------------------------------------------------------------
# The Ray Train worker


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` holds ``cfg`` (TrainConfig), ``split`` (IdentitySplit dict),
    ``run_id`` and ``use_gpu`` (resolved bool).

    Data: the worker reads only its identity shard (crops kept as JPEG bytes) and decodes each step's batch
    ahead of the step (:mod:`workers.training.stream`). Resumed on another number of workers, the shards and
    steps per epoch, so the batches, change with W; the epoch counter and the learning-rate schedule (fractional
    epochs), the weights, head, centers and optimizer continue from the checkpoint.
    """
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg: TrainConfig = config["cfg"]
    split = IdentitySplit(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["split"].items()})
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    else:
        torch.backends.cudnn.benchmark = True
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    all_reduce = dist.all_reduce if distributed else None
    is_chief = rank == 0

    shard = open_worker_shard(cfg.data, split, world, rank, cfg.people_per_batch, cfg.images_per_person,
                              cfg.steps_per_epoch)
    steps = shard.steps_per_epoch
    threads = min(max(int(cfg.cpus_per_worker), DECODE_THREADS[0]), DECODE_THREADS[1])

    def augment(crops: np.ndarray, epoch: int, step: int) -> np.ndarray:   # runs in the decoding threads
        return augment_batch(crops, cfg.augment, cfg.data.seed, epoch, step, rank)

    transform = augment if cfg.augment.enabled else None

    init = load_embedder(cfg.init)
    backbone = init.module
    if not isinstance(backbone, SFace):
        raise ValueError(f"--init {cfg.init!r} is a {type(backbone).__name__}, fine-tuning needs an SFace")
    torch.manual_seed(cfg.data.seed)  # the same classifier init on every worker (DDP broadcasts rank 0's anyway)
    net = FaceTrainNet(backbone, CombinedLoss(len(split.train), backbone.embedding_dim, cfg.loss))
    freeze_layers(backbone, cfg.freeze_stages)
    net.to(device)
    optimizer = torch.optim.AdamW(param_groups(net, cfg.lr, cfg.head_lr_multiplier, cfg.weight_decay))
    scheduler = WarmupCosine(optimizer, cfg.epochs, cfg.warmup_epochs, cfg.min_lr_ratio)
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
        if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start_epoch, run_id = 0, config["run_id"]
    heldout_before = heldout_last = probe_before = probe = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint_state(directory)
        _restore(state, net, optimizer, scheduler, scaler, split, cfg)
        start_epoch, run_id = int(state["epoch"]), state["run_id"] or run_id
        heldout_before, heldout_last = state["heldout_before"], state["heldout_last"]
        probe_before, probe = state["probe_before"], state["sampler"].get("probe")
    if probe is None:   # a fresh run: the probe is what the chief trains on first, kept for every resume
        probe = {"identities": probe_identities(shard).tolist() if is_chief else [],
                 "images_per_person": cfg.images_per_person}

    model = net
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(net, device_ids=ids)

    evaluator = _ChiefEvaluator(cfg, split, probe, init.spec, device) if is_chief else None
    history = _read_history(cfg, start_epoch) if is_chief else []
    if is_chief and checkpoint is None:
        probe_before = evaluator.probe(net)
        heldout_before = heldout_last = evaluator.heldout(net)
        row = {"epoch": 0, "world_size": world, **_prefixed("probe_", probe_before),
               **_prefixed("heldout_", heldout_before or {})}
        history = [row]
        _write_history(cfg, history)
        print(json.dumps(row), flush=True)

    batch = cfg.people_per_batch * cfg.images_per_person
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        for ready in prefetch_batches(shard.faces, shard.sampler, epoch, steps, threads=threads,
                                      depth=max(PREFETCH_BATCHES, threads), transform=transform):
            step = ready.step
            generator = step_generator(cfg.data.seed, epoch, step, rank)
            images = random_hflip(to_images(ready.crops, device), generator)
            labels = torch.from_numpy(ready.labels).to(device, non_blocking=True)
            lr_factor = scheduler.set_progress(epoch + (step + 1) / steps)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                total, parts, features = model(images, labels, generator)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            net.loss.update_centers(features.detach().float(), labels, all_reduce)
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        means = _mean_over_workers(sums, steps, world, device, all_reduce)
        row = {"epoch": epoch + 1, "world_size": world, "steps": steps,
               "lr": cfg.lr * lr_factor, **means,
               "samples": steps * batch * world, "train_time_s": round(train_time, 3),
               "samples_per_s": round(steps * batch * world / max(train_time, 1e-9), 2)}
        report_checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if is_chief:
                row.update(_prefixed("probe_", evaluator.probe(net)))
                heldout_last = evaluator.heldout(net)
                row.update(_prefixed("heldout_", heldout_last or {}))
                row["epoch_time_s"] = round(time.perf_counter() - t0, 3)
                history.append(row)
                _write_history(cfg, history)
                print(json.dumps(row), flush=True)
                save_checkpoint_state({
                    "epoch": epoch + 1, "backbone": net.backbone.state_dict(), "loss": net.loss.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "sampler": {"seed": cfg.data.seed, "people_per_batch": cfg.people_per_batch,
                                "images_per_person": cfg.images_per_person, "world_size": world,
                                "probe": probe},
                    "identities": list(split.train), "run_id": run_id,
                    "init": {"name": init.spec.name, "version": init.spec.version, "kind": init.spec.kind},
                    "heldout_before": heldout_before, "heldout_last": heldout_last,
                    "probe_before": probe_before}, tmp)
                report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(row, checkpoint=report_checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")


def _restore(state: dict, net: FaceTrainNet, optimizer, scheduler: WarmupCosine, scaler, split: IdentitySplit,
             cfg: TrainConfig) -> None:
    if list(state["identities"]) != list(split.train):
        raise ValueError(f"checkpoint of run {state['run_id']!r} trained on {len(state['identities'])} identities, "
                         f"{cfg.data.faces!r} with this split gives {len(split.train)} different ones; "
                         f"resume with the same faces table, --exclude-pairs, --heldout-fraction and --seed, "
                         f"or use a new --output")
    net.backbone.load_state_dict(state["backbone"])
    net.loss.load_state_dict(state["loss"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise ValueError(f"checkpoint optimizer does not fit this run (was --freeze-stages or a loss weight "
                         f"changed?): {exc}") from exc
    for group, base in zip(optimizer.param_groups, param_groups(net, cfg.lr, cfg.head_lr_multiplier,
                                                                cfg.weight_decay)):
        group["initial_lr"] = base["lr"]   # this run's --lr wins over the checkpoint's
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])


def _mean_over_workers(sums: dict[str, float], steps: int, world: int, device: torch.device,
                       all_reduce) -> dict[str, float]:
    """Per-step means of the loss parts over all steps of all workers (``num_triplets`` per worker-step)."""
    keys = sorted(sums)
    if not keys:
        return {}
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if all_reduce is not None:
        all_reduce(values)
    means = (values / (steps * world)).tolist()
    out = {("loss" if k == "total" else k): round(v, 6) for k, v in zip(keys, means)}
    return out


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in values.items()}


class _ChiefEvaluator:
    """Rank 0's measurements: loss on a fixed probe batch and held-out verification."""

    def __init__(self, cfg: TrainConfig, split: IdentitySplit, probe: dict, spec: ModelSpec,
                 device: torch.device) -> None:
        self.cfg, self.spec, self.device = cfg, spec, device
        crops, labels = probe_batch(cfg.data, split, probe["identities"], probe["images_per_person"])
        self.probe_images = to_images(crops, device)
        self.probe_labels = torch.from_numpy(labels).to(device)
        self.heldout_faces = load_faces(cfg.data, split.heldout) if split.heldout else None
        self.pairs = (heldout_protocol(self.heldout_faces, cfg.heldout_folds, cfg.heldout_pairs_per_fold,
                                       cfg.data.seed) if self.heldout_faces is not None else None)

    @torch.no_grad()
    def probe(self, net: FaceTrainNet) -> dict[str, float]:
        """Loss parts on the fixed probe batch, eval mode (no dropout, frozen BN statistics)."""
        was_training = net.training
        net.eval()
        try:
            _, parts, _ = net(self.probe_images, self.probe_labels, step_generator(self.cfg.data.seed, 2**31))
        finally:
            net.train(was_training)
        return {("loss" if k == "total" else k): round(float(v), 6) for k, v in parts.items()}

    def heldout(self, net: FaceTrainNet) -> dict[str, float] | None:
        if self.pairs is None:
            return None
        embedder = Embedder(spec=self.spec, module=net.backbone)
        embeddings = embedder.embed(self.heldout_faces.crops, batch_size=self.cfg.eval_batch_size)
        return verification_metrics(embeddings, self.heldout_faces.keys, self.pairs, self.cfg.far_target)


def _read_history(cfg: TrainConfig, start_epoch: int) -> list[dict]:
    """Rows of an earlier metrics.jsonl up to ``start_epoch`` (rows past the checkpoint are dropped)."""
    fs, path = storage.url_to_fs(storage.join(cfg.output, METRICS_FILE), dict(cfg.storage_options))
    if not fs.exists(path):
        return []
    rows = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    return [row for row in rows if row.get("epoch", 0) <= start_epoch]


def _write_history(cfg: TrainConfig, rows: list[dict]) -> None:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    storage.put_atomic(storage.join(cfg.output, METRICS_FILE), data, dict(cfg.storage_options))


# --------------------------------------------------------------------------------------------------------
# Driver side


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def checkpoints_in(output: str, storage_options: dict | None = None) -> list[str]:
    """Names of the epoch checkpoint folders of a run folder, oldest first."""
    fs, path = storage.url_to_fs(storage.join(output, RAY_DIR, RAY_RUN_NAME), storage_options)
    try:
        names = fs.ls(path, detail=False) if fs.exists(path) else []
    except FileNotFoundError:
        names = []
    found = [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
    return sorted(n for n in found if n.startswith("epoch_"))


def read_checkpoint_state(uri: str, storage_options: dict | None = None) -> dict[str, Any]:
    """:func:`load_checkpoint_state` of a checkpoint folder given as a local path or an fsspec URI."""
    if "://" not in uri or uri.startswith("file://"):
        return load_checkpoint_state(uri.removeprefix("file://"))
    fs, path = storage.url_to_fs(storage.join(uri, CHECKPOINT_FILE), storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fs.get_file(path, os.path.join(tmp, CHECKPOINT_FILE))
        except FileNotFoundError:
            pass   # load_checkpoint_state names what is missing
        return load_checkpoint_state(tmp)


def _config_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _resolve_use_gpu(cfg: TrainConfig) -> bool:
    import ray

    if cfg.use_gpu != "auto":
        return cfg.use_gpu == "true"
    return ray.cluster_resources().get("GPU", 0) >= cfg.workers


def _run_config(cfg: TrainConfig):
    import ray.train

    opts = dict(cfg.storage_options)
    root = storage.join(cfg.output, RAY_DIR)
    filesystem = None
    if "://" in root and not root.startswith("file://"):
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs, root = storage.url_to_fs(root, opts)
        filesystem = PyFileSystem(FSSpecHandler(fs))
    else:
        root = os.path.abspath(root.removeprefix("file://"))
    return ray.train.RunConfig(
        name=RAY_RUN_NAME, storage_path=root, storage_filesystem=filesystem,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints))


def run_training(cfg: TrainConfig, log=print) -> dict:
    """Fine-tune on the connected Ray cluster, export the embedder, write the run's reports.

    Returns:
        Summary dict (also in ``train.json``): run id, epochs, where everything went, held-out results.

    Raises:
        ValueError: bad data (too few identities), ``resume`` without a checkpoint, a refused checkpoint.
        storage.StorageError: the output is not writable.
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    from ray.train.torch import TorchConfig, TorchTrainer
    import ray.train

    t0 = time.time()
    opts = dict(cfg.storage_options)
    init = load_embedder(cfg.init)  # fail fast on a bad --init
    storage.check_writable(cfg.output, opts)
    split = plan_split(cfg.data)
    needed = cfg.workers * cfg.people_per_batch
    if len(split.train) < needed:
        raise ValueError(f"{len(split.train)} training identities (with >= {cfg.data.min_faces} faces, after "
                         f"holding out {cfg.data.heldout_fraction:.0%} and excluding {len(split.excluded)}), "
                         f"need workers * people_per_batch = {needed}; lower --people-per-batch or --workers")
    plan_shards(split, cfg.workers, cfg.people_per_batch, cfg.data.seed)   # every identity shard fills a step
    existing = checkpoints_in(cfg.output, opts)
    if cfg.resume and not existing:
        raise ValueError(f"--resume: no checkpoint under {storage.join(cfg.output, RAY_DIR, RAY_RUN_NAME)!r}")
    previous = _read_json(storage.join(cfg.output, RUN_FILE), opts)
    run_id = cfg.run_id or (previous or {}).get("run_id") or new_run_id()
    if existing:
        state = read_checkpoint_state(storage.join(cfg.output, RAY_DIR, RAY_RUN_NAME, existing[-1]), opts)
        if list(state["identities"]) != list(split.train):
            raise ValueError(f"checkpoint {existing[-1]} of {cfg.output!r} trained on {len(state['identities'])} "
                             f"identities, the faces table with this split gives {len(split.train)} different "
                             f"ones; resume with the same --faces, --exclude-pairs, --heldout-fraction and "
                             f"--seed, or use a new --output")
        run_id = cfg.run_id or state["run_id"] or run_id
        log(f"facemill train {run_id}: resuming from {existing[-1]} (epoch {state['epoch']}) in {cfg.output}")
        del state
    use_gpu = _resolve_use_gpu(cfg)
    record = {"run_id": run_id, "started_at": time.time(), "use_gpu": use_gpu, "config": _config_dict(cfg),
              "identities": {"train": len(split.train), "heldout": len(split.heldout),
                             "excluded": len(split.excluded), "faces_train": split.num_faces_train,
                             "faces_heldout": split.num_faces_heldout}}
    _write_json(storage.join(cfg.output, RUN_FILE), record, opts)
    _write_json(storage.join(cfg.output, SPLIT_FILE), split.to_dict(), opts)
    log(f"facemill train {run_id}: {len(split.train)} identities ({split.num_faces_train} faces) to train, "
        f"{len(split.heldout)} held out, {len(split.excluded)} excluded; {cfg.workers} workers "
        f"{'GPU' if use_gpu else 'CPU'}, P={cfg.people_per_batch} K={cfg.images_per_person}, {cfg.epochs} epochs")

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "split": split.to_dict(), "run_id": run_id, "use_gpu": use_gpu},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=_run_config(cfg))
    result = trainer.fit()
    if result.checkpoint is None:
        raise ValueError(f"training of {cfg.output!r} reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = load_checkpoint_state(directory)
    summary = finish_run(cfg, state, init.spec, log)
    summary["wall_time_s"] = round(time.time() - t0, 3)
    summary["checkpoint"] = storage.join(cfg.output, RAY_DIR, RAY_RUN_NAME,
                                         result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    _write_json(storage.join(cfg.output, RUN_FILE), {**record, "finished_at": time.time(), "summary": summary},
                opts)
    return summary


def finish_run(cfg: TrainConfig, state: dict, init_spec: ModelSpec, log=print) -> dict:
    """Export the embedder of a final training state and write heldout.json and curves.png."""
    opts = dict(cfg.storage_options)
    run_name = cfg.output.rstrip("/").rsplit("/", 1)[-1] or "run"
    spec = dataclasses.replace(
        init_spec, name=f"{init_spec.name}-ft-{run_name}", weights=WEIGHTS_FILE,
        version=f"{init_spec.version}+ft-{state['run_id']}-e{state['epoch']}")
    module = SFace(embedding_dim=spec.embedding_dim, mean=spec.mean, std=spec.std)
    module.load_state_dict(state["backbone"])
    embedder_uri = storage.join(cfg.output, EMBEDDER_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        save_embedder(module.eval(), spec, tmp)
        for name in (WEIGHTS_FILE, SPEC_FILE):
            storage.put_atomic(storage.join(embedder_uri, name), (Path(tmp) / name).read_bytes(), opts)
        root_spec = json.loads((Path(tmp) / SPEC_FILE).read_text())
    root_spec["weights"] = f"{EMBEDDER_DIR}/{WEIGHTS_FILE}"
    _write_json(storage.join(cfg.output, SPEC_FILE), root_spec, opts)

    heldout = {"before": state["heldout_before"], "after": state["heldout_last"], "epochs": int(state["epoch"]),
               "run_id": state["run_id"], "embedder": f"{spec.name} {spec.version}"}
    if heldout["after"] is None:
        heldout["note"] = "too few held-out identities with >= 2 faces for 2 folds; raise --heldout-fraction"
    _write_json(storage.join(cfg.output, HELDOUT_FILE), heldout, opts)
    history = _read_history(cfg, int(state["epoch"]))
    curves = storage.join(cfg.output, CURVES_FILE)
    storage.put_atomic(curves, plot_curves(history), opts)
    before, after = state["heldout_before"] or {}, state["heldout_last"] or {}
    last = history[-1] if history else {}
    summary = {
        "run_id": state["run_id"], "epochs": int(state["epoch"]), "output": cfg.output,
        "embedder": embedder_uri, "embedder_name": spec.name, "embedder_version": spec.version,
        "heldout_accuracy_before": before.get("accuracy"), "heldout_accuracy_after": after.get("accuracy"),
        "samples_per_s": last.get("samples_per_s"), "epoch_time_s": last.get("epoch_time_s"),
        "metrics": storage.join(cfg.output, METRICS_FILE), "curves": curves,
        "heldout": storage.join(cfg.output, HELDOUT_FILE)}
    log(f"facemill train {state['run_id']}: {state['epoch']} epochs; held-out accuracy "
        f"{_fmt(before, 'accuracy')} -> {_fmt(after, 'accuracy')}; embedder {embedder_uri}")
    return summary


def _fmt(values: dict, key: str) -> str:
    if key not in values:
        return "n/a"
    return f"{values[key]:.4f} ± {values.get(key + '_std', 0.0):.4f}"


def plot_curves(history: list[dict]) -> bytes:
    """PNG bytes of the per-epoch curves (matplotlib Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 7), dpi=100)
    FigureCanvasAgg(figure)
    panels = (("training loss (per step, mean)", ("loss", "softmax", "center", "triplet")),
              ("fixed probe batch", ("probe_loss", "probe_softmax", "probe_center", "probe_triplet")),
              ("held-out verification", ("heldout_accuracy", "heldout_val", "fraction_active")),
              ("learning rate / throughput", ("lr",)))
    for i, (title, keys) in enumerate(panels):
        axes = figure.add_subplot(2, 2, i + 1)
        log_scale = i < 2   # the center loss is ~100x the others
        for key in keys:
            points = [(row["epoch"], row[key]) for row in history
                      if isinstance(row.get(key), (int, float)) and (row[key] > 0 or not log_scale)]
            if points:
                x, y = zip(*points)
                axes.plot(x, y, marker="o", linewidth=1.2, label=key)
        if log_scale and axes.lines:
            axes.set_yscale("log")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if i == 3:
            points = [(row["epoch"], row["samples_per_s"]) for row in history if "samples_per_s" in row]
            if points:
                twin = axes.twinx()
                twin.plot(*zip(*points), color="tab:red", marker="s", linewidth=1, label="samples/s")
                twin.set_ylabel("samples/s")
                twin.legend(loc="upper right", fontsize=8)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("epoch")
        axes.grid(True, alpha=0.3)
        if axes.lines:
            axes.legend(loc="best" if i != 3 else "upper left", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _read_json(uri: str, storage_options: dict) -> dict | None:
    fs, path = storage.url_to_fs(uri, storage_options)
    if not fs.exists(path):
        return None
    try:
        return json.loads(fs.cat_file(path))
    except ValueError:
        return None


def _write_json(uri: str, value: dict, storage_options: dict) -> None:
    storage.put_atomic(uri, (json.dumps(value, indent=2, default=str) + "\n").encode(), storage_options)
