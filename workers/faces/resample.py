"""Batched image resampling for images of different sizes, padded into one tensor.

Two primitives, both exact per image whatever the padding around it:

* :func:`resize_area` shrinks every image of a padded batch by its own factor with area averaging (the
  weights of OpenCV's ``INTER_AREA``), as two batched banded matrix products (rows, then columns).
* :func:`sample_patches` cuts N output patches (axis-aligned crops or similarity-warped faces) out of a
  padded batch in one ``grid_sample`` call, treating everything outside each patch's own image as black,
  like ``cv2.warpAffine`` with a constant border.

Coordinates are OpenCV's: the centre of pixel (row r, column c) is at (x=c, y=r).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RESIZE_TILE = 8  # output rows per band tile in resize_area (measured best of 4-64 on CPU, docs/performance.md)


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


def _band_weights(in_len: torch.Tensor, out_len: torch.Tensor, start: torch.Tensor, tile: int,
                  span: int) -> torch.Tensor:
    """The non-zero band of :func:`area_weights`, cut into tiles of output samples.

    Args:
        in_len: int64[B] valid input lengths.
        out_len: int64[B] output lengths (>= 1).
        start: int64[B, T] first input sample of each tile's window.
        tile: output samples per tile.
        span: input samples per window.

    Returns:
        float64[B, T, tile, span]: weight of input start[b, t] + l for output t * tile + r, i.e.
        ``area_weights(...)[b, t * tile + r, start[b, t] + l]``.
    """
    dev = in_len.device
    f = (in_len.double() / out_len.double())[:, None, None, None]
    n_tiles = start.shape[1]
    j = (torch.arange(n_tiles, device=dev, dtype=torch.float64)[:, None] * tile
         + torch.arange(tile, device=dev, dtype=torch.float64)[None, :])[None, :, :, None]
    i = (start[:, :, None, None] + torch.arange(span, device=dev)[None, None, None, :]).double()
    lo, hi = j * f, (j + 1) * f
    overlap = (torch.minimum(hi, i + 1) - torch.maximum(lo, i)).clamp_min(0) / f
    valid = (j < out_len[:, None, None, None]) & (i < in_len[:, None, None, None])
    return torch.where(valid, overlap, 0)


def _resize_rows(x: torch.Tensor, in_len: torch.Tensor, out_len: torch.Tensor, out_max: int,
                 tile: int) -> torch.Tensor:
    """Area-resize the rows (dim -2) of a padded batch, image b from in_len[b] to out_len[b] rows.

    Output rows are taken ``tile`` at a time; a tile only reads the window of input rows its area
    weights touch (``ceil(tile * f) + 2`` rows, f = in/out), so the cost grows like out x window
    instead of out x in. The weights are exactly :func:`area_weights`' non-zero entries.

    Args:
        x: float[B, C, H, W].
        in_len: int64[B] valid rows per image.
        out_len: int64[B] wanted rows per image (>= 1).
        out_max: rows of the result.
        tile: output rows per tile.

    Returns:
        float[B, C, out_max, W], zero below each image's out_len.
    """
    bsz, c, h, w = x.shape
    dev = x.device
    f_max = float((in_len.double() / out_len.double()).max())
    span = int(math.ceil(tile * f_max)) + 2
    if span >= h or out_max <= tile:  # no band to exploit: one dense product
        a = area_weights(in_len, out_len, h, out_max).to(x.dtype)
        return torch.matmul(a[:, None], x)
    n_tiles = -(-out_max // tile)
    t0 = torch.arange(n_tiles, device=dev, dtype=torch.float64) * tile
    f = in_len.double() / out_len.double()
    # First input row of each window; windows near the bottom slide up so that they stay inside x
    # (rows they then cover beyond the tile's own band have zero weight).
    start = torch.floor(t0[None, :] * f[:, None]).long().clamp(max=h - span)         # [B, T]
    wts = _band_weights(in_len, out_len, start, tile, span).to(x.dtype)            # [B, T, tile, span]
    rows = start[:, :, None] + torch.arange(span, device=dev)                       # [B, T, span]
    base = (torch.arange(bsz, device=dev)[:, None] * c + torch.arange(c, device=dev)[None, :]) * h
    index = base[:, :, None, None] + rows[:, None]                                  # [B, C, T, span]
    window = x.reshape(bsz * c * h, w).index_select(0, index.reshape(-1))
    out = torch.matmul(wts[:, None], window.reshape(bsz, c, n_tiles, span, w))      # [B, C, T, tile, W]
    return out.reshape(bsz, c, n_tiles * tile, w)[:, :, :out_max]


def resize_area(batch: torch.Tensor, sizes: torch.Tensor, out_sizes: torch.Tensor,
                tile: int = RESIZE_TILE) -> torch.Tensor:
    """Shrink each image of a padded batch to its own output size with area averaging.

    Separable: rows, then columns, each a banded matrix product (:func:`_resize_rows`); the result is
    the dense ``area_weights`` product up to float rounding.

    Args:
        batch: float[B, C, H_max, W_max], image b valid in [:sizes[b,0], :sizes[b,1]].
        sizes: int64[B, 2] valid (H, W).
        out_sizes: int64[B, 2] wanted (H, W), each >= 1.
        tile: output rows/columns per band tile; 0 for the dense product.

    Returns:
        float[B, C, max H_out, max W_out], zero outside each image's output size.
    """
    out_h, out_w = int(out_sizes[:, 0].max()), int(out_sizes[:, 1].max())
    if tile <= 0:
        a_h = area_weights(sizes[:, 0], out_sizes[:, 0], batch.shape[2], out_h).to(batch.dtype)
        a_w = area_weights(sizes[:, 1], out_sizes[:, 1], batch.shape[3], out_w).to(batch.dtype)
        rows = torch.matmul(a_h[:, None], batch)                  # [B, C, H_out, W_max]
        return torch.matmul(rows, a_w[:, None].transpose(-1, -2))  # [B, C, H_out, W_out]
    rows = _resize_rows(batch, sizes[:, 0], out_sizes[:, 0], out_h, tile)          # [B, C, H_out, W_max]
    cols = _resize_rows(rows.transpose(-1, -2), sizes[:, 1], out_sizes[:, 1], out_w, tile)
    return cols.transpose(-1, -2)                                                   # [B, C, H_out, W_out]


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


def patch_canvas(batch: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """The padded batch as one tall image for :func:`sample_patches`: every image in its own slot, black
    outside its valid area and with a black border of one pixel all round, so bilinear taps beyond an
    image meet black (as cv2's constant border), never a neighbour image or stale padding. Build it
    once when cutting patches in several calls.

    The canvas is stored channels-last (pixel-major): a bilinear tap then reads all channels of a pixel
    from one cache line, where planar storage touches C lines far apart (2 cores, 64 R-Net crops from
    32 LFW images with the canvas out of cache: ``grid_sample`` 1.9 -> 1.1 ms).

    Args:
        batch: float[B, C, H_max, W_max].
        sizes: int64[B, 2] valid (H, W) per image.

    Returns:
        float[1, C, B * (H_max + 2), W_max + 2], channels-last strides.
    """
    b, c, h_max, w_max = batch.shape
    dev = batch.device
    valid = ((torch.arange(h_max, device=dev)[None, :, None] < sizes[:, 0, None, None])
             & (torch.arange(w_max, device=dev)[None, None, :] < sizes[:, 1, None, None]))   # [B, H, W]
    pixels = batch.permute(0, 2, 3, 1) * valid[..., None].to(batch.dtype)
    pixels = F.pad(pixels, (0, 0, 1, 1, 1, 1))                                          # [B, H+2, W+2, C]
    return pixels.reshape(1, b * (h_max + 2), w_max + 2, c).permute(0, 3, 1, 2)


def sample_patches(batch: torch.Tensor, sizes: torch.Tensor, image_index: torch.Tensor,
                   affine: torch.Tensor, out_hw: tuple[int, int], supersample: int = 1,
                   canvas: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear patches from a padded batch, black outside each patch's source image.

    Args:
        batch: float[B, C, H_max, W_max] padded images.
        sizes: int64[B, 2] valid (H, W) per image.
        image_index: int64[N], source image of each patch.
        affine: float[N, 2, 3], output pixel centre (u, v, 1) -> source pixel centre (x, y).
        out_hw: (height, width) of the patches.
        supersample: s >= 1; each output pixel averages s x s bilinear samples (antialiasing when
            shrinking, close to area interpolation for s near the shrink factor).
        canvas: ``patch_canvas(batch, sizes)``, when the caller already built it.

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
    slot_h, slot_w = h_max + 2, w_max + 2
    canvas = patch_canvas(batch, sizes) if canvas is None else canvas
    # Source pixel centre (x, y) of image i sits at canvas pixel (x + 1, y + 1 + i * slot_h), which
    # grid_sample addresses as g = (2 * p + 1) / size - 1: fold that into each patch's affine map.
    scale = torch.tensor([2.0 / slot_w, 2.0 / (b * slot_h)], device=dev, dtype=torch.float64)
    offset = torch.stack([torch.full_like(image_index, 3, dtype=torch.float64) / slot_w - 1,
                          (2 * (image_index.double() * slot_h + 1) + 1) / (b * slot_h) - 1], 1)   # [N, 2]
    to_grid = affine.double() * scale[None, :, None]
    to_grid[:, :, 2] += offset
    # Sub-sample positions in output pixel-centre coordinates.
    u = (torch.arange(ow * s, device=dev, dtype=dt) + 0.5) / s - 0.5
    v = (torch.arange(oh * s, device=dev, dtype=dt) + 0.5) / s - 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")                      # [oh*s, ow*s]
    grid = torch.stack([uu, vv, torch.ones_like(uu)], -1)              # [oh*s, ow*s, 3]
    g = torch.einsum("nij,hwj->nhwi", to_grid.to(dt), grid).to(batch.dtype)   # [N, oh*s, ow*s, 2]
    # Outside its own image a sample is black, like cv2's constant border. Along x nothing else lies
    # there (blacked padding, the slot's border, then off the canvas); along y the neighbouring slots
    # do, so y is clamped to [-1.5, H_max + 0.5]: every tap beyond the image then falls on padding or
    # on a border row, black, while samples inside the image keep their position.
    lo = (offset - 1.5 * scale).to(g.dtype)                                   # g of pixel -1.5
    hi = (offset + scale * torch.tensor([w_max + 0.5, h_max + 0.5], device=dev, dtype=torch.float64)).to(g.dtype)
    g = torch.clamp(g, lo[:, None, None], hi[:, None, None])
    # grid_sample's CPU kernel runs one thread per batch entry: hand it the canvas once per thread
    # (a stride-0 view, no copy) and each thread a slice of the patches.
    parts = sampler_parts(n, dev)
    per_part = -(-n // parts)
    g = F.pad(g, (0, 0, 0, 0, 0, 0, 0, per_part * parts - n))
    g = g.reshape(parts, per_part * oh * s, ow * s, 2)
    out = F.grid_sample(canvas.expand(parts, -1, -1, -1), g, mode="bilinear", padding_mode="zeros",
                        align_corners=False)                                  # [P, C, per*oh*s, ow*s]
    if s > 1:  # patches are stacked along y in whole multiples of s rows: pooling never mixes two
        out = F.avg_pool2d(out, s)
    out = out.reshape(parts, c, per_part, oh, ow).transpose(1, 2)
    return out.reshape(parts * per_part, c, oh, ow)[:n]


def sampler_parts(n: int, device: torch.device) -> int:
    """Batch entries to split ``n`` patches into for one ``grid_sample`` call: the intra-op thread count
    on CPU (its kernel parallelises over the batch only; 2 cores: 0.24 s -> 0.11 s for 2000 48x48
    patches), 1 on CUDA (the kernel is parallel over every output pixel)."""
    if device.type == "cuda" or n <= 1:
        return 1
    return max(1, min(n, torch.get_num_threads()))
