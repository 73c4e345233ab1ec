"""The Ray Train worker of a fine-tuning run: wiring of the data shard, the step, the chief's measurements
and the checkpoints.

Every worker holds only its own identity shard, as stored JPEG bytes, and per step takes its own P x K batch
of it, decoded and augmented ahead of the step in background threads (:mod:`workers.training.stream`), then
runs :class:`workers.training.step.TrainStep` (the backbone in DDP over NCCL on GPU, gloo on CPU; the loss head
holds the worker's own identities only, :mod:`workers.training.head`). After each epoch rank 0
measures the loss on a fixed probe batch and the verification on held-out pairs per domain
(:mod:`workers.training.heldout`), appends a row to ``metrics.jsonl`` and reports a checkpoint
(``epoch_NNNN/train_state.pt``).

A metrics row (epoch N >= 1): ``loss`` ``softmax`` ``accuracy`` ``center`` ``triplet`` (``distill`` when on;
unweighted, mean per step over all workers), ``num_triplets`` (mined per worker-step), ``fraction_active``,
``lr`` (backbone lr at the epoch's last step), ``samples``, ``train_time_s``, ``samples_per_s`` (all workers,
training steps only), ``epoch_time_s`` (with evaluation), ``probe_*`` (loss parts on the fixed probe batch,
eval mode; its softmax is over the probe's P identities, so it does not depend on the number of workers) and
``heldout_*`` (``accuracy``, ``accuracy_std`` over folds, ``val``, ``val_std``, ``far`` at
``far_target``; ``heldout_<domain>_*`` for each ``heldout_degrade`` domain). Row 0 holds the ``probe_*`` /
``heldout_*`` values of the starting weights.
"""
from __future__ import annotations

import ctypes
import json
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from workers import storage
from workers.faces.embedders import Embedder, SFace, default_embed_batch, freeze_layers, load_embedder
from workers.training import heldout as H
from workers.training.augment import augment_batch
from workers.training.checkpoint import load_checkpoint_state, save_checkpoint_state
from workers.training.config import METRICS_FILE, TrainConfig
from workers.training.data import IdentitySplit
from workers.training.head import full_state, gather_rows, head_param_indices, local_state, restrict, to_local
from workers.training.losses import CombinedLoss
from workers.training.step import FaceTrainNet, TrainStep, frozen_teacher, step_generator, to_images
from workers.training.stream import open_worker_shard, prefetch_batches, probe_batch, probe_identities

#: Decoding threads of a worker: its reserved CPUs, clamped to this range; batches decoded ahead of the step.
DECODE_THREADS = (2, 4)
PREFETCH_BATCHES = 3
#: Segments of the trained blocks with --checkpoint-activations (activations kept at their boundaries).
ACTIVATION_SEGMENTS = 4


def release_freed_memory() -> None:
    """Hand memory already freed back to the OS: Arrow's pool (the scans' batches) and glibc's heap (``malloc_trim``:
    an evaluation's activations). Called after the set-up reads and after the chief's evaluations, so that memory
    freed there does not stay resident, as holes the training step's allocations need not fit in, for the run."""
    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


def tune_malloc(arenas: int = 0, mmap_threshold_mb: int = 0) -> bool:
    """glibc: with ``arenas``, the decoding threads allocate from that many malloc arenas instead of one heap each
    (``M_ARENA_MAX``); with ``mmap_threshold_mb``, blocks of that size and more get their own mapping
    (``M_MMAP_THRESHOLD``, fixed, so glibc stops raising it). 0 leaves a setting alone. Returns whether glibc
    took every setting (False elsewhere)."""
    M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = True
        if arenas:
            ok = libc.mallopt(M_ARENA_MAX, arenas) == 1
        if mmap_threshold_mb:
            ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold_mb << 20) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False


class ChiefEvaluator:
    """Rank 0's measurements: loss on a fixed probe batch and held-out verification per domain."""

    def __init__(self, cfg: TrainConfig, split: IdentitySplit, probe: dict, spec, device: torch.device) -> None:
        self.cfg, self.spec, self.device = cfg, spec, device
        crops, labels = probe_batch(cfg.data, split, probe["identities"], probe["images_per_person"])
        self.probe_images = to_images(crops, device)
        self.probe_labels = torch.from_numpy(to_local(np.unique(probe["identities"]), labels)).to(device)
        self.heldout_set = H.load_heldout(cfg.data, split, cfg.heldout_folds, cfg.heldout_pairs_per_fold)

    @torch.no_grad()
    def probe(self, net: FaceTrainNet, head: CombinedLoss) -> dict[str, float]:
        """Loss parts on the fixed probe batch, eval mode (no dropout, frozen BN statistics).

        Args:
            net: the backbone to measure (its own loss head is not used).
            head: the rows of the probe's identities, in ascending label order (:func:`gather_rows`).

        The backbone runs in passes of ``default_embed_batch`` (8 on CPU: one pass over 64 crops raised the chief's
        RSS by 607 MiB; the same features, eval mode being per image), the loss on the whole batch."""
        was_training = net.training
        net.eval()
        try:
            passes = self.probe_images.split(default_embed_batch(self.device))
            features = torch.cat([net.backbone(images) for images in passes])
            _, parts = head.to(self.device)(features, self.probe_labels, step_generator(self.cfg.data.seed, 2**31))
        finally:
            net.train(was_training)
        return {("loss" if k == "total" else k): round(float(v), 6) for k, v in parts.items()}

    def heldout(self, net: FaceTrainNet) -> dict[str, dict[str, float]] | None:
        """:func:`workers.training.heldout.heldout_metrics` of the current backbone, or None without pairs."""
        if self.heldout_set is None:
            return None
        was_training = net.training
        embedder = Embedder(spec=self.spec, module=net.backbone)
        try:
            return H.heldout_metrics(self.heldout_set, lambda crops: embedder.embed(crops),
                                     self.cfg.heldout_degrade, self.cfg.far_target, self.cfg.eval_batch_size)
        finally:
            net.train(was_training)


