"""Online triplet mining and the triplet loss on L2-normalised embeddings.

All distances are **squared** Euclidean distances, as in the FaceNet paper
(``d²(a, p) + α < d²(a, n)``). Mining works on whatever device the inputs are on, never
needs gradients (it reads ``emb.detach()``) and has no Python loop over anchors.

Pure torch; no Ray.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MINING_MODES = ("facenet", "semi_hard", "batch_hard")

# Largest [pairs, B] mask built at once; anchor-positive pairs are processed in chunks
# of at most this many elements (2**24 booleans + as many float32 distances ~ 80 MB).
_MAX_MASK_ELEMENTS = 1 << 24


def pairwise_sq_distances(emb: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between all rows.

    Args:
        emb: float[B, D].

    Returns:
        float[B, B], ``out[i, j] = ||emb[i] - emb[j]||²``, clamped at 0, exactly 0 on the
        diagonal. Same dtype and device as ``emb``.

    Raises:
        ValueError: ``emb`` is not 2-D.
    """
    if emb.ndim != 2:
        raise ValueError(f"emb must be [B, D], got shape {tuple(emb.shape)}")
    sq_norms = emb.pow(2).sum(dim=1)
    dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (emb @ emb.T)
    eye = torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
    return dist.clamp_min(0.0).masked_fill(eye, 0.0)


