"""The benchmark's seeded, in-memory workloads: LFW images and 1000 x 1000 mosaics of them."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np

MOSAIC_GRID = 4
TILE = 250


@dataclasses.dataclass
class Workload:
    """Encoded images of one workload.

    Attributes:
        name: "lfw" or "mosaic".
        uris: one name per image (LFW: the file path; mosaic: a synthetic name).
        blobs: the encoded (JPEG) bytes of each image.
        sources: per image, the LFW files it was made of (one for lfw, 16 for a mosaic).
    """

    name: str
    uris: list[str]
    blobs: list[bytes]
    sources: list[list[str]]


def lfw_files(root: Path) -> list[Path]:
    files = sorted(root.rglob("*.jpg"))
    if not files:
        raise SystemExit(f"error: no LFW .jpg files under {str(root)!r} (use --lfw PATH)")
    return files


def lfw_workload(files: list[Path], n: int, seed: int) -> Workload:
    """N random LFW files, read into memory."""
    if n > len(files):
        raise SystemExit(f"error: --images {n} but only {len(files)} LFW files")
    chosen = random.Random(seed).sample(files, n)
    return Workload("lfw", [str(p) for p in chosen], [p.read_bytes() for p in chosen],
                    [[str(p)] for p in chosen])


def mosaic_workload(files: list[Path], n: int, seed: int, quality: int = 95) -> Workload:
    """N 1000 x 1000 mosaics, each a 4 x 4 grid of 250 x 250 LFW images, JPEG-encoded in memory."""
    import cv2

    rng = random.Random(seed + 1)
    side = MOSAIC_GRID * TILE
    uris, blobs, sources = [], [], []
    for m in range(n):
        tiles = rng.sample(files, MOSAIC_GRID * MOSAIC_GRID)
        canvas = np.zeros((side, side, 3), np.uint8)
        for k, path in enumerate(tiles):
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise SystemExit(f"error: cannot decode LFW file {str(path)!r}")
            if bgr.shape[:2] != (TILE, TILE):
                bgr = cv2.resize(bgr, (TILE, TILE), interpolation=cv2.INTER_AREA)
            r, c = divmod(k, MOSAIC_GRID)
            canvas[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = bgr
        ok, enc = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise SystemExit("error: cv2.imencode failed on a mosaic")
        uris.append(f"mosaic-{seed}-{m:05d}.jpg")
        blobs.append(enc.tobytes())
        sources.append([str(p) for p in tiles])
    return Workload("mosaic", uris, blobs, sources)


def same_shape_batches(images: list[np.ndarray], batch: int) -> list[list[int]]:
    """Indices of the images cut into batches of at most ``batch`` images of one shape (the anchor needs it)."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape, []).append(i)
    return [idx[s:s + batch] for idx in groups.values() for s in range(0, len(idx), batch)]


def input_folder(work: Workload, tmp: Path) -> str:
    """A folder of the workload's files (``<identity>/<file>`` for lfw) that run_prepare can list.

    The files are written from memory rather than listed in a manifest: a manifest carries no fingerprints,
    and ``plan_shards`` cannot key such shards under pandas 3 (``astype(str)`` keeps None as NaN).
    """
    folder = tmp / f"{work.name}_inputs"
    for uri, blob in zip(work.uris, work.blobs):
        rel = Path(Path(uri).parent.name, Path(uri).name) if work.name == "lfw" else Path(uri)
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(blob)
    return str(folder)
