"""Bytes -> RGB pixels, with every failure turned into a recorded reason instead of an exception.

Handles what real collections hold: grayscale, RGBA / palette PNG, 16-bit PNG (scaled to 8 bits), CMYK
JPEG, EXIF orientation (applied), and refuses zero-byte, truncated, non-image and oversized files before
they cost memory (the header is read first; a 50,000 x 50,000 header never gets decoded).
"""
from __future__ import annotations

import dataclasses
import io

import cv2
import numpy as np

from schemas import ERR_DECODE, ERR_EMPTY, ERR_NOT_IMAGE, ERR_TOO_LARGE, ERR_TOO_SMALL, ERR_TRUNCATED

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Limits applied while decoding.

    Attributes:
        max_pixels: images with more pixels (width * height from the header) are recorded as too_large.
        min_side: images with a smaller side are recorded as too_small (MTCNN needs 12 pixels).
    """

    max_pixels: int = 40_000_000
    min_side: int = 12


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One decoded file: ``image`` uint8[H, W, 3] RGB, or ``error`` (a schemas.ERR_* reason) + ``detail``."""

    image: np.ndarray | None
    error: str | None = None
    detail: str | None = None


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding pixels, or None if PIL does not know it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as exc:  # PIL refuses to even describe it: too large for us too
        dims = [int(t) for t in str(exc).split() if t.isdigit()]
        return (dims[0], 1) if dims else (1 << 31, 1)
    except Exception:  # noqa: BLE001 - unknown to PIL: let OpenCV try
        return None


def _looks_truncated(data: bytes) -> bool:
    if data[:3] == b"\xff\xd8\xff":                      # JPEG: an end-of-image marker near the end
        return b"\xff\xd9" not in data[-1024:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":                 # PNG: the IEND chunk
        return b"IEND" not in data[-64:]
    return False


def decode_image(data: bytes, config: DecodeConfig = DecodeConfig()) -> Decoded:
    """Decode one encoded image file.

    Args:
        data: the file's bytes.
        config: limits.

    Returns:
        :class:`Decoded` with uint8[H, W, 3] RGB pixels (EXIF orientation applied), or an error reason.
    """
    if len(data) == 0:
        return Decoded(None, ERR_EMPTY, "zero-byte file")
    size = _header_size(data)
    if size is not None and size[0] * size[1] > config.max_pixels:
        return Decoded(None, ERR_TOO_LARGE, f"{size[0]}x{size[1]} exceeds max_pixels={config.max_pixels}")
    if _looks_truncated(data):
        return Decoded(None, ERR_TRUNCATED, f"no end marker in {len(data)} bytes")
    try:
        # IMREAD_COLOR: gray/RGBA/CMYK -> 3 channels, 16-bit -> 8-bit, EXIF orientation applied.
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        return Decoded(None, ERR_DECODE, str(exc).strip().splitlines()[-1][:200])
    if bgr is None:
        if size is None:
            return Decoded(None, ERR_NOT_IMAGE, f"unrecognised format, starts with {data[:8]!r}")
        return Decoded(None, ERR_DECODE, f"{size[0]}x{size[1]} header but pixels failed to decode")
    h, w = bgr.shape[:2]
    if h * w > config.max_pixels:
        return Decoded(None, ERR_TOO_LARGE, f"{w}x{h} exceeds max_pixels={config.max_pixels}")
    if min(h, w) < config.min_side:
        return Decoded(None, ERR_TOO_SMALL, f"{w}x{h} below min_side={config.min_side}")
    return Decoded(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
