"""Center loss, its (distributed) center update, and the combined loss."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

from workers.training.losses import CenterLoss, CombinedLoss, LossConfig
from workers.training.mining import semi_hard_triplets, triplet_loss

C, D = 7, 5


def _data(seed: int, batch: int = 12):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, D, generator=g)
    labels = torch.randint(0, C, (batch,), generator=g)
    return features, labels


def _center_loss(seed: int = 0) -> CenterLoss:
    module = CenterLoss(C, D, alpha=0.9)
    module.centers.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(100 + seed)))
    return module


def _reference_update(centers: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """c_j <- c_j - (1 - alpha) * mean_{i: y_i = j}(c_j - f_i), one class at a time, float64."""
    centers, features = centers.double(), features.double()
    out = centers.clone()
    for j in range(centers.shape[0]):
        rows = [i for i in range(len(labels)) if labels[i] == j]
        if rows:
            delta = sum(centers[j] - features[i] for i in rows) / len(rows)
            out[j] = centers[j] - (1 - alpha) * delta
    return out


def test_center_loss_value_and_gradient() -> None:
    module = _center_loss()
    features, labels = _data(0)
    features.requires_grad_(True)
    loss = module(features, labels)
    f, c = features.detach().double(), module.centers.double()
    ref = sum(0.5 * ((f[i] - c[labels[i]]) ** 2).sum() for i in range(len(labels))) / len(labels)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    torch.testing.assert_close(features.grad, (features.detach() - module.centers[labels]) / 12)
    assert not module.centers.requires_grad
    assert "centers" in dict(module.named_buffers()) and not list(module.parameters())


def test_center_update_matches_formula() -> None:
    module = _center_loss()
    features, labels = _data(1, batch=20)
    labels[labels == 3] = 4                       # class 3 absent: must stay unchanged
    before = module.centers.clone()
    module.update_centers(features, labels)
    expected = _reference_update(before, features, labels, alpha=0.9)
    torch.testing.assert_close(module.centers.double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(module.centers[3], before[3])


class _TwoWorkerAllReduce:
    """Simulates ``torch.distributed.all_reduce`` (in-place sum) for two threads."""

    def __init__(self, world_size: int = 2) -> None:
        self._barrier = threading.Barrier(world_size, timeout=10)
        self._tensors: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> None:
        with self._lock:
            self._tensors.append(tensor.clone())
            self.calls += 1
        self._barrier.wait()
        total = torch.stack(self._tensors).sum(0)
        self._barrier.wait()
        tensor.copy_(total)


def test_two_workers_apply_the_single_process_update() -> None:
    workers = [_center_loss(), _center_loss()]
    batches = [_data(2), _data(3, batch=9)]
    single = _center_loss()
    single.update_centers(torch.cat([batches[0][0], batches[1][0]]),
                          torch.cat([batches[0][1], batches[1][1]]))

    all_reduce = _TwoWorkerAllReduce()
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            workers[rank].update_centers(*batches[rank], all_reduce=all_reduce)
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all_reduce.calls == 2
    assert torch.equal(workers[0].centers, workers[1].centers)
    torch.testing.assert_close(workers[0].centers, single.centers, atol=1e-6, rtol=0)
    # without the all-reduce the two copies would differ
    alone = _center_loss()
    alone.update_centers(*batches[0])
    assert not torch.allclose(alone.centers, workers[0].centers)


def test_all_reduce_may_return_a_tensor() -> None:
    a, b = _center_loss(), _center_loss()
    features, labels = _data(4)
    a.update_centers(features, labels, all_reduce=lambda t: t * 2)   # 2 identical workers
    b.update_centers(features, labels)
    torch.testing.assert_close(a.centers, b.centers)


def test_center_loss_errors() -> None:
    module = _center_loss()
    features, labels = _data(0)
    with pytest.raises(ValueError, match=r"\[0, 7\).*\[0, 7\]"):
        module(features, torch.full_like(labels, 7).index_fill(0, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match=r"\[B >= 1, 5\].*\(12, 4\)"):
        module(features[:, :4], labels)
    with pytest.raises(ValueError, match="alpha.*1.5"):
        CenterLoss(C, D, alpha=1.5)


def test_loss_config_validation() -> None:
    cfg = LossConfig()
    assert (cfg.margin, cfg.mining, cfg.center_weight, cfg.center_alpha) == (0.2, "facenet", 0.01, 0.95)
    with pytest.raises(ValueError, match="'hard'"):
        LossConfig(mining="hard")
    with pytest.raises(ValueError, match="center_weight.*-1"):
        LossConfig(center_weight=-1)
    with pytest.raises(ValueError, match="all 0"):
        LossConfig(triplet_weight=0, softmax_weight=0, center_weight=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.margin = 0.3  # type: ignore[misc]


def _pk_batch(seed: int, people: int = 4, images: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(C, generator=g)[:people].repeat_interleave(images)
    features = torch.randn(people * images, D, generator=g, requires_grad=True)
    return features, labels


def test_combined_loss_is_weighted_sum_of_parts() -> None:
    cfg = LossConfig(margin=0.5, mining="semi_hard", triplet_weight=0.7, softmax_weight=1.3,
                     center_weight=0.1)
    loss_fn = CombinedLoss(C, D, cfg)
    loss_fn.center_loss.centers.normal_()
    features, labels = _pk_batch(0)
    total, parts = loss_fn(features, labels)

    logits = loss_fn.classifier(features)
    ce = F.cross_entropy(logits, labels)
    center = loss_fn.center_loss(features, labels)
    emb = F.normalize(features, dim=1)
    trip, stats = triplet_loss(emb, *semi_hard_triplets(emb, labels, 0.5, "semi_hard"), 0.5)
    expected = 1.3 * ce + 0.1 * center + 0.7 * trip
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["softmax"] == pytest.approx(ce.item(), rel=1e-6)
    assert parts["center"] == pytest.approx(center.item(), rel=1e-6)
    assert parts["triplet"] == pytest.approx(trip.item(), rel=1e-6)
    assert parts["total"] == pytest.approx(total.item(), rel=1e-6)
    assert parts["num_triplets"] == stats["num_triplets"]
    assert 0 <= parts["accuracy"] <= 1
    assert all(isinstance(v, (int, float)) for v in parts.values())
    total.backward()
    assert features.grad is not None and loss_fn.classifier.weight.grad is not None


def test_combined_loss_parts_switch_off() -> None:
    features, labels = _pk_batch(1)
    only_triplet = CombinedLoss(C, D, LossConfig(softmax_weight=0, center_weight=0))
    assert only_triplet.classifier is None and only_triplet.center_loss is None
    assert not list(only_triplet.parameters()) and not list(only_triplet.buffers())
    total, parts = only_triplet(features, labels, generator=torch.Generator().manual_seed(0))
    assert set(parts) == {"triplet", "total", "num_triplets", "fraction_active"}
    assert total.grad_fn is not None

    no_triplet = CombinedLoss(C, D, LossConfig(triplet_weight=0))
    _, parts = no_triplet(features, labels)
    assert set(parts) == {"softmax", "accuracy", "center", "total"}

    only_triplet.update_centers(features, labels)     # no-op without center loss
    before = no_triplet.center_loss.centers.clone()
    no_triplet.update_centers(features, labels)
    assert not torch.equal(before, no_triplet.center_loss.centers)


def test_combined_loss_without_triplets_still_backpropagates() -> None:
    features = torch.randn(4, D, requires_grad=True)
    labels = torch.arange(4)                          # no positives: zero triplets
    loss_fn = CombinedLoss(C, D, LossConfig(softmax_weight=0, center_weight=0))
    total, parts = loss_fn(features, labels)
    assert parts["num_triplets"] == 0 and total.item() == 0.0
    total.backward()
    assert features.grad is not None
