"""Face quality from what the pipeline already knows: size, detection score, sharpness, pose.

Each part is mapped to [0, 1] (1: good) by a fixed, documented ramp, and the score is their weighted
geometric mean, so one bad part (a 14 px face, a profile, a blurred crop) pulls the score down however
good the others are. Pure numpy; the parts are kept as columns of the quality table.
"""
from __future__ import annotations

import dataclasses

import numpy as np

PARTS = ("size", "detection", "sharpness", "pose")


@dataclasses.dataclass(frozen=True)
class QualitySettings:
    """Ramps of the parts and the flag threshold.

    Attributes:
        size_px: (bad, good) shorter box side in original pixels.
        detection: (bad, good) of ``-log10(1 - score)`` (2: score 0.99, 5: 0.99999).
        sharpness: (bad, good) of ``log10`` of the variance of the Laplacian over the crop's centre.
        yaw: (good, bad) of ``|yaw|``, the nose's offset from the eyes' midpoint over the eye distance.
        weights: weight of each of :data:`PARTS` in the geometric mean.
        flag_below: faces with a score below this are flagged.
    """

    size_px: tuple[float, float] = (20.0, 60.0)
    detection: tuple[float, float] = (2.0, 5.0)
    sharpness: tuple[float, float] = (1.6, 2.6)
    yaw: tuple[float, float] = (0.15, 0.6)
    weights: tuple[float, float, float, float] = (1.0, 0.5, 1.0, 1.0)
    flag_below: float = 0.35

    def __post_init__(self) -> None:
        for name in ("size_px", "detection", "sharpness", "yaw"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"quality {name} ramp must rise (got {lo}, {hi})")
        if len(self.weights) != len(PARTS) or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"quality weights must be {len(PARTS)} non-negative numbers, got {self.weights}")
        if not 0.0 <= self.flag_below <= 1.0:
            raise ValueError(f"quality flag_below must be in [0, 1], got {self.flag_below}")


def ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 at ``lo`` and below, 1 at ``hi`` and above, linear between (NaN -> 0)."""
    return np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def laplacian_sharpness(crops: np.ndarray, centre: float = 0.6) -> np.ndarray:
    """float32[N]: log10 of the variance of the 4-neighbour Laplacian of the gray crops' centre.

    Args:
        crops: uint8[N, S, S, 3] aligned RGB crops.
        centre: side of the centred square used, as a share of S (the face, not the background).
    """
    n, s = crops.shape[:2]
    if n == 0:
        return np.zeros(0, np.float32)
    m = max(3, int(round(s * centre)))
    o = (s - m) // 2
    gray = crops[:, o:o + m, o:o + m].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = (4 * gray[:, 1:-1, 1:-1] - gray[:, :-2, 1:-1] - gray[:, 2:, 1:-1]
           - gray[:, 1:-1, :-2] - gray[:, 1:-1, 2:])
    return np.log10(lap.reshape(n, -1).var(axis=1) + 1.0).astype(np.float32)


def pose(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(yaw, pitch, roll) float32[N] from 5 landmarks float[N, 10] (left eye, right eye, nose, mouth corners).

    yaw: the nose's horizontal offset from the eyes' midpoint over the eye distance (0 frontal, about
    +-0.5 at a half profile); pitch: where the nose sits between the eye line (0) and the mouth line (1),
    minus 0.5; roll: the eye line's angle in degrees.
    """
    p = np.asarray(landmarks, np.float32).reshape(-1, 5, 2)
    eyes, nose, mouth = (p[:, 0] + p[:, 1]) / 2, p[:, 2], (p[:, 3] + p[:, 4]) / 2
    d = p[:, 1] - p[:, 0]
    dist = np.maximum(np.linalg.norm(d, axis=1), 1e-6)
    along, across = d / dist[:, None], np.stack([-d[:, 1], d[:, 0]], 1) / dist[:, None]
    yaw = np.einsum("nd,nd->n", nose - eyes, along) / dist
    height = np.maximum(np.einsum("nd,nd->n", mouth - eyes, across), 1e-6)
    pitch = np.einsum("nd,nd->n", nose - eyes, across) / height - 0.5
    roll = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    return yaw.astype(np.float32), pitch.astype(np.float32), roll.astype(np.float32)


def quality_parts(boxes: np.ndarray, scores: np.ndarray, landmarks: np.ndarray, sharpness: np.ndarray) -> dict:
    """The raw measurements of each face.

    Args:
        boxes: float[N, 4] x1 y1 x2 y2 in the original image.
        scores: float[N] detection scores.
        landmarks: float[N, 10].
        sharpness: float[N], :func:`laplacian_sharpness` of the crops.

    Returns:
        float32[N] columns face_size_px, detection_strength, sharpness, yaw, pitch, roll.
    """
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    size = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    strength = -np.log10(np.clip(1.0 - np.asarray(scores, np.float64), 1e-7, 1.0))
    yaw, pitch, roll = pose(landmarks)
    return {"face_size_px": size.astype(np.float32), "detection_strength": strength.astype(np.float32),
            "sharpness": np.asarray(sharpness, np.float32), "yaw": yaw, "pitch": pitch, "roll": roll}


def quality_score(parts: dict, settings: QualitySettings = QualitySettings()) -> tuple[np.ndarray, dict]:
    """(score float32[N] in [0, 1], the per-part [0, 1] values keyed by :data:`PARTS`)."""
    q = {
        "size": ramp(parts["face_size_px"], *settings.size_px),
        "detection": ramp(parts["detection_strength"], *settings.detection),
        "sharpness": ramp(parts["sharpness"], *settings.sharpness),
        "pose": 1.0 - ramp(np.abs(parts["yaw"]), *settings.yaw),
    }
    w = np.asarray(settings.weights, np.float64)
    logs = np.stack([np.log(np.maximum(q[k], 1e-3)) for k in PARTS], 1)
    score = np.exp(logs @ (w / w.sum()))
    return score.astype(np.float32), {k: v.astype(np.float32) for k, v in q.items()}
