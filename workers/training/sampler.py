"""FaceNet "people per batch" sampling: P identities x K images per worker per step.

Two ways to keep the identities of one step disjoint across W data-parallel workers:

* **Shared labels** (``PKSampler(labels, P, K, num_workers=W, rank=r)``): every worker holds every
  label; every step draws ``W * P`` distinct identities from a per-epoch permutation and worker
  ``rank`` takes its own slice of ``P``.
* **Identity shards** (what training uses): :func:`shard_identities` gives each worker its own
  identities, balanced by face count; each worker holds only its shard's faces and runs
  ``PKSampler(shard_labels, P, K, num_workers=1, seed=shard_seed(seed, rank))``. All workers take
  :func:`shard_steps` steps per epoch (the smallest shard's full steps), as DDP requires.

For each of its identities a worker then draws ``K`` images. Everything is deterministic from
``(seed, epoch, step, rank)`` (and, for shards, ``W``).

Pure numpy; no Ray.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np

_PERMUTATION_STREAM = 0
_IMAGE_STREAM = 1
_SHARD_STREAM = 2
_SHARD_SEED_STREAM = 3


class PKSampler:
    """Per-worker P x K batch indices for triplet / center-loss training.

    Image draw per identity with ``n`` images:

    * ``n >= K``: ``K`` distinct images, uniformly without replacement.
    * ``2 <= n < K``: every one of the ``n`` images once, and the remaining ``K - n`` slots
      drawn uniformly with replacement from the same ``n`` images (so duplicates appear,
      but every identity always contributes at least two distinct images).

    Identities with fewer than two images are never drawn. Each epoch visits
    ``steps_per_epoch * num_workers * P`` distinct identities, the first ones of a fresh
    permutation; the ``num_eligible_identities mod (num_workers * P)`` left over differ from
    epoch to epoch.

    Args:
        labels: int[N], identity of every training sample (any integer values).
        people_per_batch: P, identities per worker per step, >= 1.
        images_per_person: K, images per identity, >= 2.
        num_workers: W, data-parallel workers sharing the identities of a step, >= 1.
        rank: this worker, in [0, W).
        seed: non-negative integer; with shared labels identical on all workers, with shards
            :func:`shard_seed` of the rank.

    Raises:
        ValueError: bad shapes or values, or fewer than W * P eligible identities.
    """

    def __init__(self, labels: np.ndarray, people_per_batch: int, images_per_person: int,
                 num_workers: int = 1, rank: int = 0, seed: int = 0) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} "
                             f"dtype {labels.dtype}")
        if people_per_batch < 1:
            raise ValueError(f"people_per_batch must be >= 1, got {people_per_batch}")
        if images_per_person < 2:
            raise ValueError(f"images_per_person must be >= 2, got {images_per_person}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not 0 <= rank < num_workers:
            raise ValueError(f"rank must be in [0, {num_workers}), got {rank}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")

        # Samples grouped by identity: order[starts[i] : starts[i] + counts[i]] are identity i.
        order = np.argsort(labels, kind="stable").astype(np.int64)
        identities, counts = np.unique(labels, return_counts=True)
        starts = np.cumsum(counts) - counts
        eligible = counts >= 2
        needed = num_workers * people_per_batch
        if int(eligible.sum()) < needed:
            raise ValueError(
                f"need at least num_workers * people_per_batch = {num_workers} * "
                f"{people_per_batch} = {needed} identities with >= 2 images, "
                f"got {int(eligible.sum())} (of {identities.size} identities, {labels.size} samples)")

        self.people_per_batch = int(people_per_batch)
        self.images_per_person = int(images_per_person)
        self.num_workers = int(num_workers)
        self.rank = int(rank)
        self.seed = int(seed)
        self._order = order
        self._identities = identities[eligible]
        self._starts = starts[eligible].astype(np.int64)
        self._counts = counts[eligible].astype(np.int64)

    @property
    def eligible_identities(self) -> np.ndarray:
        """int[M], the label values with at least two images, ascending."""
        return self._identities.copy()

    @property
    def num_eligible_identities(self) -> int:
        """M, the number of identities with at least two images."""
        return int(self._identities.size)

    @property
    def batch_size(self) -> int:
        """P * K, indices per worker per step."""
        return self.people_per_batch * self.images_per_person

    @property
    def steps_per_epoch(self) -> int:
        """M // (W * P): full steps in one pass over the eligible identities."""
        return self.num_eligible_identities // (self.num_workers * self.people_per_batch)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def identities_for_step(self, epoch: int, step: int) -> np.ndarray:
        """Identities this worker draws at ``(epoch, step)``.

        Returns:
            int[P], positions into ``eligible_identities`` (not label values).
        """
        self._check_step(epoch, step)
        rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
        permutation = rng.permutation(self.num_eligible_identities)
        first = (step * self.num_workers + self.rank) * self.people_per_batch
        return permutation[first:first + self.people_per_batch].astype(np.int64)

    def indices_for_step(self, epoch: int, step: int) -> np.ndarray:
        """Sample indices for this worker at ``(epoch, step)``.

        Args:
            epoch: >= 0.
            step: in [0, steps_per_epoch).

        Returns:
            int64[P * K] indices into ``labels``, identity-major: entries ``[i*K, (i+1)*K)``
            share one identity.

        Raises:
            ValueError: epoch < 0 or step outside [0, steps_per_epoch).
        """
        chosen = self.identities_for_step(epoch, step)
        rng = np.random.default_rng([self.seed, _IMAGE_STREAM, epoch, step, self.rank])
        local = _draw_local_positions(rng, self._counts[chosen], self.images_per_person)
        return self._order[self._starts[chosen][:, None] + local].reshape(-1)

    def epoch_batches(self, epoch: int) -> Iterator[np.ndarray]:
        """Yield ``indices_for_step(epoch, step)`` for every step of the epoch."""
        for step in range(self.steps_per_epoch):
            yield self.indices_for_step(epoch, step)

    def _check_step(self, epoch: int, step: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"step must be in [0, {self.steps_per_epoch}), got {step}")


