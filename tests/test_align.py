"""Alignment: Umeyama recovers known similarity transforms; aligned LFW faces land on the template."""
import cv2
import numpy as np
import pytest
import torch

from tests.conftest import SAMPLE
from workers.faces.align import AlignConfig, align_faces, invert_affine, umeyama
from workers.faces.mtcnn import MTCNN, MTCNNConfig
from workers.faces.resample import pad_images


def _similarity(n, seed):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(n, generator=g, dtype=torch.float64) * 2 * np.pi
    s = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.2
    t = torch.rand(n, 2, generator=g, dtype=torch.float64) * 200 - 100
    r = torch.stack([torch.stack([ang.cos(), -ang.sin()], 1), torch.stack([ang.sin(), ang.cos()], 1)], 1)
    return torch.cat([s[:, None, None] * r, t[:, :, None]], 2)


def test_umeyama_recovers_known_transforms_exactly_and_under_noise():
    m = _similarity(64, 0)
    gen = torch.Generator().manual_seed(0)       # seeded: the global RNG made this test flaky
    src = torch.rand(64, 5, 2, dtype=torch.float64, generator=gen) * 100
    dst = src @ m[:, :, :2].transpose(1, 2) + m[:, None, :, 2]
    assert torch.allclose(umeyama(src, dst), m, atol=1e-9)
    noisy = dst + torch.randn(dst.shape, dtype=dst.dtype, generator=gen) * 0.01
    assert torch.allclose(umeyama(src, noisy), m, atol=0.05)
    assert torch.allclose(invert_affine(invert_affine(m)), m, atol=1e-9)


def test_umeyama_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"src must be \[N, P, 2\]"):
        umeyama(torch.zeros(5, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="dst must be"):
        umeyama(torch.zeros(2, 5, 2), torch.zeros(2, 4, 2))


def test_warp_of_a_template_recovers_the_transform():
    """Draw 5 dots on a canvas, warp the canvas by a known similarity, align the warped dots back."""
    cfg = AlignConfig()
    template = cfg.points().double()
    canvas = np.zeros((112, 112, 3), np.uint8)
    m = _similarity(1, 3)[0]
    m[:, :2] *= 1.5 / torch.linalg.det(m[:, :2]).abs().sqrt()      # scale 1.5
    m[:, 2] = torch.tensor([60.0, 40.0])
    for x, y in template.tolist():
        cv2.circle(canvas, (round(x), round(y)), 2, (255, 255, 255), -1)
    big = cv2.warpAffine(canvas, m.numpy(), (320, 320))
    marks = (template @ m[:, :2].T + m[:, 2]).float()[None]          # where the dots went
    batch, sizes = pad_images([big])
    crops, est = align_faces(batch.float(), sizes, torch.tensor([0]), marks, cfg)
    back = est[0].double()
    assert torch.allclose(back[:, :2] @ m[:, :2], torch.eye(2, dtype=torch.float64), atol=1e-4)
    # the aligned crop shows the dots where the template is
    gray = crops[0].numpy()[..., 0]
    for x, y in template.tolist():
        assert gray[round(y), round(x)] > 100


def test_aligned_lfw_faces_put_the_eyes_where_the_template_says():
    det = MTCNN.pretrained(MTCNNConfig(select="center"))
    imgs = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in sorted(SAMPLE.glob("*/*.jpg"))]
    batch, sizes = pad_images(imgs)
    d = det.detect([], batch=batch.float(), sizes=sizes)
    idx, _, _, marks = d.flat()
    crops, _ = align_faces(batch.float(), sizes, idx, marks, AlignConfig())
    assert crops.shape == (len(imgs), 112, 112, 3) and crops.dtype == torch.uint8
    # Detect again on the (padded) aligned crops: the eyes must sit on the template's eyes.
    padded = [cv2.copyMakeBorder(c.numpy(), 40, 40, 40, 40, cv2.BORDER_CONSTANT) for c in crops]
    again = MTCNN.pretrained(MTCNNConfig(select="largest")).detect(padded)
    assert (again.num_faces == 1).all()
    eyes = again.landmarks[:, 0, :2] - 40
    want = AlignConfig().points()[:2]
    err = (eyes - want).norm(dim=-1)
    # a 5-point least-squares fit plus MTCNN's own landmark noise: a few pixels, never more
    assert err.mean() < 3.0 and err.max() < 6.0, err


def test_margin_and_size_scale_the_template():
    base = AlignConfig().points()
    big = AlignConfig(size=224).points()
    assert torch.allclose((big + 0.5) / 2 - 0.5, base, atol=1e-4)
    framed = AlignConfig(margin=0.25).points()
    spread = (framed[1, 0] - framed[0, 0]) / (base[1, 0] - base[0, 0])
    assert abs(float(spread) - 1 / 1.5) < 1e-4
    assert abs(float(framed[:, 0].mean()) - float(base[:, 0].mean()) * (1 / 1.5) - 112 * (1 - 1 / 1.5) / 2) < 0.2
