"""Each worker's loss head holds only its own identities: classifier rows, centers, and their AdamW state.

Identities are sharded across Ray Train workers (:mod:`workers.training.stream`), so a worker's batches only
ever hold labels of its own identities. The center of identity ``j`` is moved only by its owner's batches;
giving every worker the whole head (C rows, replicated and all-reduced by DDP) cost 4 copies of a C x D table
per worker (weights, gradient, two AdamW moments: 205 MiB at 100k identities) plus two dense C x D all-reduces
per step. Here a worker holds ``R ≈ C / W`` rows:

* **softmax**: the cross-entropy of a worker normalises over its own identities (``R`` classes, not ``C``): the
  other workers' identities are not negatives of its samples. Like Partial FC's class sampling (An et al. 2021,
  which finds 10 % of the classes enough); with one worker it is the full softmax, unchanged;
* **centers**: moved by the owner alone, which is exactly what the old all-reduced update did (classes of
  different workers are disjoint);
* **the backbone** is still DDP-synchronised; the head is not in DDP;
* **checkpoints keep the full C-row format**: :func:`full_state` sums every worker's rows into zero-filled C-row
  tables on rank 0 (one ``reduce`` per table), :func:`local_state` cuts a full checkpoint down to a worker's rows,
  so a run resumes on any number of workers and older checkpoints load unchanged.

Pure torch/numpy; the collective is a plain callable (``torch.distributed.reduce`` / ``all_reduce``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from workers.training.losses import CombinedLoss

#: Loss-state tensors with one row per training identity (the rest of a loss state has none).
ROW_KEYS = ("classifier.weight", "classifier.bias", "center_loss.centers")
#: Per-parameter AdamW state tensors with the parameter's shape.
MOMENT_KEYS = ("exp_avg", "exp_avg_sq")

#: (tensor) -> None: sums a tensor over the workers onto rank 0 in place (``torch.distributed.reduce(t, 0)``).
Reduce = Callable[[torch.Tensor], Any]


def check_rows(rows: np.ndarray, num_classes: int) -> np.ndarray:
    """``rows`` as int64[R], strictly ascending, in ``[0, C)``; ValueError otherwise."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or rows.size == 0 or rows[0] < 0 or rows[-1] >= num_classes or np.any(np.diff(rows) <= 0):
        raise ValueError(f"head rows must be strictly ascending labels in [0, {num_classes}), got "
                         f"{rows.size} rows {rows[:5].tolist()}...")
    return rows


