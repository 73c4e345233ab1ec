"""Capture-condition degradations of aligned face crops, and named evaluation domains built from them.

Every operation maps RGB crops ``uint8[N, S, S, 3]`` (aligned to the ArcFace 5-point template) to
crops of the same shape and dtype. Parameters are a scalar (the whole batch) or one value per image, so
the same functions serve random training augmentation (``workers/training/augment.py``) and fixed
evaluation domains (:func:`parse_degrade`, :func:`degrade`). Each image's result depends only on that
image and its parameters, never on the rest of the batch.

Grayscale, blur, masks and low resolution are torch over the batch; JPEG goes through OpenCV one image
at a time (the codec has no batch form).
"""
from __future__ import annotations

import hashlib
from typing import Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from workers.faces.align import AlignConfig

#: ITU-R BT.601 luma weights of R, G, B.
BT601 = (0.299, 0.587, 0.114)
#: Default mask fill: mid grey.
MASK_GREY = (128, 128, 128)
#: Plausible mask fills (RGB): white, surgical blue, light blue, black, grey, navy, pink.
MASK_COLORS = ((235, 235, 235), (140, 185, 215), (175, 210, 230), (30, 30, 30), (128, 128, 128),
               (40, 50, 90), (225, 180, 190))

Step = tuple[str, Union[int, float, str, None]]


def check_crops(crops: np.ndarray) -> np.ndarray:
    """Validate uint8[N, S, S, 3] crops; returns them unchanged or raises ValueError naming the shape/dtype."""
    if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8:
        raise ValueError(f"crops must be a uint8 numpy array, got {type(crops).__name__} "
                         f"{getattr(crops, 'dtype', None)}")
    if crops.ndim != 4 or crops.shape[3] != 3 or crops.shape[1] != crops.shape[2]:
        raise ValueError(f"crops must be [N, S, S, 3], got {crops.shape}")
    return crops


def _per_image(value, n: int, dtype, name: str) -> np.ndarray:
    """A scalar or a [N] sequence as a [N] array."""
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full(n, arr, dtype=dtype)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or [{n}], got shape {arr.shape}")
    return arr


def _to_torch(crops: np.ndarray) -> torch.Tensor:
    """uint8[N, S, S, 3] -> float32[N, 3, S, S]."""
    return torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float()


def _to_numpy(images: torch.Tensor) -> np.ndarray:
    """float[N, 3, S, S] -> uint8[N, S, S, 3] (rounded, clamped)."""
    return images.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def lowres(crops: np.ndarray, px) -> np.ndarray:
    """Low resolution: antialiased bilinear downscale to ``px x px``, bilinear upscale back to S.

    Args:
        crops: uint8[N, S, S, 3] RGB.
        px: int or int[N], side of the low-resolution image in pixels (>= 2).

    Returns:
        uint8[N, S, S, 3].

    Raises:
        ValueError: bad crops, or a px below 2.
    """
    crops = check_crops(crops)
    n, s = crops.shape[:2]
    px = _per_image(px, n, np.int64, "px")
    if n and px.min() < 2:
        raise ValueError(f"px must be >= 2, got {int(px.min())}")
    out = crops.copy()
    for p in np.unique(px):                     # one batched resize per distinct size
        idx = np.flatnonzero(px == p)
        small = F.interpolate(_to_torch(crops[idx]), size=(int(p), int(p)), mode="bilinear",
                              align_corners=False, antialias=True)
        out[idx] = _to_numpy(F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False))
    return out


def jpeg(crops: np.ndarray, quality) -> np.ndarray:
    """JPEG re-encoding with OpenCV (libjpeg defaults, 4:2:0 chroma) at ``quality``.

    Args:
        crops: uint8[N, S, S, 3] RGB.
        quality: int or int[N] in [1, 100].

    Returns:
        uint8[N, S, S, 3], each image equal to ``cv2.imdecode(cv2.imencode(".jpg", bgr, q))`` in RGB.

    Raises:
        ValueError: bad crops, or a quality outside [1, 100].
    """
    crops = check_crops(crops)
    quality = _per_image(quality, len(crops), np.int64, "quality")
    if len(crops) and (quality.min() < 1 or quality.max() > 100):
        raise ValueError(f"quality must be in [1, 100], got {quality.min()}..{quality.max()}")
    out = np.empty_like(crops)
    for i, (image, q) in enumerate(zip(crops, quality)):
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(q)])
        if not ok:
            raise ValueError(f"JPEG encoding failed for image {i} at quality {q}")
        out[i] = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
    return out


def gray(crops: np.ndarray) -> np.ndarray:
    """Grayscale (IR-like): BT.601 luma ``0.299 R + 0.587 G + 0.114 B``, rounded, in all 3 channels.

    Args:
        crops: uint8[N, S, S, 3] RGB.

    Returns:
        uint8[N, S, S, 3] with R == G == B.
    """
    crops = check_crops(crops)
    luma = torch.from_numpy(crops).float() @ torch.tensor(BT601)          # [N, S, S]
    return luma.round().clamp(0, 255).to(torch.uint8)[..., None].expand(-1, -1, -1, 3).contiguous().numpy()


