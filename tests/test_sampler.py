"""PKSampler: P identities x K images per worker, disjoint across workers, deterministic."""
from __future__ import annotations

import numpy as np
import pytest

from workers.training.sampler import PKSampler


def _labels() -> np.ndarray:
    """40 identities: image counts 1..7 cycling (identities with 1 image are ineligible),
    shuffled so that identities are not contiguous."""
    counts = np.arange(40) % 7 + 1
    labels = np.repeat(np.arange(40) * 3 + 100, counts)   # non-contiguous label values
    return np.random.default_rng(0).permutation(labels)


def _check_batch(labels: np.ndarray, idx: np.ndarray, p: int, k: int) -> np.ndarray:
    assert idx.dtype == np.int64 and idx.shape == (p * k,)
    ids = labels[idx].reshape(p, k)
    assert (ids == ids[:, :1]).all(), "each block of K must be one identity"
    people = ids[:, 0]
    assert np.unique(people).size == p
    counts = dict(zip(*np.unique(labels, return_counts=True)))
    for person, row_idx in zip(people, idx.reshape(p, k)):
        n = counts[person]
        assert n >= 2
        distinct = np.unique(row_idx).size
        assert distinct == min(n, k), (n, k, distinct)   # without replacement / all images
    return people


@pytest.mark.parametrize("k", [2, 4, 9])
def test_batches_disjoint_across_ranks(k: int) -> None:
    labels = _labels()
    p, w = 3, 2
    samplers = [PKSampler(labels, p, k, num_workers=w, rank=r, seed=7) for r in range(w)]
    eligible = np.unique(labels)[np.unique(labels, return_counts=True)[1] >= 2]
    assert samplers[0].num_eligible_identities == eligible.size == 34
    assert samplers[0].steps_per_epoch == 34 // (w * p) == len(samplers[0])
    for epoch in range(2):
        seen = []
        batches = [list(s.epoch_batches(epoch)) for s in samplers]
        assert all(len(b) == samplers[0].steps_per_epoch for b in batches)
        for step in range(samplers[0].steps_per_epoch):
            people = [_check_batch(labels, batches[r][step], p, k) for r in range(w)]
            assert not set(people[0]) & set(people[1])
            seen.extend(np.concatenate(people))
        # a permutation per epoch: no identity twice within an epoch, all eligible
        assert len(seen) == len(set(seen)) == samplers[0].steps_per_epoch * w * p
        assert set(seen) <= set(eligible)


def test_reproducible_and_seed_dependent() -> None:
    labels = _labels()
    a = PKSampler(labels, 4, 3, seed=1)
    b = PKSampler(labels, 4, 3, seed=1)
    c = PKSampler(labels, 4, 3, seed=2)
    np.testing.assert_array_equal(a.indices_for_step(0, 1), b.indices_for_step(0, 1))
    assert not np.array_equal(a.indices_for_step(0, 1), c.indices_for_step(0, 1))
    assert not np.array_equal(a.indices_for_step(0, 1), a.indices_for_step(1, 1))
    assert not np.array_equal(a.indices_for_step(0, 0), a.indices_for_step(0, 1))


def test_epochs_cover_identities_evenly() -> None:
    labels = _labels()
    s = PKSampler(labels, 5, 2, seed=0)       # 34 eligible -> 6 steps of 5, 4 left out
    hits = np.zeros(labels.max() + 1, dtype=int)
    for epoch in range(60):
        for idx in s.epoch_batches(epoch):
            np.add.at(hits, np.unique(labels[idx]), 1)
    counts = hits[s.eligible_identities]
    assert counts.sum() == 60 * 30
    assert counts.min() >= 40 and counts.max() <= 60     # each left out ~4/34 of epochs
    assert hits.sum() == counts.sum()                      # ineligible never drawn


def test_errors_name_values() -> None:
    labels = _labels()
    with pytest.raises(ValueError, match="34"):
        PKSampler(labels, 9, 2, num_workers=4)              # 36 needed
    with pytest.raises(ValueError, match="people_per_batch.*0"):
        PKSampler(labels, 0, 2)
    with pytest.raises(ValueError, match="images_per_person.*1"):
        PKSampler(labels, 2, 1)
    with pytest.raises(ValueError, match="rank.*2"):
        PKSampler(labels, 2, 2, num_workers=2, rank=2)
    with pytest.raises(ValueError, match="1-D integer"):
        PKSampler(labels.astype(float), 2, 2)
    s = PKSampler(labels, 2, 2)
    with pytest.raises(ValueError, match="step.*17"):
        s.indices_for_step(0, s.steps_per_epoch)
    with pytest.raises(ValueError, match="epoch.*-1"):
        s.indices_for_step(-1, 0)
