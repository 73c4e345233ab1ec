"""Bytes -> RGB pixels, with every failure turned into a recorded reason instead of an exception.

Handles what real collections hold: grayscale, RGBA / palette PNG, 16-bit PNG (scaled to 8 bits), CMYK
JPEG, GIF (first frame), EXIF orientation (applied), and refuses zero-byte, truncated, non-image and
oversized files before they cost memory (the header is read first; a 50,000 x 50,000 header never gets
decoded). HEIC / HEIF / AVIF files are decoded where this install can, otherwise recorded as unsupported.
Error details never quote the file's bytes (a listed file may be anything, e.g. ``/etc/passwd``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import threading
import warnings

import cv2
import numpy as np

from schemas import (ERR_DECODE, ERR_EMPTY, ERR_NOT_IMAGE, ERR_TOO_LARGE, ERR_TOO_SMALL, ERR_TRUNCATED,
                     ERR_UNSUPPORTED)

# ISO base-media image formats: listed as inputs, decoded if OpenCV / Pillow here can, else unsupported_format.
HEIF_EXTENSIONS = (".heic", ".heif", ".avif")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", *HEIF_EXTENSIONS)
MAX_PIXELS_LIMIT = 1_000_000_000
# ftyp brands of HEIF files -> the format named in the error detail.
_HEIF_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC", b"hevc": "HEIC",
                b"hevx": "HEIC", b"hevm": "HEIC", b"hevs": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF",
                b"avif": "AVIF", b"avis": "AVIF"}
_PIL_LIMIT_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Limits applied while decoding.

    Attributes:
        max_pixels: images with more pixels (width * height from the header) are recorded as too_large.
        min_side: images with a smaller side are recorded as too_small (MTCNN needs 12 pixels).
    """

    max_pixels: int = 40_000_000
    min_side: int = 12

    def __post_init__(self):
        if not 1 <= self.max_pixels <= MAX_PIXELS_LIMIT:
            raise ValueError(f"max_pixels must be in [1, 1e9], got {self.max_pixels}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One decoded file: ``image`` uint8[H, W, 3] RGB, or ``error`` (a schemas.ERR_* reason) + ``detail``."""

    image: np.ndarray | None
    error: str | None = None
    detail: str | None = None


@contextlib.contextmanager
def _pil_size_limit_off():
    """Let ``Image.open`` describe images of any size (``max_pixels`` is our limit), then restore PIL's.

    Only ``Image.open`` checks ``Image.MAX_IMAGE_PIXELS``; the lock keeps threads of one process from
    restoring each other's value.
    """
    from PIL import Image

    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the file header without decoding pixels (any size, decompression bombs
    included), or None if PIL does not know the format."""
    from PIL import Image

    try:
        with _pil_size_limit_off():
            im = Image.open(io.BytesIO(data))
        with im:
            return im.size
    except Exception:  # noqa: BLE001 - unknown to PIL: let OpenCV try
        return None


def _pil_decode(data: bytes) -> np.ndarray | None:
    """uint8[H, W, 3] RGB of the first frame via Pillow (EXIF orientation applied), or None.

    The fallback for formats this OpenCV build cannot read (GIF before OpenCV 4.11, AVIF with Pillow's
    plugin). Called only after the header passed ``max_pixels``. Integer / float modes (16-bit TIFF) are
    refused rather than clipped to white.
    """
    from PIL import Image, ImageOps

    try:
        with _pil_size_limit_off():
            im = Image.open(io.BytesIO(data))
        with im:
            im.seek(0)
            if im.mode.startswith(("I", "F")):
                return None
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except Exception:  # noqa: BLE001 - recorded by the caller
        return None


def _heif_format(data: bytes) -> str | None:
    """"HEIC", "HEIF" or "AVIF" if the bytes start with an ISO-BMFF ``ftyp`` box of an image brand."""
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    end = min(max(int.from_bytes(data[:4], "big"), 16), len(data), 256)
    brands = [data[8:12]] + [data[i:i + 4] for i in range(16, end - 3, 4)]   # major, then compatible
    kinds = [_HEIF_BRANDS[b] for b in brands if b in _HEIF_BRANDS]
    return kinds[0] if kinds else None


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
        :class:`Decoded` with uint8[H, W, 3] RGB pixels (EXIF orientation applied; the first frame of an
        animation), or an error reason and a detail that names sizes and formats, never the file's bytes.
    """
    if len(data) == 0:
        return Decoded(None, ERR_EMPTY, "zero-byte file")
    size = _header_size(data)
    if size is not None and size[0] * size[1] > config.max_pixels:
        return Decoded(None, ERR_TOO_LARGE, f"{size[0]}x{size[1]} exceeds max_pixels={config.max_pixels}")
    if _looks_truncated(data):
        return Decoded(None, ERR_TRUNCATED, f"no end marker in {len(data)} bytes")
    rgb, cv_error = None, None
    try:
        # IMREAD_COLOR: gray/RGBA/CMYK -> 3 channels, 16-bit -> 8-bit, EXIF orientation applied.
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as exc:
        bgr, cv_error = None, str(exc).strip().splitlines()[-1][:200]
    if bgr is not None:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    elif size is not None:
        rgb = _pil_decode(data)
    if rgb is None:
        kind = _heif_format(data)
        if kind is not None:
            return Decoded(None, ERR_UNSUPPORTED, f"{kind} image ({len(data)} bytes): no {kind} decoder in this "
                                                  "install; convert it to JPEG or PNG")
        if cv_error is not None:
            return Decoded(None, ERR_DECODE, cv_error)
        if size is None:
            return Decoded(None, ERR_NOT_IMAGE, f"unrecognised format ({len(data)} bytes)")
        return Decoded(None, ERR_DECODE, f"{size[0]}x{size[1]} header but pixels failed to decode")
    h, w = rgb.shape[:2]
    if h * w > config.max_pixels:
        return Decoded(None, ERR_TOO_LARGE, f"{w}x{h} exceeds max_pixels={config.max_pixels}")
    if min(h, w) < config.min_side:
        return Decoded(None, ERR_TOO_SMALL, f"{w}x{h} below min_side={config.min_side}")
    return Decoded(rgb)
