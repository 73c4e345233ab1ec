"""Ray-side callables of the prepare pipeline: thin wrappers around decode, the face engine and storage.

Each shard travels as one row. ``decode_shard`` (CPU task) reads and decodes its files into one packed
pixel buffer; ``FaceActor`` (GPU or CPU actor) runs detect -> align -> embed on several shards at once and
returns each shard's tables; ``write_shard`` (CPU task) JPEG-encodes the crops and commits the shard.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

import schemas as S
from workers import dataset, reading, records
from workers.decode import DecodeConfig, decode_image

if TYPE_CHECKING:
    from workers.faces.config import EngineConfig

log = logging.getLogger(__name__)


def decode_shard(row: dict, *, storage_options: dict | None, decode: DecodeConfig) -> dict:
    """Read and decode a shard's files.

    Args:
        row: shard, uris, identities, fingerprints (lists).
        storage_options: fsspec options.
        decode: decode limits.

    Returns:
        The row plus heights, widths, errors, details (per file) and pixels: the RGB bytes of the decoded
        images concatenated in order (image i is heights[i] * widths[i] * 3 bytes; failed files add none).
    """
    uris = list(row["uris"])
    blobs = reading.read_many(uris, storage_options)
    heights, widths, errors, details, parts = [], [], [], [], []
    for blob in blobs:  # per file by nature: each is its own compressed stream
        if isinstance(blob, Exception):
            res_img, err, detail = None, reading.error_reason(blob), f"{type(blob).__name__}: {blob}"[:300]
        else:
            res = decode_image(blob, decode)
            res_img, err, detail = res.image, res.error, res.detail
        h, w = (res_img.shape[:2] if res_img is not None else (0, 0))
        heights.append(h), widths.append(w), errors.append(err), details.append(detail)
        if res_img is not None:
            parts.append(np.ascontiguousarray(res_img).reshape(-1))
    pixels = np.concatenate(parts).tobytes() if parts else b""
    return {**row, "uris": uris, "heights": heights, "widths": widths, "errors": errors, "details": details,
            "pixels": pixels}


def unpack_images(pixels: bytes, heights, widths) -> list[np.ndarray]:
    """Views uint8[H, W, 3] into a packed pixel buffer, for the images with H > 0."""
    buf = np.frombuffer(pixels, np.uint8)
    out, offset = [], 0
    for h, w in zip(heights, widths):
        if h:
            n = int(h) * int(w) * 3
            out.append(buf[offset:offset + n].reshape(int(h), int(w), 3))
            offset += n
    return out


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    """What a face actor loads and how it runs.

    Attributes:
        engine: the face stage settings (None: ``EngineConfig()``).
        embedder: registry name or exported directory.
        device: "auto" (CUDA if the actor has a GPU), "cuda" or "cpu".
        run_id: recorded in every row.
        settings: digest of the run's settings, recorded in every row.
        max_pixels_per_pass: images of a call are processed in passes of at most this many pixels.
        torch_threads: intra-op threads on CPU (0: leave torch's default).
    """

    engine: EngineConfig | None = None
    embedder: str = "sface"
    device: str = "auto"
    run_id: str = ""
    settings: str = ""
    max_pixels_per_pass: int = 16 * 1000 * 1000
    torch_threads: int = 0


class FaceActor:
    """Ray Data callable class: loads MTCNN and the embedder once, then processes batches of shards."""

    def __init__(self, config: ActorConfig):
        import torch

        from workers.faces.embedders import load_embedder
        from workers.faces.engine import EngineConfig, FaceEngine
        from workers.faces.mtcnn import MTCNN

        if config.device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            device = config.device
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.embedder = load_embedder(config.embedder, device)
        engine = config.engine or EngineConfig()
        detector = MTCNN.pretrained(engine.mtcnn, device)
        self.engine = FaceEngine(detector, self.embedder.module, engine)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Process shards.

        Args:
            batch: columns of decoded shard rows (see :func:`decode_shard`).

        Returns:
            Columns of :func:`shard_row`, one row per shard.
        """
        n_shards = len(batch["shard"])
        per_shard = [unpack_images(batch["pixels"][i], batch["heights"][i], batch["widths"][i])
                     for i in range(n_shards)]
        images = [im for ims in per_shard for im in ims]
        results, failed = self._process(images)
        owner = np.repeat(np.arange(n_shards), [len(ims) for ims in per_shard])
        first = np.concatenate([[0], np.cumsum([len(ims) for ims in per_shard])])
        rows = [self._shard_tables(batch, i, results, failed, owner, first)   # a few shards per call
                for i in range(n_shards)]
        return {key: np.array([r[key] for r in rows], dtype=object if key != "crop_size" else np.int64)
                for key in rows[0]} if rows else {}

    def _process(self, images: list[np.ndarray]):
        """Run the engine in passes bounded by pixels; a failing pass is retried image by image."""
        from workers.faces.engine import FaceResults

        passes, cur, cur_px = [], [], 0
        for i, im in enumerate(images):
            px = im.shape[0] * im.shape[1]
            if cur and cur_px + px > self.config.max_pixels_per_pass:
                passes.append(cur)
                cur, cur_px = [], 0
            cur.append(i)
            cur_px += px
        if cur:
            passes.append(cur)
        parts, failed = [], {}
        for idx in passes:
            try:
                parts.append((idx, self.engine.process([images[i] for i in idx])))
            except Exception as exc:  # noqa: BLE001 - isolate the image(s) at fault, record, go on
                if len(idx) == 1:
                    failed[idx[0]] = f"{type(exc).__name__}: {exc}"[:300]
                    continue
                log.warning("face pass of %d images failed (%s); retrying one by one", len(idx), exc)
                for i in idx:
                    try:
                        parts.append(([i], self.engine.process([images[i]])))
                    except Exception as exc1:  # noqa: BLE001
                        failed[i] = f"{type(exc1).__name__}: {exc1}"[:300]
        merged = _merge_results(parts, len(images), FaceResults, self.embedder.spec.embedding_dim,
                                self.engine.config.align.size)
        return merged, failed

    def _shard_tables(self, batch, i, res, failed, owner, first):
        row = {key: batch[key][i] for key in ("shard", "uris", "identities", "fingerprints", "heights", "widths")}
        errors, details = list(batch["errors"][i]), list(batch["details"][i])
        decoded = np.nonzero(np.asarray(row["heights"], np.int64) > 0)[0]  # shard-local index per decoded image
        lo, hi = first[i], first[i + 1]
        for g in range(lo, hi):
            if g in failed:
                errors[decoded[g - lo]] = S.ERR_PROCESS
                details[decoded[g - lo]] = failed[g]
        sel = (res.image_index >= lo) & (res.image_index < hi)
        mine = dataclasses.replace(
            res, num_faces=res.num_faces[lo:hi], image_index=res.image_index[sel] - lo, boxes=res.boxes[sel],
            scores=res.scores[sel], landmarks=res.landmarks[sel], crops=res.crops[sel],
            embeddings=res.embeddings[sel])
        return face_shard_row({**row, "errors": errors, "details": details}, mine, self.embedder.spec,
                              self.config.settings, self.config.run_id)


def face_shard_row(row: Mapping, res, spec, settings: str, run_id: str) -> dict:
    """A decoded shard and the face engine's results on it, as the row the writer commits.

    Args:
        row: the shard's shard, uris, identities, fingerprints, heights, widths, errors, details (per file,
            as :func:`decode_shard` returns them; height 0 = not decoded).
        res: ``FaceResults`` of the shard's decoded images, in order (``image_index`` counts decoded images).
        spec: the embedder's ``ModelSpec`` (name, version).
        settings: digest of the run's settings.
        run_id: recorded in every row.

    Returns:
        The :func:`shard_row` of the shard.
    """
    uris = list(row["uris"])
    heights = np.asarray(row["heights"], np.int64)
    decoded = np.nonzero(heights > 0)[0]
    num_faces = np.zeros(len(uris), np.int32)
    num_faces[decoded] = res.num_faces
    identities = list(row["identities"])
    images = records.images_table(
        shard=row["shard"], uris=uris, identities=identities, fingerprints=list(row["fingerprints"]),
        widths=np.asarray(row["widths"], np.int64), heights=heights, errors=list(row["errors"]),
        details=list(row["details"]), num_faces=num_faces, settings=settings, run_id=run_id)
    faces = records.faces_table(
        shard=row["shard"], uris=uris, identities=identities, image_index=decoded[res.image_index],
        boxes=res.boxes, scores=res.scores, landmarks=res.landmarks, crops=None, embeddings=res.embeddings,
        embedder=spec.name, embedder_version=spec.version, run_id=run_id)
    return shard_row(row["shard"], images, faces, res.crops)


def _merge_results(parts, n_images, cls, dim, size):
    """Concatenate per-pass results, re-basing image indices onto the call's image order."""
    num_faces = np.zeros(n_images, np.int32)
    fields = {k: [] for k in ("image_index", "boxes", "scores", "landmarks", "crops", "embeddings")}
    for idx, r in sorted(parts, key=lambda p: p[0][0]):
        idx = np.asarray(idx)
        num_faces[idx] = r.num_faces
        fields["image_index"].append(idx[r.image_index])
        for k in ("boxes", "scores", "landmarks", "crops", "embeddings"):
            fields[k].append(getattr(r, k))
    empty = {"image_index": np.zeros(0, np.int64), "boxes": np.zeros((0, 4), np.float32),
             "scores": np.zeros(0, np.float32), "landmarks": np.zeros((0, 5, 2), np.float32),
             "crops": np.zeros((0, size, size, 3), np.uint8), "embeddings": np.zeros((0, dim), np.float32)}
    merged = {k: (np.concatenate(v) if v else empty[k]) for k, v in fields.items()}
    return cls(num_faces=num_faces, **merged)


def shard_row(shard: str, images, faces, crops: np.ndarray) -> dict:
    """A shard between the face actor and the writer: its image rows and its face rows (without crops) as
    Arrow IPC, and the faces' raw aligned crops beside them.

    Args:
        shard: shard key.
        images: ``records.images_table`` rows.
        faces: ``records.faces_table(crops=None)`` rows.
        crops: uint8[F, S, S, 3] RGB, one per face row, in order.

    Returns:
        {shard, images_ipc, faces_ipc, crops (the pixels' bytes), crop_size (S)}.
    """
    crops = np.ascontiguousarray(crops, dtype=np.uint8)
    if crops.ndim != 4 or crops.shape[0] != faces.num_rows:
        raise ValueError(f"crops must be uint8[{faces.num_rows}, S, S, 3], got {list(crops.shape)}")
    return {"shard": shard, "images_ipc": records.table_to_ipc(images), "faces_ipc": records.table_to_ipc(faces),
            "crops": crops.tobytes(), "crop_size": int(crops.shape[1])}


def write_shard(row: dict, *, output: str, storage_options: dict | None, crop_quality: int) -> dict:
    """Encode crops and commit one shard (one Delta transaction replacing every row of its images);
    returns the shard's summary row."""
    images = records.table_from_ipc(row["images_ipc"])
    size = int(row["crop_size"])
    pixels = np.frombuffer(row["crops"], np.uint8).reshape(-1, size, size, 3)
    faces = records.with_crops(records.table_from_ipc(row["faces_ipc"]), records.encode_crops(pixels, crop_quality))
    status = Counter(images.column(S.STATUS).to_pylist())
    reasons = Counter(e for e in images.column(S.ERROR).to_pylist() if e)
    dataset.commit_records(output, records.records_table(images, faces), storage_options)
    boxes = faces.column(S.BOX).combine_chunks().flatten().to_numpy().reshape(-1, 4)
    return {
        "shard": row["shard"], "images": images.num_rows, "faces": faces.num_rows,
        "ok": status.get(S.STATUS_OK, 0), "no_face": status.get(S.STATUS_NO_FACE, 0),
        "error": status.get(S.STATUS_ERROR, 0), "reasons": json.dumps(dict(reasons)),
        "face_sizes": np.sqrt(np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), 1)).astype(np.float32),
        "face_scores": faces.column(S.SCORE).to_numpy().astype(np.float32), "written_at": time.time(),
        "pid": os.getpid(),
    }
