"""Decoding of odd and broken files: processed where sensible, otherwise a recorded reason."""
from pathlib import Path

import numpy as np
import pytest

import schemas as S
from tests.badfiles import make_bad_files
from workers.decode import DecodeConfig, decode_image

FACE = Path(__file__).parent / "data" / "sample" / "George_W_Bush" / "George_W_Bush_0001.jpg"


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return d, make_bad_files(FACE, d)


def test_each_odd_file_decodes_or_names_its_reason(bad_dir):
    d, expected = bad_dir
    for name, (status, reason) in expected.items():
        res = decode_image((d / name).read_bytes())
        if status == "error":
            assert res.image is None and res.error == reason, (name, res.error, res.detail)
            assert res.detail, name
        else:
            assert res.error is None, (name, res.error, res.detail)
            assert res.image.dtype == np.uint8 and res.image.ndim == 3 and res.image.shape[2] == 3, name


def test_exif_orientation_is_applied(bad_dir):
    d, _ = bad_dir
    upright = decode_image(FACE.read_bytes()).image
    fixed = decode_image((d / "exif_rotated.jpg").read_bytes()).image
    assert fixed.shape == upright.shape
    assert np.abs(fixed.astype(int) - upright.astype(int)).mean() < 6  # same picture, JPEG re-encoded


def test_sixteen_bit_and_gray_keep_the_picture(bad_dir):
    d, _ = bad_dir
    upright = decode_image(FACE.read_bytes()).image.astype(int)
    sixteen = decode_image((d / "sixteen_bit.png").read_bytes()).image.astype(int)
    assert np.abs(sixteen - upright).max() <= 1
    gray = decode_image((d / "grayscale.jpg").read_bytes()).image
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_max_pixels_limit_uses_the_header():
    res = decode_image(FACE.read_bytes(), DecodeConfig(max_pixels=100 * 100))
    assert res.error == S.ERR_TOO_LARGE and "250x250" in res.detail
