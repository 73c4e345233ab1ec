"""Softmax + center loss (Wen et al. 2016) + triplet loss, combined with weights.

Pure torch; no Ray. The data-parallel hook is a plain ``all_reduce`` callable
(e.g. ``torch.distributed.all_reduce``) handed to :meth:`CenterLoss.update_centers`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.training.mining import MINING_MODES, semi_hard_triplets, triplet_loss


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which losses to train with and how.

    Attributes:
        margin: triplet margin α, in squared-distance units of L2-normalised embeddings.
        mining: triplet selection rule, one of ``workers.training.mining.MINING_MODES``.
        triplet_weight: weight of the triplet loss; 0 skips mining and the loss.
        softmax_weight: weight of the cross-entropy over training identities; 0 drops the
            classifier head.
        center_weight: λ of the center loss; 0 drops the centers.
        center_alpha: how much of the old center survives one update (FaceNet's
            ``center_loss_alfa``): ``c ← α·c + (1 − α)·mean(f)`` per class seen in the batch,
            so 0.95 moves a center 5 % of the way to its batch mean each step.
    """

    margin: float = 0.2
    mining: str = "facenet"
    triplet_weight: float = 1.0
    softmax_weight: float = 1.0
    center_weight: float = 0.01
    center_alpha: float = 0.95

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.mining not in MINING_MODES:
            raise ValueError(f"mining must be one of {MINING_MODES}, got {self.mining!r}")
        for name in ("triplet_weight", "softmax_weight", "center_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.triplet_weight == self.softmax_weight == self.center_weight == 0:
            raise ValueError("at least one of triplet_weight, softmax_weight, center_weight "
                             "must be > 0, got all 0")
        if not 0.0 <= self.center_alpha <= 1.0:
            raise ValueError(f"center_alpha must be in [0, 1], got {self.center_alpha}")


class CenterLoss(nn.Module):
    """Center loss ``mean_i ½‖f_i − c_{y_i}‖²`` with moving-average class centers.

    The centers are a buffer (not a parameter): the loss sends gradient to the features only,
    and :meth:`update_centers` moves the centers, per class ``j`` seen in the batch::

        Δ_j = mean_{i: y_i = j} (c_j − f_i)
        c_j ← c_j − (1 − α) Δ_j          (= α c_j + (1 − α) mean f)

    Wen et al. write the same step with rate ``1 − α`` and ``1 + n_j`` in the denominator;
    this follows FaceNet's ``alfa`` naming with a plain per-class mean.

    Args:
        num_classes: C.
        embedding_size: D.
        alpha: center_alpha in [0, 1], the share of the old center kept per update.
    """

    centers: torch.Tensor

    def __init__(self, num_classes: int, embedding_size: int, alpha: float = 0.95) -> None:
        super().__init__()
        if num_classes < 1 or embedding_size < 1:
            raise ValueError(f"num_classes and embedding_size must be >= 1, got "
                             f"{num_classes} and {embedding_size}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self.register_buffer("centers", torch.zeros(num_classes, embedding_size))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Center loss of one batch.

        Args:
            features: float[B, D], B >= 1.
            labels: int64[B] in [0, C).

        Returns:
            Scalar ``mean_i ½‖f_i − c_{y_i}‖²``, in the centers' dtype or wider.
        """
        self._check(features, labels)
        diff = features - self.centers[labels]
        return 0.5 * diff.pow(2).sum(dim=1).mean()

    @torch.no_grad()
    def update_centers(self, features: torch.Tensor, labels: torch.Tensor,
                       all_reduce: Callable[[torch.Tensor], Any] | None = None) -> None:
        """Move the centers of the classes in the batch (no gradient).

        Args:
            features: float[B, D] (detached here).
            labels: int64[B] in [0, C).
            all_reduce: called once with a float[C, D + 1] tensor holding, per class, the
                summed ``c_j − f_i`` (columns :D) and the sample count (column D); it must sum
                that tensor across workers in place, like ``torch.distributed.all_reduce``
                (if it returns a tensor instead, that is used). Every worker then applies the
                identical update, equal to one update on the concatenation of all batches.
                Cost: a dense C x (D + 1) all-reduce per call.
        """
        self._check(features, labels)
        num_classes, dim = self.centers.shape
        rows = torch.cat([self.centers[labels] - features.detach().to(self.centers.dtype),
                          self.centers.new_ones(labels.shape[0], 1)], dim=1)
        sums = self.centers.new_zeros(num_classes, dim + 1).index_add_(0, labels, rows)
        if all_reduce is not None:
            reduced = all_reduce(sums)
            if isinstance(reduced, torch.Tensor):
                sums = reduced
        counts = sums[:, dim:].clamp_min(1.0)   # classes not seen anywhere have a zero sum
        self.centers.sub_((1.0 - self.alpha) * sums[:, :dim] / counts)

    def _check(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        num_classes, dim = self.centers.shape
        if features.ndim != 2 or features.shape[1] != dim or features.shape[0] < 1:
            raise ValueError(f"features must be [B >= 1, {dim}], got shape {tuple(features.shape)}")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"labels must be [{features.shape[0]}] to match features, got "
                             f"shape {tuple(labels.shape)}")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got range [{low}, {high}]")


class CombinedLoss(nn.Module):
    """``softmax_weight·CE + center_weight·center + triplet_weight·triplet`` on one batch.

    Parts with weight 0 are not built and not computed. Follows FaceNet's ``train_softmax``
    layout: the classifier and the center loss see the raw features ("prelogits"), the
    triplet loss sees their L2-normalised version.

    Args:
        num_classes: C training identities (labels in [0, C)); unused when only the triplet
            loss is on.
        embedding_size: D.
        config: weights, margin, mining rule, center_alpha; default ``LossConfig()``.
    """

    def __init__(self, num_classes: int, embedding_size: int,
                 config: LossConfig | None = None) -> None:
        super().__init__()
        self.config = config if config is not None else LossConfig()
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        needs_classes = self.config.softmax_weight > 0 or self.config.center_weight > 0
        if needs_classes and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 with softmax or center loss on, got "
                             f"{num_classes}")
        self.classifier = (nn.Linear(embedding_size, num_classes)
                           if self.config.softmax_weight > 0 else None)
        self.center_loss = (CenterLoss(num_classes, embedding_size, self.config.center_alpha)
                            if self.config.center_weight > 0 else None)

    def forward(self, features: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts.

        Args:
            features: float[B, D], model outputs before L2 normalisation.
            labels: int64[B], identity index in [0, C).
            generator: random source for ``mining="facenet"``.

        Returns:
            total: scalar with grad.
            parts: python numbers, only for the parts that are on: ``softmax`` (cross
                entropy), ``accuracy`` (top-1 of the classifier), ``center``, ``triplet``,
                ``num_triplets``, ``fraction_active``, and always ``total``. Unweighted.
        """
        if features.ndim != 2 or labels.shape != (features.shape[0],):
            raise ValueError(f"features must be [B, D] and labels [B], got shapes "
                             f"{tuple(features.shape)} and {tuple(labels.shape)}")
        cfg = self.config
        terms: list[tuple[float, torch.Tensor]] = []
        logged: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = {}
        if self.classifier is not None:
            logits = self.classifier(features)
            softmax = F.cross_entropy(logits.float(), labels)
            terms.append((cfg.softmax_weight, softmax))
            logged["softmax"] = softmax
            logged["accuracy"] = (logits.argmax(dim=1) == labels).float().mean()
        if self.center_loss is not None:
            center = self.center_loss(features, labels)
            terms.append((cfg.center_weight, center))
            logged["center"] = center
        if cfg.triplet_weight > 0:
            emb = F.normalize(features, dim=1)
            a, p, n = semi_hard_triplets(emb, labels, cfg.margin, cfg.mining, generator)
            triplet, stats = triplet_loss(emb, a, p, n, cfg.margin)
            terms.append((cfg.triplet_weight, triplet))
            logged["triplet"] = triplet
            counts.update(stats)
        total = sum(weight * term.float() for weight, term in terms)
        logged["total"] = total
        values = torch.stack([v.detach().float() for v in logged.values()]).tolist()
        return total, {**dict(zip(logged, values)), **counts}

    def update_centers(self, features: torch.Tensor, labels: torch.Tensor,
                       all_reduce: Callable[[torch.Tensor], Any] | None = None) -> None:
        """:meth:`CenterLoss.update_centers` when the center loss is on; otherwise nothing."""
        if self.center_loss is not None:
            self.center_loss.update_centers(features, labels, all_reduce)