def read_history(cfg: TrainConfig, up_to_epoch: int) -> list[dict]:
    """Rows of an earlier metrics.jsonl up to ``up_to_epoch`` (rows past the checkpoint are dropped)."""
    fs, path = storage.url_to_fs(storage.join(cfg.output, METRICS_FILE), dict(cfg.storage_options))
    if not fs.exists(path):
        return []
    rows = [json.loads(line) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    return [row for row in rows if row.get("epoch", 0) <= up_to_epoch]


def write_history(cfg: TrainConfig, rows: list[dict]) -> None:
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    storage.put_atomic(storage.join(cfg.output, METRICS_FILE), data, dict(cfg.storage_options))


def mean_over_workers(sums: dict[str, float], steps: int, world: int, device: torch.device,
                      all_reduce) -> dict[str, float]:
    """Per-step means of the loss parts over all steps of all workers (``num_triplets`` per worker-step)."""
    keys = sorted(sums)
    if not keys:
        return {}
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    if all_reduce is not None:
        all_reduce(values)
    means = (values / (steps * world)).tolist()
    return {("loss" if k == "total" else k): round(v, 6) for k, v in zip(keys, means)}


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}{k}": v for k, v in values.items()}


def _check_identities(state: dict, split: IdentitySplit, cfg: TrainConfig) -> None:
    if list(state["identities"]) != list(split.train):
        raise ValueError(f"checkpoint of run {state['run_id']!r} trained on {len(state['identities'])} identities, "
                         f"{cfg.data.faces!r} with this split gives {len(split.train)} different ones; "
                         f"resume with the same faces table, --exclude-pairs, --heldout-fraction and --seed, "
                         f"or use a new --output")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; ``config`` holds ``cfg`` (TrainConfig), ``split`` (IdentitySplit dict),
    ``run_id`` and ``use_gpu`` (resolved bool).

    Resumed on another number of workers, the shards and steps per epoch, so the batches, change with W; the
    epoch counter and the learning-rate schedule (fractional epochs), the weights, head, centers and optimizer
    continue from the checkpoint (:mod:`workers.training.stream` says what changes).
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
        tune_malloc(arenas=1, mmap_threshold_mb=cfg.malloc_mmap_threshold_mb)
    else:
        torch.backends.cudnn.benchmark = True
        tune_malloc(mmap_threshold_mb=cfg.malloc_mmap_threshold_mb)
    distributed = world > 1 and dist.is_available() and dist.is_initialized()
    all_reduce = dist.all_reduce if distributed else None
    reduce = (lambda tensor: dist.reduce(tensor, dst=0)) if distributed else None
    is_chief = rank == 0

    shard = open_worker_shard(cfg.data, split, world, rank, cfg.people_per_batch, cfg.images_per_person,
                              cfg.steps_per_epoch)
    steps = shard.steps_per_epoch
    release_freed_memory()
    threads = min(max(int(cfg.cpus_per_worker), DECODE_THREADS[0]), DECODE_THREADS[1])

    def augment(crops: np.ndarray, epoch: int, step: int) -> np.ndarray:   # runs in the decoding threads
        return augment_batch(crops, cfg.augment, cfg.data.seed, epoch, step, rank)

    init = load_embedder(cfg.init)
    backbone = init.module
    if not isinstance(backbone, SFace):
        raise ValueError(f"--init {cfg.init!r} is a {type(backbone).__name__}, fine-tuning needs an SFace")
    teacher = frozen_teacher(backbone).to(device) if cfg.distill_weight > 0 else None
    backbone.checkpoint_segments = ACTIVATION_SEGMENTS if cfg.checkpoint_activations else 0
    # The head holds this worker's identities only (workers.training.head); its rows are those of one C-row head
    # initialised from the seed, so the start does not depend on the number of workers.
    num_classes, rows = len(split.train), shard.identities
    torch.manual_seed(cfg.data.seed)
    net = FaceTrainNet(backbone, restrict(CombinedLoss(num_classes, backbone.embedding_dim, cfg.loss), rows))
    freeze_layers(backbone, cfg.freeze_stages)
    net.to(device)
    model = net
    if distributed:
        # Only the backbone is data-parallel. gradient_as_bucket_view: its gradients live in DDP's all-reduce buckets
        # instead of beside them (one copy of every gradient less).
        ddp = nn.parallel.DistributedDataParallel(
            backbone, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
        model = FaceTrainNet(ddp, net.loss)
    step_fn = TrainStep(net, device, lr=cfg.lr, head_lr_multiplier=cfg.head_lr_multiplier,
                        weight_decay=cfg.weight_decay, total_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                        min_lr_ratio=cfg.min_lr_ratio, grad_clip=cfg.grad_clip, distill_weight=cfg.distill_weight,
                        teacher=teacher, freeze_bn=cfg.freeze_bn, model=model, precision=cfg.precision)
    head_params = head_param_indices(step_fn.optimizer, net.loss)

    start_epoch, run_id = 0, config["run_id"]
    heldout_before = heldout_last = probe_before = probe = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint_state(directory)
        _check_identities(state, split, cfg)
        step_fn.load_state_dict(local_state(state, rows, head_params))   # this worker's rows of the C-row tables
        start_epoch, run_id = int(state["epoch"]), state["run_id"] or run_id
        heldout_before, heldout_last = state["heldout_before"], state["heldout_last"]
        probe_before, probe = state["probe_before"], state["sampler"].get("probe")
        del state
    if probe is None:   # a fresh run: the probe is what the chief trains on first, kept for every resume
        probe = {"identities": probe_identities(shard).tolist() if is_chief else [],
                 "images_per_person": cfg.images_per_person}
        if distributed:   # every worker takes part in gathering the probe's head rows
            shared = [probe]
            dist.broadcast_object_list(shared, src=0)
            probe = shared[0]
    probe_ids = np.unique(np.asarray(probe["identities"], dtype=np.int64))

    def probe_head() -> CombinedLoss:   # a collective: every worker calls it
        return gather_rows(net.loss, rows, probe_ids, all_reduce)

    evaluator = ChiefEvaluator(cfg, split, probe, init.spec, device) if is_chief else None
    release_freed_memory()
    history = read_history(cfg, start_epoch) if is_chief else []
    if checkpoint is None:
        head = probe_head()   # a collective, before the chief's row 0
        if is_chief:
            probe_before = evaluator.probe(net, head)
            heldout_before = heldout_last = evaluator.heldout(net)
            row = {"epoch": 0, "world_size": world, **_prefixed("probe_", probe_before), **H.flatten(heldout_before)}
            history = [row]
            write_history(cfg, history)
            print(json.dumps(row), flush=True)
    release_freed_memory()

    batch = cfg.people_per_batch * cfg.images_per_person
    for epoch in range(start_epoch, cfg.epochs):
        step_fn.train()
        sums: dict[str, float] = {}
        lr_factor, t0 = 1.0, time.perf_counter()
        for ready in prefetch_batches(shard.faces, shard.sampler, epoch, steps, threads=threads,
                                      depth=max(PREFETCH_BATCHES, threads),
                                      transform=augment if cfg.augment.enabled else None,
                                      keep_clean=cfg.distill_weight > 0):
            parts = step_fn(ready.crops, to_local(rows, ready.labels), epoch + (ready.step + 1) / steps,
                            step_generator(cfg.data.seed, epoch, ready.step, rank), clean=ready.clean)
            lr_factor = parts.pop("lr_factor")
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "world_size": world, "steps": steps, "lr": cfg.lr * lr_factor,
               **mean_over_workers(sums, steps, world, device, all_reduce),
               "samples": steps * batch * world, "train_time_s": round(train_time, 3),
               "samples_per_s": round(steps * batch * world / max(train_time, 1e-9), 2)}
        report_checkpoint = None
        release_freed_memory()   # the steps' freed activations: the evaluation's and checkpoint's need not come on top
        head = probe_head()
        with tempfile.TemporaryDirectory() as tmp:
            if is_chief:
                row.update(_prefixed("probe_", evaluator.probe(net, head)))
                heldout_last = evaluator.heldout(net)
                row.update(H.flatten(heldout_last))
                row["epoch_time_s"] = round(time.perf_counter() - t0, 3)
                history.append(row)
                write_history(cfg, history)
                print(json.dumps(row), flush=True)
            # A collective (every worker's head rows onto rank 0), after the chief's evaluation.
            state = full_state(step_fn.state_dict(), rows, num_classes, head_params, reduce, keep=is_chief)
            if is_chief:
                save_checkpoint_state({
                    "epoch": epoch + 1, **state,
                    "sampler": {"seed": cfg.data.seed, "people_per_batch": cfg.people_per_batch,
                                "images_per_person": cfg.images_per_person, "world_size": world,
                                "probe": probe},
                    "identities": list(split.train), "run_id": run_id,
                    "init": {"name": init.spec.name, "version": init.spec.version, "kind": init.spec.kind},
                    "heldout_before": heldout_before, "heldout_last": heldout_last,
                    "probe_before": probe_before}, tmp)
                report_checkpoint = ray.train.Checkpoint.from_directory(tmp)
            del state
            release_freed_memory()
            ray.train.report(row, checkpoint=report_checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
