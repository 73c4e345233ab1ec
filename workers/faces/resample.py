"""Batched image resampling for images of different sizes, padded into one tensor.

Two primitives, both exact per image whatever the padding around it:

* :func:`resize_area` shrinks every image of a padded batch by its own factor with area averaging (the
  weights of OpenCV's ``INTER_AREA``), as two batched matrix products.
* :func:`sample_patches` cuts N output patches (axis-aligned crops or similarity-warped faces) out of a
  padded batch in one ``grid_sample`` call, treating everything outside each patch's own image as black,
  like ``cv2.warpAffine`` with a constant border.

Coordinates are OpenCV's: the centre of pixel (row r, column c) is at (x=c, y=r).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_images(images: list, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack differently sized RGB images into one zero-padded batch.

    Args:
        images: B arrays (numpy or torch) uint8[H_i, W_i, 3].
        device: where the batch goes.

    Returns:
        batch: uint8[B, 3, H_max, W_max], image i in the top-left corner, zeros elsewhere.
        sizes: int64[B, 2], (H_i, W_i) per image.
    """
    if len(images) == 0:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8, device=device), torch.zeros(
            (0, 2), dtype=torch.int64, device=device)
    shapes = [tuple(im.shape) for im in images]
    for i, shape in enumerate(shapes):
        if len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"image {i} must be uint8[H, W, 3], got shape {shape}")
    h_max = max(s[0] for s in shapes)
    w_max = max(s[1] for s in shapes)
    if all(s[0] == h_max and s[1] == w_max for s in shapes):
        host = torch.stack([torch.as_tensor(im) for im in images])
    else:
        host = torch.zeros((len(images), h_max, w_max, 3), dtype=torch.uint8)
        for i, im in enumerate(images):  # one memcpy per image: packing, not per-pixel work
            host[i, : shapes[i][0], : shapes[i][1]] = torch.as_tensor(im)
    sizes = torch.tensor([s[:2] for s in shapes], dtype=torch.int64)
    pin = host.device.type == "cpu" and torch.device(device).type == "cuda"
    host = host.pin_memory() if pin else host
    return host.to(device, non_blocking=pin).permute(0, 3, 1, 2), sizes.to(device)


def area_weights(in_len: torch.Tensor, out_len: torch.Tensor, in_max: int, out_max: int) -> torch.Tensor:
    """Area-interpolation weights of a 1-D resize, one matrix per image.

    Output sample j of image b averages input samples over [j * f, (j + 1) * f) with f = in_len / out_len,
    each weighted by its overlap (OpenCV INTER_AREA). Rows >= out_len and columns >= in_len are zero.

    Args:
        in_len: int64[B] valid input lengths.
        out_len: int64[B] output lengths (>= 1).
        in_max: padded input length.
        out_max: padded output length.

    Returns:
        float32[B, out_max, in_max] weights; each valid row sums to 1.
    """
    dev = in_len.device
    f = (in_len.double() / out_len.double())[:, None, None]
    j = torch.arange(out_max, device=dev, dtype=torch.float64)[None, :, None]
    i = torch.arange(in_max, device=dev, dtype=torch.float64)[None, None, :]
    lo, hi = j * f, (j + 1) * f
    overlap = (torch.minimum(hi, i + 1) - torch.maximum(lo, i)).clamp_min(0) / f
    valid = (j < out_len[:, None, None]) & (i < in_len[:, None, None])
    return torch.where(valid, overlap, 0).float()


def resize_area(batch: torch.Tensor, sizes: torch.Tensor, out_sizes: torch.Tensor) -> torch.Tensor:
    """Shrink each image of a padded batch to its own output size with area averaging.

    Args:
        batch: float[B, C, H_max, W_max], image b valid in [:sizes[b,0], :sizes[b,1]].
        sizes: int64[B, 2] valid (H, W).
        out_sizes: int64[B, 2] wanted (H, W), each >= 1.

    Returns:
        float[B, C, max H_out, max W_out], zero outside each image's output size.
    """
    out_h, out_w = int(out_sizes[:, 0].max()), int(out_sizes[:, 1].max())
    a_h = area_weights(sizes[:, 0], out_sizes[:, 0], batch.shape[2], out_h).to(batch.dtype)
    a_w = area_weights(sizes[:, 1], out_sizes[:, 1], batch.shape[3], out_w).to(batch.dtype)
    rows = torch.matmul(a_h[:, None], batch)                  # [B, C, H_out, W_max]
    return torch.matmul(rows, a_w[:, None].transpose(-1, -2))  # [B, C, H_out, W_out]


