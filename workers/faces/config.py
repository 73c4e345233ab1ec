"""Settings of the face stage (detection, alignment, embedding precision), importable without torch.

The driver of a job builds and checks these before Ray starts and ships them to the actors; only the
actors import torch (1.2 s here) and the nets.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

#: Embedding precisions (:data:`workers.faces.embedders.EMBED_PRECISIONS` maps them to autocast dtypes).
PRECISIONS = ("bfloat16", "float16", "float32")

# The 5-point template of ArcFace / InsightFace (and OpenCV's SFace), for 112x112 crops:
# left eye, right eye, nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE_112 = (
    (38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))


def check_precision(precision: str, device=None) -> None:
    """Raise ValueError unless ``precision`` is known (and, with ``device`` (str or torch.device), usable there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"embed precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if precision == "float16" and device is not None and str(device).split(":")[0] != "cuda":
        raise ValueError("embed precision float16 needs CUDA; use bfloat16 on CPU")


@dataclasses.dataclass(frozen=True)
class MTCNNConfig:
    """Detection settings.

    Attributes:
        min_face_size: smallest face side searched, in pixels (sets the first pyramid scale 12 / size).
        thresholds: face-probability thresholds of P-Net, R-Net and O-Net.
        factor: scale ratio between pyramid levels.
        nms_thresholds: IoU thresholds of NMS inside each pyramid level, over all P-Net boxes, after
            R-Net, and after O-Net (the last uses intersection over the smaller box).
        select: "all" faces, only the "largest", or only the one nearest the image "center".
        max_faces: keep at most this many faces per image, best first (0: no limit).
        crop_supersample: bilinear samples per axis averaged into each R-Net/O-Net input pixel.
        max_candidates_per_level: P-Net candidates kept per image and level before NMS (by score).
        stage1_pixels: P-Net pyramid run over groups of images of at most this many padded pixels;
            0 = by device (:func:`workers.faces.mtcnn.default_stage1_pixels`).
        crop_chunk: R-Net / O-Net inputs cut and scored per chunk of this many boxes (bounds memory);
            0 = by device (:func:`workers.faces.mtcnn.default_crop_chunk`).
        channels_last: run the nets in NHWC memory layout (2-3x faster on CPU, same numbers).
    """

    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709
    nms_thresholds: tuple[float, float, float, float] = (0.5, 0.7, 0.7, 0.7)
    select: Literal["all", "largest", "center"] = "all"
    max_faces: int = 0
    crop_supersample: int = 2
    max_candidates_per_level: int = 2000
    stage1_pixels: int = 0
    crop_chunk: int = 0
    channels_last: bool = True

    def __post_init__(self):
        if self.min_face_size < 12:
            raise ValueError(f"min_face_size must be >= 12 pixels, got {self.min_face_size}")
        if not 0 < self.factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {self.factor}")
        if len(self.thresholds) != 3 or not all(0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be 3 values in [0, 1], got {self.thresholds}")
        if self.select not in ("all", "largest", "center"):
            raise ValueError(f"select must be 'all', 'largest' or 'center', got {self.select!r}")
        if self.max_faces < 0:
            raise ValueError(f"max_faces must be >= 0 (0: no limit), got {self.max_faces}")
        if self.crop_chunk < 0 or self.stage1_pixels < 0:
            raise ValueError(f"crop_chunk and stage1_pixels must be >= 0 (0: by device), "
                             f"got {self.crop_chunk} and {self.stage1_pixels}")


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Aligned crop geometry.

    Attributes:
        size: output side in pixels (the ArcFace template is defined at 112 and scaled to this size).
        margin: extra fraction of the side added around the template on every edge (0: ArcFace framing);
            the output stays ``size`` pixels, so the face shrinks by 1 / (1 + 2 * margin).
        template: 5 (x, y) points at 112 x 112.
    """

    size: int = 112
    margin: float = 0.0
    template: tuple[tuple[float, float], ...] = ARCFACE_TEMPLATE_112

    def __post_init__(self):
        if self.size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {self.size}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {self.margin}")
        if len(self.template) != 5:
            raise ValueError(f"template must have 5 points, got {len(self.template)}")

    def points(self):
        """Template points float32[5, 2] (a torch tensor) in output pixels for this size and margin."""
        import torch

        t = torch.tensor(self.template, dtype=torch.float32)
        # Scale about pixel edges: centre coordinate c maps to (c + 0.5) * k - 0.5.
        k = self.size / 112.0 / (1 + 2 * self.margin)
        offset = (self.size - 112.0 * k) / 2
        return (t + 0.5) * k - 0.5 + offset


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Settings of the whole face stage.

    Attributes:
        mtcnn: detection settings.
        align: aligned crop geometry (must match the embedder's input size).
        embed_batch_size: faces per embedder forward pass; 0 = by device (``default_embed_batch``: small
            batches on CPU, where they stay in cache and run ~3x faster per face, large ones on CUDA).
        embed_precision: "float32" (default), "bfloat16" (autocast; CPU with AVX512-BF16/AMX or GPU) or
            "float16" (autocast, CUDA only). Reduced precision changes embeddings slightly (measured on
            LFW in docs/performance.md); outputs are float32 either way.
    """

    mtcnn: MTCNNConfig = MTCNNConfig()
    align: AlignConfig = AlignConfig()
    embed_batch_size: int = 0
    embed_precision: str = "float32"

    def __post_init__(self):
        check_precision(self.embed_precision)
        if self.embed_batch_size < 0:
            raise ValueError(f"embed_batch_size must be >= 0 (0: by device), got {self.embed_batch_size}")
