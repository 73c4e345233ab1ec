"""Greedy non-maximum suppression for many groups (images) at once, in torch, without a loop over boxes."""
from __future__ import annotations

import torch


def box_overlap(a: torch.Tensor, b: torch.Tensor, mode: str = "union") -> torch.Tensor:
    """Overlap of every box in a with every box in b, in the same group.

    Args:
        a: float[G, K, 4] x1 y1 x2 y2.
        b: float[G, M, 4] x1 y1 x2 y2.
        mode: "union" (intersection over union) or "min" (intersection over the smaller area).

    Returns:
        float[G, K, M].
    """
    # One [G, K, M] temporary per axis, reused in place (the pairwise tensors dominate the cost); each
    # coordinate of b as a contiguous row, so the inner loops run over unit stride.
    ca, cb = a.unbind(-1), [v.contiguous() for v in b.unbind(-1)]
    inter = torch.minimum(ca[2][:, :, None], cb[2][:, None, :]).sub_(
        torch.maximum(ca[0][:, :, None], cb[0][:, None, :])).clamp_min_(0)
    inter.mul_(torch.minimum(ca[3][:, :, None], cb[3][:, None, :]).sub_(
        torch.maximum(ca[1][:, :, None], cb[1][:, None, :])).clamp_min_(0))
    area_a = (a[..., 2:] - a[..., :2]).clamp_min(0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp_min(0).prod(-1)
    if mode == "union":
        denom = (area_a[:, :, None] + area_b[:, None, :]).sub_(inter)
    elif mode == "min":
        denom = torch.minimum(area_a[:, :, None], area_b[:, None, :])
    else:
        raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
    return inter.div_(denom.clamp_min_(1e-12))


def default_nms_elements(device: torch.device | str) -> int:
    """Pairwise entries (G * K * K) per chunk of groups when ``max_elements`` is 0: 64M on CUDA (bounds
    memory); 2M on CPU, where a chunk's [G, K, K] temporaries then stay in cache (2 cores, 8 mosaics
    with ~1000 P-Net boxes each: 98 ms in one chunk of 64M, 25 ms in chunks of 2M)."""
    return 1 << 26 if torch.device(device).type == "cuda" else 1 << 21


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float,
                mode: str = "union", max_per_group: int | None = None,
                max_elements: int = 0) -> torch.Tensor:
    """Greedy NMS inside each group, all groups at once.

    Boxes are ranked by score inside their group; a box is kept unless a kept box of its group with a higher
    score overlaps it by more than ``iou_threshold``. The greedy result is the unique fixed point of
    ``keep[j] = not any(keep[i] and over[i, j] for i < j)``; iterating that rule from "keep all" fixes one
    more rank per step, so it converges in at most K steps (a handful in practice), each a batched matmul.

    Args:
        boxes: float[N, 4] x1 y1 x2 y2.
        scores: float[N].
        groups: int64[N] group (e.g. image) of each box; boxes of different groups never suppress each other.
        iou_threshold: overlap above which the lower-scored box goes.
        mode: "union" or "min" (see :func:`box_overlap`).
        max_per_group: keep at most this many top-scored candidates per group before NMS (None: all).
        max_elements: bound on G * K * K per chunk of groups; 0 = by device (:func:`default_nms_elements`).

    Returns:
        int64[M] indices into the inputs of the kept boxes, ordered by group, then score (descending).
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(groups[order], stable=True)]
    _, g = torch.unique_consecutive(groups[order], return_inverse=True)
    counts = torch.bincount(g)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=boxes.device) - starts[g]
    if max_per_group is not None:
        sel = rank < max_per_group
        order, g, rank = order[sel], g[sel], rank[sel]
        counts = counts.clamp_max(max_per_group)
    num_groups = counts.shape[0]
    k = int(counts.max())
    kept = torch.zeros(order.shape[0], dtype=torch.bool, device=boxes.device)
    chunk = max(1, (max_elements or default_nms_elements(boxes.device)) // (k * k))
    for g0 in range(0, num_groups, chunk):  # chunks of groups, for memory only
        g1 = min(g0 + chunk, num_groups)
        in_chunk = (g >= g0) & (g < g1)
        idx = torch.nonzero(in_chunk).squeeze(1)
        padded = boxes.new_zeros((g1 - g0, k, 4))
        valid = torch.zeros((g1 - g0, k), dtype=torch.bool, device=boxes.device)
        padded[g[idx] - g0, rank[idx]] = boxes[order[idx]]
        valid[g[idx] - g0, rank[idx]] = True
        over = box_overlap(padded, padded, mode) > iou_threshold
        over &= torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(1)
        over &= valid[:, :, None] & valid[:, None, :]
        over_f = over.to(boxes.dtype)
        keep = valid.clone()
        for _ in range(k):
            suppressed = torch.bmm(keep.to(boxes.dtype)[:, None, :], over_f)[:, 0] > 0
            new_keep = valid & ~suppressed
            if torch.equal(new_keep, keep):
                break
            keep = new_keep
        kept[idx] = keep[g[idx] - g0, rank[idx]]
    return order[kept]
