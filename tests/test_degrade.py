"""Capture-condition degradations: OpenCV / formula references, band limits, mask geometry, augmentation
determinism and probabilities, per-image determinism of evaluation domains, parser errors. No Ray."""
import dataclasses

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import SAMPLE
from workers.faces import degrade as D
from workers.faces.align import AlignConfig
from workers.training.augment import AugmentConfig, augment_batch, parse_augment


@pytest.fixture(scope="module")
def faces() -> np.ndarray:
    """uint8[8, 112, 112, 3] RGB: the central 130 px of the committed LFW samples, resized to 112."""
    files = sorted(SAMPLE.glob("*/*.jpg"))
    assert len(files) == 8, f"expected 8 sample JPEGs under {SAMPLE}, found {len(files)}"
    return np.stack([cv2.resize(cv2.imread(str(f))[60:190, 60:190, ::-1], (112, 112),
                                interpolation=cv2.INTER_AREA) for f in files])


def _noise(n, s, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8)


OPS = {"lowres": lambda x: D.lowres(x, 16), "jpeg": lambda x: D.jpeg(x, 30), "gray": D.gray,
       "blur": lambda x: D.blur(x, 1.5), "mask": D.mask}


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("n, s", [(3, 112), (2, 64), (0, 112)])
def test_ops_keep_shape_dtype_and_leave_the_input_alone(name, n, s):
    x = _noise(n, s)
    before = x.copy()
    out = OPS[name](x)
    assert out.shape == x.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(x, before)
    if n:
        assert not np.array_equal(out, x)


def test_ops_reject_bad_crops():
    with pytest.raises(ValueError, match="uint8"):
        D.gray(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[N, S, S, 3\], got \(1, 8, 9, 3\)"):
        D.gray(np.zeros((1, 8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match="px must be >= 2, got 1"):
        D.lowres(_noise(2, 32), [4, 1])
    with pytest.raises(ValueError, match=r"quality must be in \[1, 100\]"):
        D.jpeg(_noise(1, 32), 101)
    with pytest.raises(ValueError, match=r"sigma must be a scalar or \[2\]"):
        D.blur(_noise(2, 32), [1.0, 1.0, 1.0])


def _bilinear_projector(px, s):
    """float64[s, s]: projection onto images that are bilinear (align_corners=False) upsamples of px."""
    a = F.interpolate(torch.eye(px, dtype=torch.float64)[None], size=s, mode="linear", align_corners=False)[0].T
    return a @ torch.linalg.pinv(a)


def test_lowres_has_no_detail_above_its_band(faces):
    p = _bilinear_projector(16, 112)

    def off_band(images):   # mean |x - P x P^T|: 0 iff every channel is an upsampled 16 x 16 image
        x = torch.from_numpy(images).double().permute(0, 3, 1, 2)
        return (x - p @ x @ p.T).abs().mean().item()

    low = D.lowres(faces, 16)
    assert off_band(low) < 0.5                       # only uint8 rounding is left
    assert off_band(faces) > 4 and off_band(D.lowres(faces, 24)) > 1
    # A second pass changes the result far less than the first changed the face.
    again = np.abs(D.lowres(low, 16).astype(float) - low).mean()
    assert again < 0.5 * np.abs(low.astype(float) - faces).mean()


def test_lowres_downscale_is_antialiased_and_close_to_opencv_area(faces):
    stripes = np.zeros((1, 112, 112, 3), np.uint8)
    stripes[:, :, ::2] = 255                         # 2 px period: must average out, not alias
    out = D.lowres(stripes, 16)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 4
    ref = np.stack([cv2.resize(cv2.resize(f, (16, 16), interpolation=cv2.INTER_AREA), (112, 112),
                               interpolation=cv2.INTER_LINEAR) for f in faces])
    assert np.abs(D.lowres(faces, 16).astype(float) - ref).mean() < 3


def test_per_image_parameters_match_one_call_per_image(faces):
    px, q, sigma = [14, 40, 14, 20, 33, 16, 16, 25], np.arange(10, 90, 10), np.linspace(0.5, 2.5, 8)
    colors = np.arange(24, dtype=np.uint8).reshape(8, 3) * 10
    cases = [(D.lowres, px), (D.jpeg, q), (D.blur, sigma), (D.mask, colors)]
    for op, values in cases:
        batched = op(faces, values)
        for i in range(len(faces)):
            np.testing.assert_array_equal(batched[i], op(faces[i:i + 1], values[i])[0], err_msg=op.__name__)


@pytest.mark.parametrize("quality", [10, 55, 95])
def test_jpeg_equals_opencv_encode_decode(faces, quality):
    out = D.jpeg(faces, quality)
    for face, got in zip(faces, out):
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(face, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        np.testing.assert_array_equal(got, cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    assert not np.array_equal(out, faces)


def test_gray_is_bt601_luma_in_three_channels(faces):
    out = D.gray(faces)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    rgb = faces.astype(np.float64)
    luma = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert np.abs(out[..., 0] - luma).max() <= 1.0
    ref = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in faces])
    assert np.abs(out[..., 0].astype(int) - ref).max() <= 1


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7, 2.5])
def test_blur_matches_opencv_gaussian(faces, sigma):
    out = D.blur(faces, sigma).astype(int)
    ref = np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in faces]).astype(int)
    r = 10
    assert np.abs(out - ref)[:, r:-r, r:-r].max() <= 1
    assert np.abs(out - ref).mean() < 0.1             # borders reflect like OpenCV's default too
    assert np.abs(out - faces).mean() > 0.5            # and it did blur