def gaussian_kernels(sigma: np.ndarray) -> torch.Tensor:
    """1-D Gaussian kernels with OpenCV's 8-bit support (``ksize = round(6 sigma + 1) | 1``).

    Args:
        sigma: float[N] > 0.

    Returns:
        float64[N, K], each row normalised, zero-padded (centred) to the largest support K.
    """
    radius = (np.rint(sigma * 6 + 1).astype(np.int64) | 1) // 2
    r_max = int(radius.max())
    x = torch.arange(-r_max, r_max + 1, dtype=torch.float64)
    sig = torch.from_numpy(sigma.astype(np.float64))[:, None]
    k = torch.exp(-x.square() / (2 * sig.square()))
    k = torch.where(x.abs() <= torch.from_numpy(radius)[:, None], k, torch.zeros(()))
    return k / k.sum(1, keepdim=True)


def blur(crops: np.ndarray, sigma) -> np.ndarray:
    """Separable Gaussian blur, edges reflected like OpenCV's default (``BORDER_REFLECT_101``).

    Args:
        crops: uint8[N, S, S, 3] RGB.
        sigma: float or float[N] > 0, standard deviation in pixels; the support (~3 sigma each side)
            must stay below S.

    Returns:
        uint8[N, S, S, 3], matching ``cv2.GaussianBlur(image, (0, 0), sigma)`` to about 1 level.

    Raises:
        ValueError: bad crops, a sigma <= 0, or one too large for the crop.
    """
    crops = check_crops(crops)
    n, s = crops.shape[:2]
    sigma = _per_image(sigma, n, np.float64, "sigma")
    if n == 0:
        return crops.copy()
    if not (sigma > 0).all():
        raise ValueError(f"sigma must be > 0, got {sigma.min()}")
    k = gaussian_kernels(sigma).float()                                   # [N, K]
    r = k.shape[1] // 2
    if r >= s:
        raise ValueError(f"sigma {sigma.max()} needs a kernel radius {r} >= crop size {s}")
    w = k.repeat_interleave(3, 0)[:, None]                                # [3N, 1, K]
    x = _to_torch(crops).reshape(1, 3 * n, s, s)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), w[:, :, None, :], groups=3 * n)
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), w[:, :, :, None], groups=3 * n)
    return _to_numpy(x.reshape(n, 3, s, s))


def mask_polygon(points: np.ndarray) -> np.ndarray:
    """Outline of a face mask from the nose to below the chin, built from 5 face landmarks.

    In a frame centred on the mouth with ``h`` = eye-centre-to-mouth-centre distance, the top edge is at
    0.45 h above the mouth (a tenth of the nose-mouth gap below the nose tip on the ArcFace template,
    0.55 h below the eyes), the sides reach 0.8 h out at mouth level, and the bottom is 0.7 h below the
    mouth (past the chin, so outside an ArcFace crop).

    Args:
        points: float[5, 2] (x, y) left eye, right eye, nose, left mouth, right mouth in crop pixels.

    Returns:
        float32[8, 2] polygon vertices (x, y) in crop pixels.
    """
    p = np.asarray(points, dtype=np.float64)
    mouth, eyes = (p[3] + p[4]) / 2, (p[0] + p[1]) / 2
    down = mouth - eyes
    h = np.linalg.norm(down)
    down = down / h
    across = np.array([down[1], -down[0]])      # image-right when the face is upright
    local = np.array([(-0.75, -0.45), (0.75, -0.45), (0.8, 0.0), (0.6, 0.45), (0.25, 0.7),
                      (-0.25, 0.7), (-0.6, 0.45), (-0.8, 0.0)])
    return (mouth + h * (local[:, :1] * across + local[:, 1:] * down)).astype(np.float32)


def mask_region(size: int, points: np.ndarray | None = None) -> np.ndarray:
    """Pixels covered by the mask polygon: bool[size, size] (pixel centres inside, 1/16 px precision).

    Args:
        size: crop side S.
        points: float[5, 2] landmarks in crop pixels; default the ArcFace template at this size.
    """
    points = AlignConfig(size=size).points().numpy() if points is None else points
    region = np.zeros((size, size), np.uint8)
    cv2.fillPoly(region, [np.rint(mask_polygon(points) * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    return region.astype(bool)


def mask(crops: np.ndarray, color=MASK_GREY, points: np.ndarray | None = None) -> np.ndarray:
    """Synthetic face mask: the :func:`mask_region` polygon filled with a flat colour.

    Args:
        crops: uint8[N, S, S, 3] RGB.
        color: RGB uint8[3] for the batch or uint8[N, 3] per image.
        points: float[5, 2] landmarks in crop pixels; default the ArcFace template scaled to S.

    Returns:
        uint8[N, S, S, 3].

    Raises:
        ValueError: bad crops or colours.
    """
    crops = check_crops(crops)
    col = np.asarray(color)
    if col.shape not in ((3,), (len(crops), 3)) or col.min(initial=0) < 0 or col.max(initial=0) > 255:
        raise ValueError(f"color must be RGB 0..255 [3] or [{len(crops)}, 3], got {col.tolist()}")
    col = torch.from_numpy(np.broadcast_to(col.astype(np.uint8), (len(crops), 3)).copy())
    region = torch.from_numpy(mask_region(crops.shape[1], points))
    return torch.where(region[None, :, :, None], col[:, None, None, :], torch.from_numpy(crops)).numpy()


def key_colors(keys: Sequence[str]) -> np.ndarray:
    """A :data:`MASK_COLORS` entry per key, chosen by a stable hash: uint8[N, 3]."""
    pick = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8, person=b"fm-mask").digest(), "little")
            % len(MASK_COLORS) for k in keys]
    return np.asarray(MASK_COLORS, dtype=np.uint8)[np.asarray(pick, dtype=np.int64)].reshape(-1, 3)


