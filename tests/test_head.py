"""The identity-local loss head (workers.training.head): each worker holds its own identities' rows only, the
centers move exactly as the old all-reduced replicated update did, and checkpoints keep the full C-row format
(rows summed onto rank 0 over real gloo collectives) so a run resumes on any number of workers."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workers.training.head import (ROW_KEYS, full_state, gather_rows, head_param_indices, local_state, restrict,
                                   to_local)
from workers.training.losses import CombinedLoss, LossConfig
from workers.training.step import FaceTrainNet, TrainStep, step_generator

C, D = 11, 8
ROWS = (np.array([0, 3, 4, 8, 10]), np.array([1, 2, 5, 6, 7, 9]))   # two workers' identities, disjoint


class TinyBackbone(torch.nn.Module):
    """float32[B, 3, 112, 112] -> float32[B, D] (a linear map of 4 x 4 pooled pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 4).flatten(1))


def full_loss(seed: int = 0) -> CombinedLoss:
    torch.manual_seed(seed)
    loss = CombinedLoss(C, D, LossConfig(center_weight=0.1))
    with torch.no_grad():
        loss.center_loss.centers.normal_()
    return loss


def test_restrict_copies_the_rows_and_to_local_maps_labels():
    loss = full_loss()
    part = restrict(loss, ROWS[1])
    assert part.classifier.weight.shape == (ROWS[1].size, D)
    for key in ROW_KEYS:
        assert torch.equal(part.state_dict()[key], loss.state_dict()[key][torch.from_numpy(ROWS[1])])
    assert part.classifier.weight.data_ptr() != loss.classifier.weight.data_ptr()
    assert restrict(loss, np.arange(C)) is loss
    assert to_local(ROWS[1], np.array([9, 1, 5, 9])).tolist() == [5, 0, 2, 5]
    with pytest.raises(ValueError, match=r"labels \[0, 3\] are not held"):
        to_local(ROWS[1], np.array([1, 0, 3]))
    with pytest.raises(ValueError, match="strictly ascending"):
        restrict(loss, np.array([2, 1]))
    with pytest.raises(ValueError, match="strictly ascending"):
        restrict(loss, np.array([3, C]))


def test_local_centers_move_like_the_old_all_reduced_replicated_update():
    """Old: every worker held all C centers and summed dense C x (D + 1) updates over the workers. New: each
    worker moves its own rows with its own batch. Same centers, because the workers' classes are disjoint."""
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, D, generator=generator), torch.from_numpy(np.repeat(rows[:4], 2))) for rows in ROWS]
    replicas = [full_loss(), full_loss()]
    pending = []

    def record(sums):               # the first worker's sums, added when the second one reduces
        pending.append(sums.clone())

    def add(sums):
        sums += pending.pop()
    replicas[0].update_centers(*batches[0], record)
    replicas[1].update_centers(*batches[1], add)
    expected = replicas[1].center_loss.centers
    for rows, (features, labels) in zip(ROWS, batches):
        local = restrict(full_loss(), rows)
        local.update_centers(features, torch.from_numpy(to_local(rows, labels.numpy())))
        assert torch.allclose(local.center_loss.centers, expected[torch.from_numpy(rows)], atol=1e-6)


def _step(rows: np.ndarray, seed: int) -> TrainStep:
    torch.manual_seed(0)
    net = FaceTrainNet(TinyBackbone(), restrict(full_loss(), rows))
    step = TrainStep(net, torch.device("cpu"), lr=1e-2, precision="float32")
    generator = np.random.default_rng(seed)
    crops = generator.integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)
    labels = np.repeat(generator.choice(rows, 4, replace=False), 2)
    step(crops, to_local(rows, labels), 0.5, step_generator(0, 0, 0, seed))
    return step


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        rows = ROWS[rank]
        step = _step(rows, seed=rank)
        params = head_param_indices(step.optimizer, step.net.loss)
        held = sum(t.numel() * t.element_size() for t in step.net.loss.state_dict().values())
        state = full_state(step.state_dict(), rows, C, params, lambda t: dist.reduce(t, dst=0), keep=rank == 0)
        probe = np.array([2, 3, 9])
        part = gather_rows(step.net.loss, rows, probe, dist.all_reduce)
        torch.save({"local": step.state_dict(), "full": state, "params": params, "held": held,
                    "probe": part.state_dict()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_checkpoint_tables_gathered_over_gloo_and_cut_back_for_any_worker_count(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[1]["full"] is None
    full = ranks[0]["full"]
    # each worker held its own rows only: weight + bias + centers of R identities (+ the centers' config scalars)
    for rows, rank in zip(ROWS, ranks):
        assert rank["held"] == rows.size * (D + 1 + D) * 4
    # rank 0 got every identity's row from its owner: loss tables and AdamW moments
    params = ranks[0]["params"]
    assert len(params) == 2    # classifier weight and bias
    for rows, rank in zip(ROWS, ranks):
        index = torch.from_numpy(rows)
        for key in ROW_KEYS:
            assert full["loss"][key].shape[0] == C
            assert torch.equal(full["loss"][key][index], rank["local"]["loss"][key])
        for p in params:
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(full["optimizer"]["state"][p][key][index],
                                   rank["local"]["optimizer"]["state"][p][key])
        # cut back to a worker's rows: its own state again (a resume on the same worker count)
        cut = local_state(full, rows, params)
        for key in ROW_KEYS:
            assert torch.equal(cut["loss"][key], rank["local"]["loss"][key])
    # a resume on one worker: all C rows; the cut leaves the full state untouched
    assert torch.equal(local_state(full, np.arange(C), params)["loss"]["classifier.weight"],
                       full["loss"]["classifier.weight"])
    assert full["loss"]["classifier.weight"].shape == (C, D)
    # the probe's rows, from whichever worker holds them, on every worker
    for rank in ranks:
        assert torch.equal(rank["probe"]["classifier.weight"], full["loss"]["classifier.weight"][[2, 3, 9]])
        assert torch.equal(rank["probe"]["center_loss.centers"], full["loss"]["center_loss.centers"][[2, 3, 9]])
    # a full state from another run size (other identities) is refused, not silently cut
    with pytest.raises(ValueError, match="do not fit"):
        local_state(full, np.array([0, C + 3]), params)


def test_one_worker_keeps_the_full_head_unchanged():
    step = _step(np.arange(C), seed=0)
    params = head_param_indices(step.optimizer, step.net.loss)
    state = step.state_dict()
    full = full_state(state, np.arange(C), C, params, None)
    assert full["loss"]["classifier.weight"] is state["loss"]["classifier.weight"]
    with pytest.raises(ValueError, match="must hold all"):
        full_state(state, ROWS[0], C, params, None)
    with pytest.raises(ValueError, match="not held and there is no other worker"):
        gather_rows(restrict(full_loss(), ROWS[0]), ROWS[0], np.array([0, 1]), None)


def test_a_triplet_only_loss_has_no_rows_to_shard():
    loss = CombinedLoss(C, D, LossConfig(softmax_weight=0.0, center_weight=0.0))
    assert restrict(loss, ROWS[0]) is loss
    assert gather_rows(loss, ROWS[0], np.array([1, 2]), None) is loss
    state = {"loss": loss.state_dict(), "optimizer": {"state": {}, "param_groups": []}}
    assert full_state(state, ROWS[0], C, [], lambda t: None)["loss"] == {}
