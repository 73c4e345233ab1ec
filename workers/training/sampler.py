"""FaceNet "people per batch" sampling: P identities x K images per worker per step.

Every step of an epoch draws ``num_workers * P`` distinct identities from a per-epoch
permutation of the eligible identities (those with at least two images); worker ``rank``
takes its own slice of ``P`` of them, so the identities of one step are disjoint across
workers. For each of its identities a worker then draws ``K`` images. Everything is
deterministic from ``(seed, epoch, step, rank)``; all workers must share ``labels`` and
``seed``.

Pure numpy; no Ray.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_PERMUTATION_STREAM = 0
_IMAGE_STREAM = 1


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
        seed: non-negative integer, identical on all workers.

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
