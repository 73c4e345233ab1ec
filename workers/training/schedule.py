"""The optimiser of a fine-tuning run: AdamW parameter groups and the warm-up + cosine learning rate.

Pure torch; the schedule is a function of fractional epochs, not of steps, so it continues unchanged when a
run resumes on another number of workers (and so another number of steps per epoch).
"""
from __future__ import annotations

import math

import torch
from torch import nn


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


def param_groups(net: nn.Module, lr: float, head_lr_multiplier: float, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: backbone weights (decayed), backbone BN / PReLU /
    biases (not decayed), classifier head (``lr * head_lr_multiplier``, decayed weight). Empty groups
    are left out.

    Args:
        net: a module with ``backbone`` and ``loss`` children (:class:`workers.training.step.FaceTrainNet`).
    """
    decay, no_decay = [], []
    for param in net.backbone.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    head = [p for p in net.loss.parameters() if p.requires_grad]
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0},
              {"params": head, "lr": lr * head_lr_multiplier, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]
