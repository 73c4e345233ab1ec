"""MTCNN (Zhang et al. 2016) face detection, batched over images of different sizes.

P-Net (12x12, fully convolutional) scans an image pyramid; R-Net (24x24) and O-Net (48x48) re-score and
refine the surviving boxes; O-Net also returns 5 landmarks. Every stage runs on the whole batch at once:
pyramid levels are batched across images (area resize by matrix products), candidates of all images go
through one NMS call per stage, and the R-Net / O-Net crops of all boxes are cut by one ``grid_sample``.
The nets and their weights live in :mod:`workers.faces.mtcnn_nets`.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from workers.faces.config import MTCNNConfig
from workers.faces.mtcnn_nets import ONet, PNet, RNet, keras_to_state_dict, load_mtcnn_nets, max_pool_2x2_ceil
from workers.faces.nms import batched_nms
from workers.faces.profile import NO_TIMER, StageTimer
from workers.faces.resample import box_to_affine, pad_images, patch_canvas, resize_area, sample_patches

__all__ = ["MTCNN", "MTCNNConfig", "Detections", "pyramid_scales", "default_stage1_pixels", "default_crop_chunk",
           "PNet", "RNet", "ONet", "keras_to_state_dict", "load_mtcnn_nets", "max_pool_2x2_ceil"]


def default_stage1_pixels(device: torch.device | str) -> int:
    """Padded pixels per P-Net group when ``stage1_pixels`` is 0: everything at once on CUDA; 2 MP on CPU,
    where the pyramid of a group then stays in cache (2 cores, per 1000 px image: resize 33 ms and
    P-Net 35 ms in groups of 2, against 92 and 60 ms in groups of 8)."""
    return 1 << 62 if torch.device(device).type == "cuda" else 2_000_000


def default_crop_chunk(device: torch.device | str) -> int:
    """R-Net / O-Net boxes per chunk when ``crop_chunk`` is 0: 4096 on CUDA (big launches); 64 on CPU,
    where a chunk's crops and activations then stay in cache (2 cores: R-Net 28 us/box at 64 against
    81 at 4096, O-Net 185 against 477)."""
    return 4096 if torch.device(device).type == "cuda" else 64


@dataclasses.dataclass
class Detections:
    """Faces found in a batch of B images, padded to K = max faces per image.

    Attributes:
        boxes: float32[B, K, 4], x1 y1 x2 y2 pixel edges in the original image.
        scores: float32[B, K], O-Net face probability.
        landmarks: float32[B, K, 5, 2], (x, y) pixel centres: left eye, right eye, nose, mouth left, right.
        num_faces: int64[B]; entries at k >= num_faces[b] are zero padding.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    num_faces: torch.Tensor

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Valid faces only: (image_index int64[F], boxes [F, 4], scores [F], landmarks [F, 5, 2])."""
        k = self.boxes.shape[1]
        valid = torch.arange(k, device=self.boxes.device)[None, :] < self.num_faces[:, None]
        image_index = torch.nonzero(valid)[:, 0]
        return image_index, self.boxes[valid], self.scores[valid], self.landmarks[valid]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 127.5) * 0.0078125


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow float[N, 4] boxes to squares of side max(w, h), same centre."""
    wh = boxes[:, 2:] - boxes[:, :2]
    side = wh.max(1, keepdim=True).values
    centre = boxes[:, :2] + wh / 2
    return torch.cat([centre - side / 2, centre + side / 2], 1)


