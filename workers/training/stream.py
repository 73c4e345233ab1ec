"""A training worker's data: its identity shard as stored JPEG bytes, decoded batch by batch ahead of the step.

Every Ray Train worker computes the same identity shards from the split (``split.train_counts``, the face
count of each training identity), reads only its own identities' rows (a pushed-down identity filter, 4
columns) and keeps their crops as the stored JPEG bytes, packed into one buffer, about 5 kB per face
instead of 37.6 kB decoded.
Each step's P x K batch comes from the worker's own identities, so the identities of one step are disjoint
across workers by construction; labels stay indices into ``split.train`` (the worker's loss head holds the rows
of its own identities only, :mod:`workers.training.head`). :func:`prefetch_batches` decodes (``cv2.imdecode``
releases the GIL) and transforms the next batches in a small thread pool while the current step computes.

Schedule:

* shards: :func:`workers.training.sampler.shard_identities` of ``(train_counts, W, seed)``, balanced by
  face count; every worker takes :func:`workers.training.sampler.shard_steps` steps per epoch, the fewest
  full steps of any shard (capped by ``steps_per_epoch``), so DDP workers step together;
* batches: worker ``rank`` runs ``PKSampler(shard labels, P, K, num_workers=1,
  seed=shard_seed(seed, rank))``; a batch is a function of ``(seed, W, rank, epoch, step)``.

Resuming on another number of workers W' (e.g. 2 -> 1): the shards, the steps per epoch and so every batch
after the checkpoint differ from what W workers would have drawn (W' shards of the same identities). What
continues is everything in the checkpoint: the epoch counter (the run goes on at the checkpoint's epoch),
the learning-rate schedule (a function of fractional epochs, not of steps), the weights, the classifier
head and centers (checkpointed as full C-row tables, each worker takes its new identities' rows), AdamW and
the grad scaler, and the chief's probe
identities (:func:`probe_identities` of the first run, kept in the checkpoint) so that the probe batch and,
with the seed, the held-out pairs stay the same and their metrics comparable.

Pure numpy/cv2 on top of :mod:`workers.training.data`; no Ray, no torch.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import cv2
import numpy as np

from workers.training.data import DataConfig, EncodedFaces, IdentitySplit, load_encoded_faces, load_faces
from workers.training.sampler import PKSampler, shard_identities, shard_seed, shard_steps

#: (crops uint8[B, H, W, 3], epoch, step) -> uint8[B, H, W, 3]; must depend on its arguments only.
Transform = Callable[[np.ndarray, int, int], np.ndarray]


class Batch(NamedTuple):
    """One step's decoded batch.

    Attributes:
        step: the step of the epoch.
        index: int64[B] positions into the shard's faces (``sampler.indices_for_step``).
        crops: uint8[B, H, W, 3] RGB, decoded and transformed.
        labels: int64[B], indices into ``split.train``.
        clean: uint8[B, H, W, 3] the crops before ``transform`` (only when asked for; else None).
    """

    step: int
    index: np.ndarray
    crops: np.ndarray
    labels: np.ndarray
    clean: np.ndarray | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class WorkerShard:
    """One worker's share of the training identities and how it samples them.

    Attributes:
        rank: this worker, in [0, num_workers).
        num_workers: W.
        identities: int64[L], the labels (indices into ``split.train``) of this worker's identities.
        faces: their faces, crops as stored bytes, labels global.
        sampler: ``PKSampler(faces.labels, P, K, num_workers=1, seed=shard_seed(seed, rank))``.
        steps_per_epoch: steps every worker takes per epoch (the same on all of them).
    """

    rank: int
    num_workers: int
    identities: np.ndarray
    faces: EncodedFaces
    sampler: PKSampler
    steps_per_epoch: int


def plan_shards(split: IdentitySplit, num_workers: int, people_per_batch: int, seed: int,
                steps_cap: int = 0) -> tuple[np.ndarray, int]:
    """The identity shards of a split and the steps per epoch all of them can take.

    Args:
        split: the training identities and their face counts (``train_counts``).
        num_workers: W >= 1.
        people_per_batch: P >= 1.
        seed: shard seed (the data seed).
        steps_cap: at most this many steps per epoch (0: a full pass of the smallest shard).

    Returns:
        (int64[M] worker of every training identity, steps per epoch >= 1).

    Raises:
        ValueError: the split lacks face counts, or a shard has fewer than P identities with >= 2 faces.
    """
    counts = np.asarray(split.train_counts, dtype=np.int64)
    if counts.shape != (len(split.train),):
        raise ValueError(f"split has {len(split.train)} training identities but {counts.size} face counts "
                         f"(train_counts); build it with split_faces / plan_split")
    owner = shard_identities(counts, num_workers, seed)
    return owner, shard_steps(counts, owner, num_workers, people_per_batch, steps_cap)


def open_worker_shard(data: DataConfig, split: IdentitySplit, num_workers: int, rank: int,
                      people_per_batch: int, images_per_person: int, steps_cap: int = 0) -> WorkerShard:
    """Read worker ``rank``'s identity shard (only its rows, crops not decoded) and set up its sampler.

    Args:
        data: where the faces are, the row rules and the seed.
        split: the run's identity split (with ``train_counts``).
        num_workers: W.
        rank: in [0, W).
        people_per_batch: P.
        images_per_person: K.
        steps_cap: cap on steps per epoch (0: none).

    Returns:
        The shard.

    Raises:
        ValueError: see :func:`plan_shards`; or the faces read no longer give this shard its steps (the
            faces table changed since the split was planned).
    """
    if not 0 <= rank < num_workers:
        raise ValueError(f"rank must be in [0, {num_workers}), got {rank}")
    owner, steps = plan_shards(split, num_workers, people_per_batch, data.seed, steps_cap)
    identities = np.flatnonzero(owner == rank).astype(np.int64)
    faces = load_encoded_faces(data, split.train, identities)
    _, per_identity = np.unique(faces.labels, return_counts=True)
    eligible = int((per_identity >= 2).sum())
    if eligible < steps * people_per_batch:
        expected = int(np.asarray(split.train_counts)[identities].sum())
        raise ValueError(f"worker {rank} of {num_workers} read {len(faces)} faces of {len(identities)} identities "
                         f"({eligible} with >= 2 faces), the split counted {expected} faces: too few for "
                         f"{steps} steps of {people_per_batch} identities; the faces table {data.faces!r} "
                         f"changed since the split was planned")
    sampler = PKSampler(faces.labels, people_per_batch, images_per_person, 1, 0, shard_seed(data.seed, rank))
    return WorkerShard(rank=rank, num_workers=num_workers, identities=identities, faces=faces, sampler=sampler,
                       steps_per_epoch=steps)


def decode_jpegs(encoded: Sequence[bytes | np.ndarray] | np.ndarray) -> np.ndarray:
    """Decode stored crops (JPEG / PNG bytes) into one array, as :func:`workers.records.decode_crops` does.

    Args:
        encoded: B images of one size, each stored bytes or a uint8[n] view of them
            (:meth:`EncodedFaces.take`).

    Returns:
        uint8[B, H, W, 3] RGB (``uint8[0, 112, 112, 3]`` for B = 0).

    Raises:
        ValueError: an item does not decode, or its size differs from the first item's.
    """
    out = None
    for i, data in enumerate(encoded):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"crop {i} of the batch ({len(data)} bytes) is not a decodable image")
        if out is None:
            out = np.empty((len(encoded), *image.shape), np.uint8)
        elif image.shape != out.shape[1:]:
            raise ValueError(f"crop {i} of the batch is {image.shape}, crop 0 is {out.shape[1:]}")
        out[i] = image[:, :, ::-1]
    return out if out is not None else np.zeros((0, 112, 112, 3), np.uint8)


def make_batch(faces: EncodedFaces, sampler: PKSampler, epoch: int, step: int,
               transform: Transform | None = None, keep_clean: bool = False) -> Batch:
    """The batch of ``(epoch, step)``: the sampler's faces, decoded, then ``transform(crops, epoch, step)``
    (``keep_clean``: the decoded crops are kept beside the transformed ones, e.g. for distillation)."""
    index = sampler.indices_for_step(epoch, step)
    clean = crops = decode_jpegs(faces.take(index))
    if transform is not None:
        crops = transform(crops.copy() if keep_clean else crops, epoch, step)
    return Batch(step=step, index=index, crops=crops, labels=faces.labels[index],
                 clean=clean if keep_clean else None)


def prefetch_batches(faces: EncodedFaces, sampler: PKSampler, epoch: int, steps: int, *, threads: int = 2,
                     depth: int = 3, transform: Transform | None = None, keep_clean: bool = False
                     ) -> Iterator[Batch]:
    """Yield :func:`make_batch` of steps ``0 .. steps-1`` of ``epoch``, in order, made ahead in threads.

    Up to ``depth`` batches are being made or wait, made, behind the one the caller holds (a bounded
    queue); each is a function of ``(epoch, step)`` only, so the threads change the timing, never the
    batches. The pool lives as long as the iteration: closing the generator early cancels what has not
    started and waits for what has.

    Args:
        faces, sampler: the shard's faces and its sampler (``sampler`` over ``faces.labels``).
        epoch: >= 0.
        steps: in [0, sampler.steps_per_epoch].
        threads: decoding threads, >= 1.
        depth: batches in flight, >= 1.
        transform: applied in the thread after decoding (e.g. augmentation).
        keep_clean: also keep each batch's crops before ``transform`` (``Batch.clean``).

    Raises:
        ValueError: bad steps, threads or depth; an error of a batch is raised where it is yielded.
    """
    if not 0 <= steps <= sampler.steps_per_epoch:
        raise ValueError(f"steps must be in [0, {sampler.steps_per_epoch}], got {steps}")
    if threads < 1 or depth < 1:
        raise ValueError(f"threads and depth must be >= 1, got {threads}, {depth}")
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="facemill-decode") as pool:
        pending: collections.deque = collections.deque()
        for step in range(min(depth, steps)):
            pending.append(pool.submit(make_batch, faces, sampler, epoch, step, transform, keep_clean))
        submitted = len(pending)
        try:
            while pending:
                future = pending.popleft()
                if submitted < steps:
                    pending.append(pool.submit(make_batch, faces, sampler, epoch, submitted, transform, keep_clean))
                    submitted += 1
                yield future.result()
        finally:
            for future in pending:
                future.cancel()


def probe_identities(shard: WorkerShard) -> np.ndarray:
    """The chief's probe identities: those ``shard`` trains at epoch 0, step 0 (so the probe is trained on).

    Returns:
        int64[P] labels into ``split.train``, ascending.
    """
    return np.unique(shard.faces.labels[shard.sampler.indices_for_step(0, 0)])


def probe_batch(data: DataConfig, split: IdentitySplit, identities: Sequence[int] | np.ndarray,
                images_per_person: int) -> tuple[np.ndarray, np.ndarray]:
    """The chief's fixed probe batch: K faces of each probe identity, picked by the seed.

    Reads and decodes only those identities' faces; the batch depends on ``(identities, K, seed)`` only,
    not on the number of workers.

    Args:
        data: where the faces are, and the seed.
        split: the run's identity split.
        identities: labels into ``split.train`` (e.g. :func:`probe_identities`), each with >= 2 faces.
        images_per_person: K.

    Returns:
        (uint8[P*K, H, W, 3] RGB crops, int64[P*K] labels into ``split.train``), identity-major.

    Raises:
        ValueError: an identity out of range or with fewer than 2 faces.
    """
    chosen = np.unique(np.asarray(identities, dtype=np.int64))
    if chosen.size == 0 or chosen[0] < 0 or chosen[-1] >= len(split.train):
        raise ValueError(f"probe identities must be labels in [0, {len(split.train)}), got {chosen.tolist()}")
    faces = load_faces(data, [split.train[i] for i in chosen.tolist()])
    labels = chosen[faces.labels]
    index = PKSampler(labels, chosen.size, images_per_person, 1, 0, data.seed).indices_for_step(0, 0)
    return faces.crops[index], labels[index]
