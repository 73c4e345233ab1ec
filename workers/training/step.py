"""One fine-tuning step, in pure torch: no Ray, so that it is tested on its own.

A step takes a P x K batch of decoded crops (already augmented by the data threads), flips each image
left-right with probability 1/2, runs backbone + :class:`CombinedLoss` (classifier head and centers live in
one module, :class:`FaceTrainNet`, so that DDP syncs both), adds the distillation term when it is on, clips
gradients, steps AdamW under the warm-up + cosine schedule, then moves the loss centers (the head holds the
worker's own identities, whose centers only its batches move: :mod:`workers.training.head`). Mixed precision
(``torch.autocast``) is used on CUDA only.

Distillation (``distill_weight`` > 0): the frozen starting model ``f0`` embeds the un-augmented crop, flipped
like the augmented one, and the step adds ``distill_weight * mean(1 - cos(f(augmented), f0(clean)))``: the
model learns to put a degraded face where the starting model put its clean version, so the clean embedding
space (what the base model already does well) is kept while the degraded one is learned.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.training.config import PRECISIONS
from workers.training.losses import CombinedLoss
from workers.training.schedule import WarmupCosine, param_groups


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


def flip_mask(batch: int, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """bool[B] CPU: which images of the batch are flipped (one draw per image)."""
    return torch.rand(batch, generator=generator) < p


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Flip the images of float[B, C, H, W] where bool[B] ``flip`` is set."""
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image of float[B, C, H, W] left-right with probability ``p`` (one draw per image)."""
    return hflip(images, flip_mask(images.shape[0], generator, p))


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


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 - cos(student_i, teacher_i))`` of float[B, D] rows (0 when they point the same way)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=1)).mean()


def frozen_teacher(backbone: nn.Module) -> nn.Module:
    """A copy of ``backbone`` in eval mode with every parameter frozen (the distillation target)."""
    teacher = copy.deepcopy(backbone).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


def keep_bn_statistics(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode (running statistics fixed, affine still trains)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision on a device (None: plain float32).

    Raises:
        ValueError: an unknown precision, or float16 off CUDA.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float16" and device.type != "cuda":
        raise ValueError("precision float16 needs CUDA; use bfloat16 on CPU")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


class TrainStep:
    """The optimiser state of a run and one step of it.

    Args:
        net: backbone + loss head, already on ``device`` (and with frozen stages set).
        device: where the step runs.
        lr, head_lr_multiplier, weight_decay: AdamW groups (:func:`param_groups`).
        total_epochs, warmup_epochs, min_lr_ratio: the schedule (:class:`WarmupCosine`).
        grad_clip: max global gradient L2 norm (0: off).
        distill_weight: weight of :func:`distill_loss` against ``teacher`` (0: off, no teacher kept).
        teacher: the frozen starting model, on ``device`` (:func:`frozen_teacher`); needed when distilling.
        freeze_bn: keep the BatchNorm statistics fixed while training.
        model: what the forward pass goes through (``net`` itself, or a ``FaceTrainNet`` of a DDP-wrapped backbone
            and ``net.loss``).
        precision: autocast dtype of the forward pass, a key of :data:`PRECISIONS`: ``auto`` is bfloat16 (or
            float16 with a grad scaler) on CUDA and float32 on CPU; ``bfloat16`` also runs on CPUs (about 2x
            faster where they have AVX512-BF16 / AMX); weights and optimizer stay float32.
    """

    def __init__(self, net: FaceTrainNet, device: torch.device, *, lr: float, head_lr_multiplier: float = 10.0,
                 weight_decay: float = 5e-4, total_epochs: float = 1.0, warmup_epochs: float = 0.0,
                 min_lr_ratio: float = 0.01, grad_clip: float = 0.0, distill_weight: float = 0.0,
                 teacher: nn.Module | None = None, freeze_bn: bool = False, model: nn.Module | None = None,
                 precision: str = "auto") -> None:
        if distill_weight > 0 and teacher is None:
            raise ValueError("distill_weight > 0 needs the frozen starting model as teacher")
        self.net, self.model, self.device = net, model if model is not None else net, device
        self.grad_clip, self.distill_weight, self.freeze_bn = grad_clip, distill_weight, freeze_bn
        self.teacher = teacher if distill_weight > 0 else None
        self.optimizer = torch.optim.AdamW(param_groups(net, lr, head_lr_multiplier, weight_decay))
        self.scheduler = WarmupCosine(self.optimizer, total_epochs, warmup_epochs, min_lr_ratio)
        self.amp_dtype = autocast_dtype(precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self._base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]   # this run's, set above

    def train(self) -> None:
        """Training mode (BatchNorm statistics kept fixed with ``freeze_bn``)."""
        self.model.train()
        if self.freeze_bn:
            keep_bn_statistics(self.net)

    def __call__(self, crops: np.ndarray, labels: np.ndarray, progress: float, generator: torch.Generator,
                 clean: np.ndarray | None = None) -> dict[str, float]:
        """One optimisation step.

        Args:
            crops: uint8[B, H, W, 3] RGB training crops (augmented or not).
            labels: int64[B] in [0, C).
            progress: fractional epochs done at the end of this step (sets the learning rate).
            generator: the step's random source (flips, then the ``facenet`` triplet pick).
            clean: uint8[B, H, W, 3] the same crops before augmentation; needed when distilling.

        Returns:
            The loss parts of the batch (:class:`CombinedLoss`; ``distill`` when on; ``total``
            includes every weighted term) and ``lr_factor``, the schedule's multiplier of this step.
        """
        flip = flip_mask(len(crops), generator)
        images = hflip(to_images(crops, self.device), flip)
        target = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(self.device, non_blocking=True)
        lr_factor = self.scheduler.set_progress(progress)
        teacher_features = None
        if self.teacher is not None:
            if clean is None:
                raise ValueError("distillation needs the un-augmented crops (clean=)")
            with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                 enabled=self.amp_dtype is not None):
                teacher_features = self.teacher(hflip(to_images(clean, self.device), flip))
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            total, parts, features = self.model(images, target, generator)
        if teacher_features is not None:
            distill = distill_loss(features, teacher_features)
            total = total + self.distill_weight * distill
            parts = {**parts, "distill": float(distill.detach()), "total": float(total.detach())}
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.net.loss.update_centers(features.detach().float(), target)
        return {**parts, "lr_factor": lr_factor}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys this step owns: ``backbone``, ``loss``, ``optimizer``, ``scheduler``, ``scaler``."""
        return {"backbone": self.net.backbone.state_dict(), "loss": self.net.loss.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; this run's learning rates win over the checkpoint's.

        Raises:
            ValueError: the optimizer state does not fit (other frozen stages or loss parts).
        """
        self.net.backbone.load_state_dict(state["backbone"])
        self.net.loss.load_state_dict(state["loss"])
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise ValueError(f"checkpoint optimizer does not fit this run (was --freeze-stages or a loss weight "
                             f"changed?): {exc}") from exc
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["initial_lr"] = base
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