# --------------------------------------------------------------------------------------------------------
# Evaluation domains: "lowres:16", "jpeg:10+gray", "mask", "mask:random", "blur:2", "clean".

_PARAMS = {"lowres": "int >= 2 (pixels)", "jpeg": "int in [1, 100] (quality)", "blur": "float > 0 (sigma)",
           "gray": "none", "mask": "none or 'random'"}


def _parse_param(name: str, text: str | None):
    if name in ("lowres", "jpeg", "blur") and text is None:
        raise ValueError(f"degradation {name!r} needs a parameter ({_PARAMS[name]}), e.g. '{name}:16'")
    try:
        if name == "lowres" and int(text) >= 2:
            return int(text)
        if name == "jpeg" and 1 <= int(text) <= 100:
            return int(text)
        if name == "blur" and 0 < float(text) < float("inf"):
            return float(text)
    except ValueError:
        pass
    if name == "gray" and text is None or name == "mask" and text in (None, "random"):
        return text
    raise ValueError(f"bad parameter {text!r} for degradation {name!r}: expected {_PARAMS[name]}")


def parse_degrade(spec: str) -> tuple[Step, ...]:
    """Parse an evaluation domain: ``+``-joined ``name[:param]`` steps, applied left to right.

    Args:
        spec: e.g. ``"lowres:16"``, ``"jpeg:10+gray"``, ``"mask"``, ``"mask:random"`` (colour from the
            image key), ``"blur:2"``, or ``"clean"`` (no steps).

    Returns:
        ((name, param), ...) with param int (lowres, jpeg), float (blur), "random" or None.

    Raises:
        ValueError: naming an empty spec or step, an unknown or repeated name, or a bad parameter.
    """
    text = spec.strip().lower() if isinstance(spec, str) else spec
    if not isinstance(text, str) or not text:
        raise ValueError(f"degradation spec must be a non-empty string, got {spec!r}")
    if text == "clean":
        return ()
    steps: list[Step] = []
    for part in text.split("+"):
        name, _, param = (s.strip() for s in part.partition(":"))
        if name not in _PARAMS:
            raise ValueError(f"unknown degradation {name!r} in {spec!r}; known: clean, {', '.join(_PARAMS)}")
        if any(n == name for n, _ in steps):
            raise ValueError(f"degradation {name!r} repeated in {spec!r}")
        steps.append((name, _parse_param(name, param if ":" in part else None)))
    return tuple(steps)


def format_degrade(steps: Sequence[Step]) -> str:
    """Inverse of :func:`parse_degrade`: ``(("jpeg", 10), ("gray", None))`` -> ``"jpeg:10+gray"``."""
    return "+".join(n if p is None else f"{n}:{p:g}" if isinstance(p, float) else f"{n}:{p}"
                    for n, p in steps) or "clean"


def degrade(crops: np.ndarray, spec: str | Sequence[Step], keys: Sequence[str]) -> np.ndarray:
    """Apply an evaluation domain, deterministically per image.

    Args:
        crops: uint8[N, S, S, 3] RGB aligned crops.
        spec: a :func:`parse_degrade` string or its parsed steps.
        keys: N stable image ids; the only randomness (``mask:random`` colours) is a hash of the key, so
            an image's result does not depend on its batch or position.

    Returns:
        uint8[N, S, S, 3] (a copy for ``"clean"``).

    Raises:
        ValueError: bad crops, spec, or a keys length other than N.
    """
    crops = check_crops(crops)
    steps = parse_degrade(spec) if isinstance(spec, str) else tuple(spec)
    if len(keys) != len(crops):
        raise ValueError(f"keys must hold one id per crop ({len(crops)}), got {len(keys)}")
    out = crops.copy()
    for name, param in steps:
        if name == "mask":
            out = mask(out, key_colors(keys) if param == "random" else MASK_GREY)
        elif name == "gray":
            out = gray(out)
        elif name in ("lowres", "jpeg", "blur"):
            out = {"lowres": lowres, "jpeg": jpeg, "blur": blur}[name](out, param)
        else:
            raise ValueError(f"unknown degradation step {name!r}")
    return out
