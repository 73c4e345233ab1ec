"""Face alignment: least-squares similarity transforms (Umeyama 1991) of 5 landmarks onto a template,
and one batched warp of all faces.

Coordinates are OpenCV's pixel centres (pixel (r, c) at x=c, y=r), as in ``cv2.warpAffine``.
"""
from __future__ import annotations

import numpy as np
import torch

from workers.faces.config import ARCFACE_TEMPLATE_112, AlignConfig  # noqa: F401 - their home is config
from workers.faces.resample import sample_patches

def umeyama(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms (rotation, uniform scale, translation), batched.

    Minimises sum_i || s R src_i + t - dst_i ||^2 for each item (Umeyama 1991, reflection excluded).

    Args:
        src: float[N, P, 2] points (P >= 2).
        dst: float[N, P, 2] or [P, 2] target points.

    Returns:
        float[N, 2, 3] matrices M with dst ~= M @ [x, y, 1].

    Raises:
        ValueError: shapes do not match.
    """
    if src.ndim != 3 or src.shape[-1] != 2:
        raise ValueError(f"src must be [N, P, 2], got {tuple(src.shape)}")
    dst = dst.expand_as(src) if dst.ndim == 2 else dst
    if dst.shape != src.shape:
        raise ValueError(f"dst must be [P, 2] or {tuple(src.shape)}, got {tuple(dst.shape)}")
    x, y = src.double(), dst.double()
    mx, my = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    xc, yc = x - mx, y - my
    var_x = xc.square().sum((1, 2)) / x.shape[1]
    cov = yc.transpose(1, 2) @ xc / x.shape[1]                        # [N, 2, 2]
    u, d, vt = torch.linalg.svd(cov)
    sign = torch.ones_like(d)
    sign[:, 1] = torch.sign(torch.linalg.det(u) * torch.linalg.det(vt))
    sign[sign == 0] = 1
    r = u @ torch.diag_embed(sign) @ vt
    scale = (d * sign).sum(1) / var_x.clamp_min(1e-12)
    t = my.squeeze(1) - scale[:, None] * (r @ mx.transpose(1, 2)).squeeze(2)
    return torch.cat([scale[:, None, None] * r, t[:, :, None]], 2).to(src.dtype)


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    """Invert float[N, 2, 3] affine maps."""
    a, t = m[:, :, :2], m[:, :, 2:]
    a_inv = torch.linalg.inv(a)
    return torch.cat([a_inv, -a_inv @ t], 2)


def align_faces(batch: torch.Tensor, sizes: torch.Tensor, image_index: torch.Tensor, landmarks: torch.Tensor,
                config: AlignConfig = AlignConfig(),
                canvas: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp every face onto the template.

    Args:
        batch: float[B, 3, H_max, W_max] padded RGB images (0..255).
        sizes: int64[B, 2] valid (H, W).
        image_index: int64[F] image of each face.
        landmarks: float[F, 5, 2] (x, y) pixel centres in the original image.
        config: output geometry.
        canvas: ``resample.patch_canvas(batch, sizes)`` when the caller already built it.

    Returns:
        crops: uint8[F, size, size, 3] RGB.
        transforms: float32[F, 2, 3] image -> crop similarity transforms.
    """
    dst = config.points().to(landmarks.device)
    m = umeyama(landmarks.float(), dst)
    patches = sample_patches(batch, sizes, image_index, invert_affine(m), (config.size, config.size),
                             canvas=canvas)
    crops = patches.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    return crops, m


def crop_landmarks(landmarks: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks mapped into their aligned crops, by the similarity fit that made the crops.

    The crop of a face is the least-squares similarity warp (Umeyama) of its 5 landmarks onto the
    template (``workers.faces.align.align_faces``); the same fit, recomputed, carries the
    landmarks into crop pixels, where they land near the template up to the fit's residual.

    Args:
        landmarks: float[F, 5, 2] (x, y) pixel centres in the original image.
        points: float[5, 2] template points in crop pixels (``AlignConfig.points()``).

    Returns:
        (mapped, transforms): float64[F, 5, 2] (x, y) pixel centres in the crop, and float64[F, 2, 3]
        image -> crop matrices.

    Raises:
        ValueError: landmarks is not [F, 5, 2] or points not [5, 2].
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (5, 2):
        raise ValueError(f"landmarks must be [F, 5, 2], got {lm.shape}")
    if pts.shape != (5, 2):
        raise ValueError(f"points must be [5, 2], got {pts.shape}")
    if lm.shape[0] == 0:
        return np.zeros((0, 5, 2)), np.zeros((0, 2, 3))
    m = umeyama(torch.from_numpy(lm), torch.from_numpy(pts)).numpy()
    mapped = lm @ m[:, :, :2].transpose(0, 2, 1) + m[:, None, :, 2]
    return mapped, m


def landmark_fit_errors(mapped: np.ndarray, points: np.ndarray) -> np.ndarray:
    """float64[F, 5]: distance, in crop pixels, of each mapped landmark (``crop_landmarks``' float[F, 5, 2])
    from its template point (float[5, 2])."""
    return np.linalg.norm(np.asarray(mapped, np.float64) - np.asarray(points, np.float64)[None], axis=2)