def _draw_local_positions(rng: np.random.Generator, counts: np.ndarray, k: int) -> np.ndarray:
    """K positions inside each identity's block of images.

    Args:
        rng: numpy generator.
        counts: int64[P] >= 2, images of each chosen identity.
        k: images to draw per identity.

    Returns:
        int64[P, k], entry [i, j] in [0, counts[i]); distinct along a row when counts[i] >= k,
        otherwise all of 0..counts[i]-1 followed by draws with replacement.
    """
    local = np.empty((counts.size, k), dtype=np.int64)
    full = counts >= k
    if full.any():
        # Without replacement, all identities at once: random keys, sort within each
        # identity's segment, keep the first k of every segment.
        n = counts[full]
        offsets = np.cumsum(n) - n
        group = np.repeat(np.arange(n.size), n)
        ranked = np.lexsort((rng.random(group.size), group))  # group is primary key
        rank_in_group = np.arange(group.size) - offsets[group]
        keep = rank_in_group < k
        local[full] = (ranked - offsets[group])[keep].reshape(-1, k)
    short = ~full
    if short.any():
        n = counts[short][:, None]
        columns = np.arange(k)[None, :]
        extra = np.minimum((rng.random((n.shape[0], k)) * n).astype(np.int64), n - 1)
        local[short] = np.where(columns < n, columns, extra)
    return local


def shard_identities(counts: np.ndarray, num_workers: int, seed: int = 0) -> np.ndarray:
    """Assign identities to ``num_workers`` disjoint shards, balanced by face count.

    A seeded shuffle orders identities of equal count, then they go largest first to the worker
    with the fewest faces so far (the lowest rank on ties): the LPT greedy. The worker that ends
    with the most faces got its last identity while it had the fewest, so the loads differ by at
    most the largest count.

    Args:
        counts: int[M] >= 0, faces of identity ``i`` (e.g. label ``i`` of ``split.train``).
        num_workers: W >= 1.
        seed: >= 0.

    Returns:
        int64[M], the worker of every identity, in [0, W); a function of ``(counts, W, seed)`` only.

    Raises:
        ValueError: counts not a 1-D array of non-negative integers, W < 1 or seed < 0.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or not (counts.size == 0 or np.issubdtype(counts.dtype, np.integer)) or \
            (counts < 0).any():
        raise ValueError(f"counts must be a 1-D array of non-negative integers, got shape {counts.shape} "
                         f"dtype {counts.dtype}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, _SHARD_STREAM, num_workers])
    order = rng.permutation(counts.size)
    order = order[np.argsort(-counts[order], kind="stable")]
    owner = np.zeros(counts.size, dtype=np.int64)
    if num_workers == 1:
        return owner
    loads = [(0, w) for w in range(num_workers)]   # a heap of (faces so far, worker)
    for i, count in zip(order.tolist(), counts[order].tolist()):
        load, worker = loads[0]
        owner[i] = worker
        heapq.heapreplace(loads, (load + count, worker))
    return owner


def shard_seed(seed: int, rank: int) -> int:
    """Seed of worker ``rank``'s shard sampler: a non-negative int derived from ``(seed, rank)``."""
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be >= 0, got {seed}, {rank}")
    state = np.random.SeedSequence([seed, _SHARD_SEED_STREAM, rank]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


def shard_steps(counts: np.ndarray, owner: np.ndarray, num_workers: int, people_per_batch: int,
                cap: int = 0) -> int:
    """Steps per epoch that every shard can take: the fewest full P-identity steps of any worker.

    Args:
        counts: int[M], faces of every identity.
        owner: int[M] in [0, W), from :func:`shard_identities`.
        num_workers: W.
        people_per_batch: P >= 1.
        cap: at most this many steps (0: no cap).

    Returns:
        ``min(min over workers of eligible_identities_w // P, cap)``, >= 1 (eligible: >= 2 faces,
        as :class:`PKSampler` counts them).

    Raises:
        ValueError: a worker's shard has fewer than P eligible identities (the message lists the shards).
    """
    counts, owner = np.asarray(counts), np.asarray(owner)
    if counts.shape != owner.shape or counts.ndim != 1:
        raise ValueError(f"counts and owner must be 1-D of one length, got {counts.shape} and {owner.shape}")
    if people_per_batch < 1:
        raise ValueError(f"people_per_batch must be >= 1, got {people_per_batch}")
    if owner.size and not 0 <= owner.min() <= owner.max() < num_workers:
        raise ValueError(f"owner must be in [0, {num_workers}), got {owner.min()}..{owner.max()}")
    eligible = np.bincount(owner[counts >= 2], minlength=num_workers)
    full = eligible // people_per_batch
    if full.min() < 1:
        worker = int(np.argmin(full))
        raise ValueError(f"worker {worker} of {num_workers} holds {int(eligible[worker])} identities with >= 2 "
                         f"faces, fewer than people_per_batch = {people_per_batch} (identities per worker: "
                         f"{eligible.tolist()}); lower --people-per-batch or --workers")
    steps = int(full.min())
    return min(steps, int(cap)) if cap > 0 else steps