def box_to_affine(boxes: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Affine maps that cut axis-aligned boxes into out_hw patches.

    Args:
        boxes: float[N, 4], x1 y1 x2 y2 pixel edges (pixel c spans [c - 0.5, c + 0.5] in OpenCV coords,
            so an edge coordinate e is e - 0.5 in centre coordinates).
        out_hw: (height, width) of the patches.

    Returns:
        float[N, 2, 3] maps from output pixel centres (u, v) to source pixel centres (x, y).
    """
    oh, ow = out_hw
    sx = (boxes[:, 2] - boxes[:, 0]) / ow
    sy = (boxes[:, 3] - boxes[:, 1]) / oh
    zero = torch.zeros_like(sx)
    tx = boxes[:, 0] + 0.5 * sx - 0.5
    ty = boxes[:, 1] + 0.5 * sy - 0.5
    return torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)


def sample_patches(batch: torch.Tensor, sizes: torch.Tensor, image_index: torch.Tensor,
                   affine: torch.Tensor, out_hw: tuple[int, int], supersample: int = 1) -> torch.Tensor:
    """Bilinear patches from a padded batch, black outside each patch's source image.

    Args:
        batch: float[B, C, H_max, W_max] padded images.
        sizes: int64[B, 2] valid (H, W) per image.
        image_index: int64[N], source image of each patch.
        affine: float[N, 2, 3], output pixel centre (u, v, 1) -> source pixel centre (x, y).
        out_hw: (height, width) of the patches.
        supersample: s >= 1; each output pixel averages s x s bilinear samples (antialiasing when
            shrinking, close to area interpolation for s near the shrink factor).

    Returns:
        float[N, C, height, width] patches.
    """
    n = image_index.shape[0]
    b, c, h_max, w_max = batch.shape
    oh, ow = out_hw
    if n == 0:
        return batch.new_zeros((0, c, oh, ow))
    s = int(supersample)
    dev, dt = batch.device, affine.dtype
    # Sub-sample positions in output pixel-centre coordinates.
    u = (torch.arange(ow * s, device=dev, dtype=dt) + 0.5) / s - 0.5
    v = (torch.arange(oh * s, device=dev, dtype=dt) + 0.5) / s - 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")                      # [oh*s, ow*s]
    ones = torch.ones_like(uu)
    grid = torch.stack([uu, vv, ones], -1)                             # [oh*s, ow*s, 3]
    xy = torch.einsum("nij,hwj->nhwi", affine, grid)                   # [N, oh*s, ow*s, 2]
    hw = sizes[image_index].to(dt)                                      # [N, 2] (H, W)
    x, y = xy[..., 0], xy[..., 1]
    inside = ((x > -1) & (x < hw[:, 1, None, None]) & (y > -1) & (y < hw[:, 0, None, None])).to(batch.dtype)
    # One tall canvas: every image in its own slot with a black border of one pixel all round, so
    # bilinear taps near an edge meet black (as cv2's constant border), never a neighbour image.
    slot_h, slot_w = h_max + 2, w_max + 2
    canvas = F.pad(batch, (1, 1, 1, 1)).transpose(0, 1).reshape(1, c, b * slot_h, slot_w)
    xc = x + 1
    yc = y + 1 + image_index.to(dt)[:, None, None] * slot_h
    gx = (2 * xc + 1) / slot_w - 1
    gy = (2 * yc + 1) / (b * slot_h) - 1
    g = torch.stack([gx, gy], -1).reshape(1, n * oh * s, ow * s, 2).to(batch.dtype)
    out = F.grid_sample(canvas, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.reshape(c, n, oh * s, ow * s).transpose(0, 1) * inside[:, None]
    return F.avg_pool2d(out, s) if s > 1 else out
