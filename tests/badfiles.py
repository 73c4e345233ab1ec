"""Odd and broken image files made from one real face photo (test helper)."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

import schemas as S


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92, **kw)
    return buf.getvalue()


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width x height, then a tiny IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def make_bad_files(face_jpg: Path, dest: Path, seed: int = 0) -> dict[str, tuple[str, str | None]]:
    """Write one file per odd case into ``dest``.

    Returns:
        file name -> (expected status "ok"/"processable"/"error", expected error reason or None).
        "processable" means decoded fine (ok or no_face both acceptable).
    """
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    data = face_jpg.read_bytes()
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    arr = np.asarray(rgb)
    files: dict[str, tuple[bytes, str, str | None]] = {
        "zero_bytes.jpg": (b"", "error", S.ERR_EMPTY),
        "truncated.jpg": (data[: len(data) // 2], "error", S.ERR_TRUNCATED),
        "random_bytes.jpg": (rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "error", S.ERR_NOT_IMAGE),
        "text_file.png": (b"this is not an image\n" * 20, "error", S.ERR_NOT_IMAGE),
        "huge_header.png": (_huge_png_header(60000, 60000), "error", S.ERR_TOO_LARGE),
        "tiny.png": (_png(arr[:8, :8, ::-1]), "error", S.ERR_TOO_SMALL),
        "grayscale.jpg": (_jpeg(rgb.convert("L")), "ok", None),
        "rgba.png": (_png(np.dstack([arr[:, :, ::-1], np.full(arr.shape[:2], 200, np.uint8)])), "ok", None),
        "sixteen_bit.png": (_png((arr[:, :, ::-1].astype(np.uint16) * 257)), "ok", None),
        "cmyk.jpg": (_jpeg(rgb.convert("CMYK")), "ok", None),
        "palette.png": (_pil_png(rgb.convert("P")), "ok", None),
    }
    # EXIF-rotated: pixels stored rotated 90 degrees clockwise, with orientation 8 saying "rotate back".
    rotated = rgb.transpose(Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[0x0112] = 8
    files["exif_rotated.jpg"] = (_jpeg(rotated, exif=exif.tobytes()), "ok", None)
    for name, (blob, _, _) in files.items():
        (dest / name).write_bytes(blob)
    return {name: (status, reason) for name, (_, status, reason) in files.items()}


def _pil_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