def _regress(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Apply MTCNN box regression: offsets float[N, 4] in units of box width / height."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + reg * wh


def pyramid_scales(min_side: torch.Tensor, config: MTCNNConfig) -> list[float]:
    """Scales of the image pyramid for the largest min side of a batch (smaller images use a prefix).

    Args:
        min_side: int64[B] min(H, W) per image.
        config: detection settings.

    Returns:
        Scales m * factor^k, m = 12 / min_face_size, while min_side_max * scale >= 12.
    """
    m = 12.0 / config.min_face_size
    longest = float(min_side.max()) if min_side.numel() else 0.0
    scales, s = [], m
    while longest * s >= 12:
        scales.append(s)
        s *= config.factor
    return scales


class MTCNN(nn.Module):
    """The three-stage cascade over a batch of images of different sizes.

    Example:
        >>> detector = MTCNN.pretrained(MTCNNConfig(), device="cuda")
        >>> det = detector.detect([img_a, img_b])   # uint8[H_i, W_i, 3] RGB each
    """

    def __init__(self, pnet: PNet, rnet: RNet, onet: ONet, config: MTCNNConfig = MTCNNConfig()):
        super().__init__()
        self.pnet, self.rnet, self.onet, self.config = pnet, rnet, onet, config

    @classmethod
    def pretrained(cls, config: MTCNNConfig = MTCNNConfig(), device: torch.device | str = "cpu") -> "MTCNN":
        nets = load_mtcnn_nets(device)
        if config.channels_last:
            nets = tuple(net.to(memory_format=torch.channels_last) for net in nets)
        return cls(*nets, config=config)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    @property
    def device(self) -> torch.device:
        return self.pnet.conv1.weight.device

    @torch.inference_mode()
    def detect(self, images: list, batch: torch.Tensor | None = None, sizes: torch.Tensor | None = None,
               canvas: torch.Tensor | None = None, timer: StageTimer = NO_TIMER) -> Detections:
        """Detect faces in every image.

        Args:
            images: B RGB images uint8[H_i, W_i, 3] (numpy or torch); ignored when batch is given.
            batch: optional already padded uint8/float[B, 3, H_max, W_max] on the detector's device.
            sizes: int64[B, 2] (H, W) per image, with batch.
            canvas: ``patch_canvas(batch, sizes)`` when the caller built it (to cut more patches later).
            timer: profiling hook (:mod:`workers.faces.profile`), see :meth:`cascade`.

        Returns:
            :class:`Detections` padded over the batch.
        """
        if batch is None:
            batch, sizes = pad_images(images, self.device)
        return self.cascade(batch.float().contiguous(), sizes, canvas, timer)[0]

    def cascade(self, batch: torch.Tensor, sizes: torch.Tensor, canvas: torch.Tensor | None = None,
                timer: StageTimer = NO_TIMER) -> tuple[Detections, torch.Tensor]:
        """stage1 -> stage2 -> stage3 -> select on a padded float batch, timed as the stages pnet, rnet (with
        the crop canvas when it is built here) and onet (with the selection).

        Args:
            batch: float[B, 3, H_max, W_max] contiguous NCHW on the detector's device.
            sizes: int64[B, 2] (H, W) per image.
            canvas: the crop canvas if the caller has one (None: built here, once for R-Net and O-Net).
            timer: profiling hook.

        Returns:
            (:class:`Detections`, the crop canvas, for cutting more patches such as the aligned crops).
        """
        n_img = batch.shape[0]
        with timer.stage("pnet"):
            cand = self.stage1(batch, sizes, timer)
        with timer.stage("rnet"):
            canvas = patch_canvas(batch, sizes) if canvas is None else canvas
            cand = self.stage2(batch, sizes, *cand, canvas=canvas, timer=timer)
        with timer.stage("onet"):
            img, boxes, scores, marks = self.stage3(batch, sizes, *cand, canvas=canvas, timer=timer)
            return self.select(img, boxes, scores, marks, sizes, n_img), canvas

    def stage1(self, batch, sizes, timer: StageTimer = NO_TIMER):
        """Stage 1 (``detect`` runs stage1 -> stage2 -> stage3 -> select): P-Net over the pyramid, in groups
        of images of at most ``stage1_pixels`` padded pixels (each image's candidates depend on that image
        alone, so grouping changes nothing but speed)."""
        cfg = self.config
        n_img, _, h_max, w_max = batch.shape
        budget = cfg.stage1_pixels or default_stage1_pixels(batch.device)
        per_group = max(1, min(n_img, budget // max(1, h_max * w_max)))
        found = [self._pnet_candidates(batch[g:g + per_group], sizes[g:g + per_group], g, timer)
                 for g in range(0, n_img, per_group)]
        parts = [part for group in found for part in group]
        if not parts:
            empty = batch.new_zeros((0, 4))
            return torch.zeros(0, dtype=torch.int64, device=batch.device), empty
        img, boxes, scores, reg = (torch.cat(column) for column in zip(*parts))
        with timer.part("nms"):
            keep = batched_nms(boxes, scores, img, cfg.nms_thresholds[1])
        return img[keep], _square(_regress(boxes[keep], reg[keep]))

    def _pnet_candidates(self, batch, sizes, offset: int, timer: StageTimer) -> list[tuple]:
        """P-Net candidates of every pyramid level of a group of images, after NMS within each level.

        Args:
            batch: float[G, 3, H, W] padded images (may be wider than the group needs).
            sizes: int64[G, 2] (H, W).
            offset: index of the group's first image in the whole batch.

        Returns:
            Per level with candidates: (image int64[n] (whole-batch index), boxes float[n, 4],
            scores float[n], box regression float[n, 4]).
        """
        cfg = self.config
        min_side = sizes.min(1).values
        found = []
        for scale in pyramid_scales(min_side, cfg):  # one pass per level, all images of the group at once
            members = torch.nonzero(min_side.double() * scale >= 12).squeeze(1)
            sub_sizes = sizes[members]
            out_sizes = torch.ceil(sub_sizes.double() * scale).long().clamp_min(1)
            h_max, w_max = int(sub_sizes[:, 0].max()), int(sub_sizes[:, 1].max())
            source = batch if members.numel() == batch.shape[0] else batch[members]  # no copy when all take part
            with timer.part("resize"):
                level = resize_area(source[:, :, :h_max, :w_max], sub_sizes, out_sizes)
            level = self._layout(_normalise(level))
            with timer.part("net"):
                prob, reg = self.pnet(level)
            # A cell is a 12x12 window at stride 2; keep cells whose window lies inside the image.
            gy = torch.arange(prob.shape[1], device=prob.device)[None, :, None]
            gx = torch.arange(prob.shape[2], device=prob.device)[None, None, :]
            inside = (2 * gy + 12 <= out_sizes[:, 0, None, None]) & (2 * gx + 12 <= out_sizes[:, 1, None, None])
            b, y, x = torch.nonzero((prob >= cfg.thresholds[0]) & inside, as_tuple=True)
            if b.numel() == 0:
                continue
            # Back to original pixels with each image's own effective scale per axis.
            f = sub_sizes[b].double() / out_sizes[b].double()                       # [n, 2] (fy, fx)
            boxes = torch.stack([2 * x, 2 * y, 2 * x + 12, 2 * y + 12], 1).double()
            boxes = (boxes * f[:, [1, 0, 1, 0]]).float()
            scores = prob[b, y, x]
            img = members[b] + offset
            with timer.part("nms"):
                keep = batched_nms(boxes, scores, img, cfg.nms_thresholds[0],
                                   max_per_group=cfg.max_candidates_per_level)
            found.append((img[keep], boxes[keep], scores[keep], reg[b[keep], :, y[keep], x[keep]]))
        return found

    def _score_crops(self, net, batch, sizes, img, boxes, side, canvas, timer: StageTimer):
        """Cut side x side crops of all boxes and run ``net`` on them, in chunks of ``crop_chunk`` boxes
        (0: :func:`default_crop_chunk` of the device)."""
        chunk = self.config.crop_chunk or default_crop_chunk(batch.device)
        canvas = patch_canvas(batch, sizes) if canvas is None else canvas
        outs = []
        for i in range(0, img.shape[0], chunk):
            affine = box_to_affine(boxes[i:i + chunk], (side, side))
            with timer.part("crops"):
                patches = sample_patches(batch, sizes, img[i:i + chunk], affine, (side, side),
                                         self.config.crop_supersample, canvas=canvas)
            patches = self._layout(_normalise(patches))
            with timer.part("net"):
                outs.append(net(patches))
        return [torch.cat(parts) for parts in zip(*outs)]

    def stage2(self, batch, sizes, img, boxes, canvas=None, timer: StageTimer = NO_TIMER):
        """R-Net over P-Net's candidates (image index int64[N], boxes float[N, 4]): those above the
        threshold, regressed, squared and NMS-ed per image, as (int64[M], float[M, 4])."""
        cfg = self.config
        if img.numel() == 0:
            return img, boxes
        prob, reg = self._score_crops(self.rnet, batch, sizes, img, boxes, 24, canvas, timer)
        ok = prob >= cfg.thresholds[1]
        img, boxes, prob, reg = img[ok], boxes[ok], prob[ok], reg[ok]
        with timer.part("nms"):
            keep = batched_nms(boxes, prob, img, cfg.nms_thresholds[2])
        return img[keep], _square(_regress(boxes[keep], reg[keep]))

    def stage3(self, batch, sizes, img, boxes, canvas=None, timer: StageTimer = NO_TIMER):
        """O-Net over R-Net's boxes: (image index int64[K], boxes float[K, 4], scores float[K], landmarks
        float[K, 5, 2]) of the faces above the threshold, regressed and NMS-ed (min mode) per image."""
        cfg = self.config
        if img.numel() == 0:
            z = batch.new_zeros
            return img, z((0, 4)), z((0,)), z((0, 5, 2))
        prob, reg, lm = self._score_crops(self.onet, batch, sizes, img, boxes, 48, canvas, timer)
        ok = prob >= cfg.thresholds[2]
        img, boxes, prob, reg, lm = img[ok], boxes[ok], prob[ok], reg[ok], lm[ok]
        wh = boxes[:, 2:] - boxes[:, :2]
        # Landmarks relative to the O-Net input box; to pixel centres (edge coordinate - 0.5).
        marks = torch.stack([boxes[:, None, 0] + lm[:, :5] * wh[:, None, 0],
                             boxes[:, None, 1] + lm[:, 5:] * wh[:, None, 1]], -1) - 0.5
        boxes = _regress(boxes, reg)
        with timer.part("nms"):
            keep = batched_nms(boxes, prob, img, cfg.nms_thresholds[3], mode="min")
        return img[keep], boxes[keep], prob[keep], marks[keep]

    def select(self, img, boxes, scores, marks, sizes, n_img) -> Detections:
        """Keep the faces ``config.select`` / ``max_faces`` ask for and pad them over the ``n_img`` images."""
        cfg = self.config
        dev = sizes.device
        if cfg.select == "largest":
            rank_key = (boxes[:, 2:] - boxes[:, :2]).prod(1)
        elif cfg.select == "center":
            centre = sizes[img].flip(1).to(boxes.dtype) / 2
            rank_key = -((boxes[:, :2] + boxes[:, 2:]) / 2 - centre).square().sum(1)
        else:
            rank_key = scores
        order = torch.argsort(rank_key, descending=True, stable=True)
        order = order[torch.argsort(img[order], stable=True)]
        img, boxes, scores, marks = img[order], boxes[order], scores[order], marks[order]
        counts = torch.bincount(img, minlength=n_img)
        rank = torch.arange(img.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[img]
        limit = 1 if cfg.select != "all" else (cfg.max_faces or None)
        if limit is not None:
            sel = rank < limit
            img, boxes, scores, marks, rank = img[sel], boxes[sel], scores[sel], marks[sel], rank[sel]
            counts = counts.clamp_max(limit)
        k = int(counts.max()) if n_img and img.numel() else 0
        out_boxes = boxes.new_zeros((n_img, k, 4))
        out_scores = boxes.new_zeros((n_img, k))
        out_marks = boxes.new_zeros((n_img, k, 5, 2))
        out_boxes[img, rank], out_scores[img, rank], out_marks[img, rank] = boxes, scores, marks
        return Detections(out_boxes, out_scores, out_marks, counts)