def test_blur_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma must be > 0, got 0.0"):
        D.blur(_noise(2, 32), [1.0, 0.0])
    with pytest.raises(ValueError, match="radius 18 >= crop size 16"):
        D.blur(_noise(1, 16), 6.0)


@pytest.mark.parametrize("size", [112, 96, 160])
def test_mask_covers_the_mouth_and_spares_the_eyes(faces, size):
    crops = np.stack([cv2.resize(f, (size, size)) for f in faces])
    color = (255, 0, 255)
    out = D.mask(crops, color)
    pts = AlignConfig(size=size).points().numpy()
    changed = (out != crops).any(-1)
    is_color = (out == color).all(-1)
    for x, y in (pts[3], pts[4], (pts[3] + pts[4]) / 2):
        assert is_color[:, round(y), round(x)].all(), (x, y)
    for x, y in pts[:2]:
        np.testing.assert_array_equal(out[:, round(y), round(x)], crops[:, round(y), round(x)])
    eye_line = int(np.ceil(pts[:2, 1].max()))
    assert not changed[:, :eye_line + 1].any()
    assert not changed[:, int(np.ceil(pts[2, 1])) - 1].any()          # the nose tip row too
    region = D.mask_region(size)                                       # the same region in every crop
    assert (out[:, region] == color).all() and not changed[:, ~region].any()
    assert 0.12 < region.mean() < 0.3 and region[-1, size // 2]        # reaches the bottom edge


def test_mask_rejects_bad_colors():
    with pytest.raises(ValueError, match=r"color must be RGB 0..255 \[3\] or \[2, 3\], got \[300, 0, 0\]"):
        D.mask(_noise(2, 32), (300, 0, 0))
    with pytest.raises(ValueError, match="color must be"):
        D.mask(_noise(2, 32), np.zeros((3, 3)))


ALL = AugmentConfig(lowres=0.5, jpeg=0.5, gray=0.5, blur=0.5, mask=0.5)


def test_augment_is_deterministic_in_seed_epoch_step_rank(faces):
    batch = np.concatenate([faces] * 4)
    a = augment_batch(batch, ALL, seed=7, epoch=1, step=3, rank=0)
    np.testing.assert_array_equal(a, augment_batch(batch, ALL, seed=7, epoch=1, step=3, rank=0))
    for other in ({"step": 4}, {"epoch": 2}, {"rank": 1}, {"seed": 8}):
        keys = {"seed": 7, "epoch": 1, "step": 3, "rank": 0, **other}
        assert not np.array_equal(a, augment_batch(batch, ALL, **keys)), other
    np.testing.assert_array_equal(augment_batch(batch, AugmentConfig(), 7, 1, 3, 0), batch)
    assert (augment_batch(faces, dataclasses.replace(ALL, gray=1.0), 7, 1, 3, 0) != faces).any((1, 2, 3)).all()
    with pytest.raises(ValueError, match=r"non-negative ints, got \(7, -1, 3, 0\)"):
        augment_batch(batch, ALL, 7, -1, 3, 0)


@pytest.mark.parametrize("name", ["lowres", "jpeg", "gray", "blur", "mask"])
def test_augment_probability_is_per_image(name):
    n, p = 2000, 0.3
    x = _noise(n, 48, seed=1)
    out = augment_batch(x, AugmentConfig(**{name: p}), seed=0, epoch=0, step=0, rank=0)
    frac = (out != x).any((1, 2, 3)).mean()
    se = np.sqrt(p * (1 - p) / n)
    assert abs(frac - p) < 4 * se, (name, frac)


def test_augment_order_masks_before_gray(faces):
    red = AugmentConfig(mask=1.0, gray=1.0, mask_colors=((200, 30, 30),), mask_jitter=0)
    out = augment_batch(faces, red, 0, 0, 0, 0)
    region = D.mask_region(112)
    luma = round(0.299 * 200 + 0.587 * 30 + 0.114 * 30)
    assert (out[:, region] == luma).all()


def test_parse_augment_and_its_errors():
    cfg = parse_augment("lowres=0.5,jpeg=0.3,gray=0.2,mask=0.3,blur=0.2")
    assert cfg == AugmentConfig(lowres=0.5, jpeg=0.3, gray=0.2, mask=0.3, blur=0.2)
    assert parse_augment(" gray = 1 ") == AugmentConfig(gray=1.0)
    assert parse_augment("") == parse_augment("none") == AugmentConfig() and not AugmentConfig().enabled
    base = AugmentConfig(jpeg_quality=(30, 40))
    assert parse_augment("jpeg=1", base) == dataclasses.replace(base, jpeg=1.0)
    for text, message in [("sharpen=0.1", "unknown augmentation 'sharpen'"),
                          ("gray=1.5", r"probability of 'gray' must be in \[0, 1\], got '1.5'"),
                          ("gray=-0.1", "got '-0.1'"), ("gray=abc", "must be a number, got 'abc'"),
                          ("gray", "malformed augment item 'gray'"), ("gray=0.1,,", "malformed augment item ''"),
                          ("gray=0.1,gray=0.2", "'gray' repeated"),
                          ("gray=0.2@1-2", "only lowres, jpeg, blur take a range"),
                          ("lowres=0.5@12", "range of 'lowres' must be lo-hi"),
                          ("lowres=0.5@1.5-3", "range of 'lowres' must be lo-hi"),
                          ("lowres=0.5@32-12", r"lowres_px must be \(lo, hi\)")]:
        with pytest.raises(ValueError, match=message):
            parse_augment(text)


def test_parse_augment_sets_parameter_ranges():
    cfg = parse_augment("lowres=0.7@12-32,jpeg=0.3@5-20,blur=0.1@0.5-1.5,gray=0.2")
    assert cfg == AugmentConfig(lowres=0.7, jpeg=0.3, blur=0.1, gray=0.2, lowres_px=(12, 32),
                                jpeg_quality=(5, 20), blur_sigma=(0.5, 1.5))


def test_augment_config_rejects_bad_fields():
    for kwargs, message in [({"mask": 2.0}, r"probability mask must be in \[0, 1\], got 2.0"),
                            ({"lowres_px": (40, 14)}, r"lowres_px must be \(lo, hi\).*got \(40, 14\)"),
                            ({"jpeg_quality": (0, 50)}, "jpeg_quality"), ({"blur_sigma": (0.0, 1.0)}, "blur_sigma"),
                            ({"mask_colors": ((1, 2),)}, "mask_colors"), ({"mask_jitter": -1}, "mask_jitter")]:
        with pytest.raises(ValueError, match=message):
            AugmentConfig(**kwargs)


def test_parse_degrade_specs_and_errors():
    assert D.parse_degrade("lowres:16") == (("lowres", 16),)
    assert D.parse_degrade("jpeg:10+gray") == (("jpeg", 10), ("gray", None))
    assert D.parse_degrade("mask") == (("mask", None),)
    assert D.parse_degrade("mask:random") == (("mask", "random"),)
    assert D.parse_degrade("blur:2") == (("blur", 2.0),)
    assert D.parse_degrade("clean") == ()
    for spec in ("lowres:16", "jpeg:10+gray", "mask:random+blur:1.5", "clean"):
        assert D.format_degrade(D.parse_degrade(spec)) == spec
    for spec, message in [("sharpen:2", "unknown degradation 'sharpen'"), ("lowres", "'lowres' needs a parameter"),
                          ("lowres:1", "bad parameter '1' for degradation 'lowres'"),
                          ("lowres:16.5", "bad parameter '16.5'"), ("jpeg:0", "bad parameter '0'"),
                          ("jpeg:abc", "bad parameter 'abc'"), ("blur:-1", "bad parameter '-1'"),
                          ("blur:nan", "bad parameter 'nan'"), ("gray:3", "bad parameter '3' for degradation 'gray'"),
                          ("mask:blue", "bad parameter 'blue'"), ("gray+gray", "'gray' repeated"),
                          ("clean+gray", "unknown degradation 'clean'"), ("jpeg:10+", "unknown degradation ''"),
                          ("", "non-empty string")]:
        with pytest.raises(ValueError, match=message):
            D.parse_degrade(spec)


def test_degrade_is_deterministic_per_image(faces):
    keys = [f"img{i}" for i in range(8)]
    spec = "mask:random+blur:1.5+lowres:20+jpeg:30"
    full = D.degrade(faces, spec, keys)
    order = np.array([5, 2, 7, 0])
    part = D.degrade(faces[order], spec, [keys[i] for i in order])
    np.testing.assert_array_equal(part, full[order])
    other = np.concatenate([faces[order], _noise(3, 112)])
    np.testing.assert_array_equal(D.degrade(other, spec, [keys[i] for i in order] + ["a", "b", "c"])[:4], full[order])
    colors = {tuple(c) for c in D.key_colors(keys)}
    assert len(colors) > 1 and colors <= set(D.MASK_COLORS)
    for key in ("x", "y"):                  # the key drives the randomness, not the pixels or the position
        expected = D.mask(faces[:1], D.key_colors([key]))
        np.testing.assert_array_equal(D.degrade(faces[:1], "mask:random", [key]), expected)


def test_degrade_composes_the_ops_in_spec_order(faces):
    keys = [str(i) for i in range(8)]
    np.testing.assert_array_equal(D.degrade(faces, "clean", keys), faces)
    np.testing.assert_array_equal(D.degrade(faces, "jpeg:10+gray", keys), D.gray(D.jpeg(faces, 10)))
    np.testing.assert_array_equal(D.degrade(faces, D.parse_degrade("gray+jpeg:10"), keys), D.jpeg(D.gray(faces), 10))
    np.testing.assert_array_equal(D.degrade(faces, "mask", keys), D.mask(faces, D.MASK_GREY))
    np.testing.assert_array_equal(D.degrade(faces, "lowres:16+blur:2", keys), D.blur(D.lowres(faces, 16), 2.0))
    with pytest.raises(ValueError, match=r"one id per crop \(8\), got 7"):
        D.degrade(faces, "gray", keys[:7])