def to_local(rows: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Global labels (indices into ``split.train``) -> int64 indices into ascending ``rows``.

    Raises:
        ValueError: a label is not one of ``rows`` (a batch from another worker's identities).
    """
    labels = np.asarray(labels, dtype=np.int64)
    local = np.minimum(np.searchsorted(rows, labels), rows.size - 1)
    bad = rows[local] != labels
    if bad.any():
        raise ValueError(f"labels {np.unique(labels[bad])[:5].tolist()} are not held by this worker's head "
                         f"({rows.size} identities)")
    return local


def restrict(loss: CombinedLoss, rows: np.ndarray) -> CombinedLoss:
    """A :class:`CombinedLoss` over the ``rows`` of ``loss``'s classes (copies of their classifier rows and
    centers, same config); ``loss`` itself when ``rows`` is every class or the loss has no rows (triplet only)."""
    num_classes = head_classes(loss)
    if num_classes == 0:
        return loss
    rows = check_rows(rows, num_classes)
    if rows.size == num_classes:
        return loss
    part = CombinedLoss(rows.size, _embedding_size(loss), loss.config)
    index = torch.from_numpy(rows)
    part.load_state_dict({k: (v.index_select(0, index) if k in ROW_KEYS else v)
                          for k, v in loss.state_dict().items()})
    return part


def _embedding_size(loss: CombinedLoss) -> int:
    return loss.classifier.in_features if loss.classifier is not None else loss.center_loss.centers.shape[1]


def head_classes(loss: CombinedLoss) -> int:
    """C: how many identities the head has rows for (0 for a triplet-only loss)."""
    if loss.classifier is not None:
        return loss.classifier.out_features
    return loss.center_loss.centers.shape[0] if loss.center_loss is not None else 0


def head_param_indices(optimizer: torch.optim.Optimizer, loss: CombinedLoss) -> list[int]:
    """Indices, in ``optimizer.state_dict()["state"]``, of the parameters of ``loss`` (its classifier rows)."""
    head = {id(p) for p in loss.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [i for i, p in enumerate(params) if id(p) in head]


def _row_tables(state: dict[str, Any], head_params: Iterable[int]) -> list[tuple[dict, str]]:
    """(container, key) of every per-identity table of a training state, in a fixed order."""
    tables = [(state["loss"], k) for k in ROW_KEYS if k in state["loss"]]
    optimizer_state = state["optimizer"]["state"]
    for index in head_params:
        entry = optimizer_state.get(index, {})
        tables += [(entry, k) for k in MOMENT_KEYS if k in entry]
    return tables


def _shallow(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a training state whose loss and optimizer-state dicts can be changed without touching ``state``."""
    optimizer = {**state["optimizer"], "state": {i: dict(v) for i, v in state["optimizer"]["state"].items()}}
    return {**state, "loss": dict(state["loss"]), "optimizer": optimizer}


def local_state(state: dict[str, Any], rows: np.ndarray, head_params: Iterable[int]) -> dict[str, Any]:
    """A full (C-row) training state cut down to ``rows``: the loss tables and the head's AdamW moments.

    Args:
        state: :meth:`workers.training.step.TrainStep.state_dict` keys, tables with C rows.
        rows: int64[R] ascending labels this worker holds.
        head_params: :func:`head_param_indices` of the optimizer the state is for.

    Raises:
        ValueError: a table does not have the C rows of the checkpoint's classes.
    """
    out = _shallow(state)
    index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    tables = _row_tables(out, head_params)
    sizes = {container[key].shape[0] for container, key in tables}
    if len(sizes) > 1 or (sizes and int(index.max()) >= sizes.pop()):
        raise ValueError(f"checkpoint head tables do not fit this run's identities (rows {sorted(sizes)}, "
                         f"largest label {int(index.max())})")
    for container, key in tables:
        container[key] = container[key].index_select(0, index)
    return out


def full_state(state: dict[str, Any], rows: np.ndarray, num_classes: int, head_params: Iterable[int],
               reduce: Reduce | None, keep: bool = True) -> dict[str, Any] | None:
    """This worker's training state with every per-identity table widened to C rows, summed over the workers.

    Every worker must call it (``reduce`` is a collective), with the same loss and optimizer layout. Each table
    is scattered into zeros at ``rows`` and reduced onto rank 0, one table at a time (one C-row table in
    flight beside the finished ones); the row sets of the workers are disjoint and cover ``[0, C)``, so rank 0
    gets every identity's row exactly; the other ranks pass ``keep=False``, free each table once it is sent and get
    None.

    Args:
        state: :meth:`workers.training.step.TrainStep.state_dict` of this worker (R-row tables).
        rows: int64[R] ascending, the labels of those rows.
        num_classes: C.
        head_params: :func:`head_param_indices`.
        reduce: sums a tensor onto rank 0 in place; None with one worker (then ``rows`` must be all C).
        keep: whether this rank builds the result (rank 0).
    """
    rows = check_rows(rows, num_classes)
    if reduce is None and rows.size != num_classes:
        raise ValueError(f"one worker must hold all {num_classes} head rows, got {rows.size}")
    out = _shallow(state)
    index = torch.from_numpy(rows)
    for container, key in _row_tables(out, head_params):
        local = container[key]
        if rows.size == num_classes and reduce is None:
            continue
        full = local.new_zeros((num_classes, *local.shape[1:])).index_copy_(0, index, local)
        if reduce is not None:
            reduce(full)
        if keep:
            container[key] = full
        del full
    return out if keep else None


def gather_rows(loss: CombinedLoss, rows: np.ndarray, wanted: np.ndarray,
                all_reduce: Reduce | None) -> CombinedLoss:
    """A :class:`CombinedLoss` over the ``wanted`` identities, with their current rows from whichever worker holds
    them (one all-reduce of a small [len(wanted), ...] table per head tensor; every worker must call it).

    Used for the chief's fixed probe batch, whose identities need not all be the chief's after a resume on another
    number of workers.

    Args:
        loss: this worker's head over ``rows``.
        rows: int64[R] ascending labels of ``loss``'s rows.
        wanted: int64[P] ascending labels.
        all_reduce: sums in place over the workers; None with one worker (then every wanted label is held).
    """
    wanted = np.asarray(wanted, dtype=np.int64)
    if head_classes(loss) == 0:
        return loss
    held = np.isin(wanted, rows)
    if all_reduce is None and not held.all():
        raise ValueError(f"labels {wanted[~held][:5].tolist()} are not held and there is no other worker")
    local = torch.from_numpy(np.searchsorted(rows, wanted[held]))
    mine = torch.from_numpy(np.flatnonzero(held))
    part = CombinedLoss(wanted.size, _embedding_size(loss), loss.config)
    state = {}
    for key, value in loss.state_dict().items():
        if key in ROW_KEYS:
            table = value.new_zeros((wanted.size, *value.shape[1:])).index_copy_(0, mine, value.index_select(0, local))
            if all_reduce is not None:
                all_reduce(table)
            value = table
        state[key] = value
    part.load_state_dict(state)
    return part