def semi_hard_triplets(
    emb: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    mode: str = "facenet",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select triplets (anchor, positive, negative) inside one batch.

    With ``d`` the squared distances of :func:`pairwise_sq_distances` and ``α = margin``:

    * ``"facenet"`` (FaceNet ``select_triplets``): for every same-label pair ``a < p``, the
      candidates are the negatives ``n`` (other label) with ``d(a,n) - d(a,p) < α`` (this
      includes hard negatives closer than the positive); one candidate is picked uniformly
      at random per pair, and pairs without a candidate give no triplet.
    * ``"semi_hard"``: every ``(a, p, n)`` with ``a < p`` same label, ``n`` other label and
      ``0 < d(a,n) - d(a,p) < α``.
    * ``"batch_hard"``: for every anchor with at least one positive and one negative, the
      farthest positive and the closest negative (first index on ties).

    Triplets come out sorted by anchor, then positive (then negative for ``"semi_hard"``).
    Memory: the pair modes build ``[pairs, B]`` masks in chunks of at most 2**24 elements,
    where ``pairs <= B * (K - 1) / 2`` for K images per identity; ``"batch_hard"`` uses
    ``[B, B]``.

    Args:
        emb: float[B, D], L2-normalised embeddings (any float dtype; mined in float32).
        labels: int[B], identity of every row.
        margin: α >= 0, in squared-distance units.
        mode: one of ``MINING_MODES``.
        generator: random source for ``"facenet"``'s pick; its device may differ from
            ``emb``'s. ``None`` uses the global generator of ``emb``'s device.

    Returns:
        (anchors, positives, negatives), each int64[T] row indices on ``emb.device``.

    Raises:
        ValueError: bad shapes, negative margin or unknown mode.
    """
    if emb.ndim != 2:
        raise ValueError(f"emb must be [B, D], got shape {tuple(emb.shape)}")
    if labels.shape != (emb.shape[0],):
        raise ValueError(f"labels must be [{emb.shape[0]}] to match emb, got shape "
                         f"{tuple(labels.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if mode not in MINING_MODES:
        raise ValueError(f"mode must be one of {MINING_MODES}, got {mode!r}")

    with torch.no_grad():
        labels = labels.to(emb.device)
        dist = pairwise_sq_distances(emb.detach().float())
        if mode == "batch_hard":
            return _batch_hard(dist, labels)
        return _pair_based(dist, labels, float(margin), mode == "semi_hard", generator)


def triplet_loss(
    emb: torch.Tensor,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    margin: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """FaceNet triplet loss ``mean(max(d(a,p) - d(a,n) + α, 0))`` on squared distances.

    Args:
        emb: float[B, D] embeddings with grad.
        anchors, positives, negatives: int64[T] row indices into ``emb``.
        margin: α.

    Returns:
        loss: scalar in float32 (float64 for float64 ``emb``). With ``T == 0`` it is ``0 * emb.sum()``: zero, but still
            attached to ``emb``'s graph so every data-parallel worker runs backward.
        stats: ``{"num_triplets": T (int), "fraction_active": share of triplets with
            non-zero loss (float, 0.0 when T == 0)}``.

    Raises:
        ValueError: the index tensors are not 1-D of one length.
    """
    if not (anchors.ndim == positives.ndim == negatives.ndim == 1
            and anchors.shape == positives.shape == negatives.shape):
        raise ValueError(
            f"anchors, positives, negatives must be 1-D of one length, got shapes "
            f"{tuple(anchors.shape)}, {tuple(positives.shape)}, {tuple(negatives.shape)}")
    num_triplets = int(anchors.numel())
    if num_triplets == 0:
        return _at_least_float32(emb).sum() * 0.0, {"num_triplets": 0, "fraction_active": 0.0}
    e = _at_least_float32(emb)
    d_ap = (e[anchors] - e[positives]).pow(2).sum(dim=1)
    d_an = (e[anchors] - e[negatives]).pow(2).sum(dim=1)
    per_triplet = F.relu(d_ap - d_an + margin)
    fraction_active = float((per_triplet.detach() > 0).float().mean())
    return per_triplet.mean(), {"num_triplets": num_triplets, "fraction_active": fraction_active}


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _positive_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All same-label pairs with a < p, sorted by a then p: two int64[M]."""
    same = labels[:, None] == labels[None, :]
    upper = torch.ones_like(same).triu(diagonal=1)
    a, p = torch.nonzero(same & upper, as_tuple=True)
    return a, p


def _pair_based(dist: torch.Tensor, labels: torch.Tensor, margin: float, strict: bool,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "facenet" (strict=False, one random pick) and "semi_hard" (strict=True, all) rules."""
    batch = dist.shape[0]
    anchors, positives = _positive_pairs(labels)
    chunk = max(1, _MAX_MASK_ELEMENTS // max(batch, 1))
    out_a, out_p, out_n = [], [], []
    for start in range(0, anchors.numel(), chunk):
        a = anchors[start:start + chunk]
        p = positives[start:start + chunk]
        d_an = dist[a]                              # [m, B]
        gap = d_an - dist[a, p][:, None]            # d(a,n) - d(a,p)
        candidates = (labels[None, :] != labels[a][:, None]) & (gap < margin)
        if strict:
            candidates &= gap > 0
            rows, n = torch.nonzero(candidates, as_tuple=True)
            out_a.append(a[rows])
            out_p.append(p[rows])
            out_n.append(n)
        else:
            a, p, n = _random_candidate(candidates, a, p, generator)
            out_a.append(a)
            out_p.append(p)
            out_n.append(n)
    if not out_a:
        empty = torch.empty(0, dtype=torch.int64, device=dist.device)
        return empty, empty.clone(), empty.clone()
    return torch.cat(out_a), torch.cat(out_p), torch.cat(out_n)


def _random_candidate(candidates: torch.Tensor, a: torch.Tensor, p: torch.Tensor,
                      generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One uniformly random True column per row of bool[m, B]; rows without any are dropped."""
    count = candidates.sum(dim=1)                   # int64[m]
    rand_device = generator.device if generator is not None else candidates.device
    u = torch.rand(count.shape[0], dtype=torch.float64, generator=generator,
                   device=rand_device).to(candidates.device)
    pick = torch.minimum((u * count).long(), count - 1)          # k-th candidate, 0-based
    n = (candidates.cumsum(dim=1) <= pick[:, None]).sum(dim=1)   # column of the k-th True
    keep = count > 0
    return a[keep], p[keep], n[keep]


def _batch_hard(dist: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hardest positive and hardest negative per anchor."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(dist.shape[0], dtype=torch.bool, device=dist.device)
    positive = same & ~eye
    negative = ~same
    hardest_p = dist.masked_fill(~positive, float("-inf")).argmax(dim=1)
    hardest_n = dist.masked_fill(~negative, float("inf")).argmin(dim=1)
    anchors = torch.nonzero(positive.any(dim=1) & negative.any(dim=1), as_tuple=True)[0]
    return anchors, hardest_p[anchors], hardest_n[anchors]
