"""detect -> align -> embed over a batch of images of different sizes (pure torch, no Ray)."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from workers.faces.align import align_faces
from workers.faces.config import AlignConfig, EngineConfig, MTCNNConfig, check_precision  # noqa: F401 - re-exported
from workers.faces.embedders import embed_crops
from workers.faces.mtcnn import MTCNN
from workers.faces.profile import NO_TIMER, StageTimer
from workers.faces.resample import pad_images
from workers.faces.sface import fold_batchnorm


@dataclasses.dataclass
class FaceResults:
    """Faces of a batch of B images, flat over the F faces found (host numpy arrays).

    Attributes:
        num_faces: int32[B] faces per image.
        image_index: int64[F] image of each face, non-decreasing; faces of an image are ranked best first.
        boxes: float32[F, 4] x1 y1 x2 y2 pixel edges in the original image.
        scores: float32[F] O-Net face probability.
        landmarks: float32[F, 5, 2] (x, y) pixel centres.
        crops: uint8[F, S, S, 3] aligned RGB crops.
        embeddings: float32[F, D] L2-normalised.
    """

    num_faces: np.ndarray
    image_index: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    crops: np.ndarray
    embeddings: np.ndarray


class AlignedFaces(NamedTuple):
    """Faces of a batch of B images before embedding, flat over the F faces, on the engine's device.

    Attributes:
        num_faces: int64[B] faces per image.
        image_index: int64[F] image of each face (non-decreasing).
        boxes: float[F, 4] x1 y1 x2 y2 pixel edges.
        scores: float[F] O-Net face probability.
        landmarks: float[F, 5, 2] (x, y) pixel centres.
        crops: uint8[F, S, S, 3] aligned RGB crops.
        sizes: int64[B, 2] (H, W) of each image.
    """

    num_faces: torch.Tensor
    image_index: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    crops: torch.Tensor
    sizes: torch.Tensor


class FaceEngine:
    """Holds the loaded models; :meth:`process` runs the whole stage on one batch."""

    def __init__(self, detector: MTCNN, embedder: nn.Module, config: EngineConfig = EngineConfig()):
        check_precision(config.embed_precision, detector.device)
        # Inference only: a BN-folded copy (``embedder`` itself is not changed or kept).
        self.detector, self.embedder, self.config = detector, fold_batchnorm(embedder), config

    @property
    def device(self) -> torch.device:
        return self.detector.device

    @torch.inference_mode()
    def detect_align(self, images: list, timer: StageTimer = NO_TIMER) -> AlignedFaces:
        """Detect and align every face (no embedding); results stay on the engine's device.

        Args:
            images: B RGB images uint8[H_i, W_i, 3] of any sizes.
            timer: profiling hook (:mod:`workers.faces.profile`): stages upload (padding and the copy to the
                device), pnet, rnet (with the crop canvas), onet, align.
        """
        with timer.stage("upload"):
            batch, sizes = pad_images(images, self.device)
            batch = batch.float().contiguous()  # NCHW rows: the resize reads them as is
        # One crop canvas for the R-Net, O-Net and alignment patches.
        det, canvas = self.detector.cascade(batch, sizes, timer=timer)
        with timer.stage("align"):
            image_index, boxes, scores, landmarks = det.flat()
            crops, _ = align_faces(batch, sizes, image_index, landmarks, self.config.align, canvas)
        return AlignedFaces(det.num_faces, image_index, boxes, scores, landmarks, crops, sizes)

    @torch.inference_mode()
    def process(self, images: list, timer: StageTimer = NO_TIMER) -> FaceResults:
        """Detect, align and embed every face.

        Args:
            images: B RGB images uint8[H_i, W_i, 3] of any sizes.
            timer: profiling hook: the stages of :meth:`detect_align`, then embed and to_host.

        Returns:
            :class:`FaceResults` on the host.
        """
        f = self.detect_align(images, timer)
        with timer.stage("embed"):
            emb = embed_crops(self.embedder, f.crops, self.config.embed_batch_size, self.config.embed_precision)
        with timer.stage("to_host"):
            return FaceResults(
                num_faces=f.num_faces.int().cpu().numpy(), image_index=f.image_index.cpu().numpy(),
                boxes=f.boxes.float().cpu().numpy(), scores=f.scores.float().cpu().numpy(),
                landmarks=f.landmarks.float().cpu().numpy(), crops=f.crops.cpu().numpy(),
                embeddings=emb.cpu().numpy())
