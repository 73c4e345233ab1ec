"""Batched NMS and resampling against slow, obvious references (per group loops, OpenCV)."""
import cv2
import numpy as np
import pytest
import torch

from workers.faces.nms import batched_nms
from workers.faces.resample import area_weights, box_to_affine, pad_images, resize_area, sample_patches


def _slow_nms(boxes, scores, groups, thr, mode):
    keep = []
    for g in np.unique(groups):
        idx = [i for i in np.argsort(-scores, kind="stable") if groups[i] == g]
        kept = []
        for i in idx:
            ok = True
            for j in kept:
                xx1, yy1 = max(boxes[i, 0], boxes[j, 0]), max(boxes[i, 1], boxes[j, 1])
                xx2, yy2 = min(boxes[i, 2], boxes[j, 2]), min(boxes[i, 3], boxes[j, 3])
                inter = max(0.0, xx2 - xx1) * max(0.0, yy2 - yy1)
                ai = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
                aj = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
                ov = inter / (ai + aj - inter) if mode == "union" else inter / min(ai, aj)
                if ov > thr:
                    ok = False
                    break
            if ok:
                kept.append(i)
        keep += kept
    return keep


@pytest.mark.parametrize("mode", ["union", "min"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_nms_equals_greedy_loop(mode, seed):
    rng = np.random.default_rng(seed)
    n = 300
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(5, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    groups = rng.integers(0, 7, n)
    got = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups), 0.4, mode)
    want = _slow_nms(boxes, scores, groups, 0.4, mode)
    assert sorted(got.tolist()) == sorted(want)
    # Ordered by group, then score descending.
    g = groups[got.numpy()]
    assert (np.diff(g) >= 0).all()


def test_batched_nms_small_chunks_and_cap():
    rng = np.random.default_rng(5)
    n = 200
    xy = rng.uniform(0, 50, (n, 2))
    boxes = torch.from_numpy(np.concatenate([xy, xy + 20], 1).astype(np.float32))
    scores = torch.from_numpy(rng.uniform(0, 1, n).astype(np.float32))
    groups = torch.from_numpy(rng.integers(0, 5, n))
    full = batched_nms(boxes, scores, groups, 0.5)
    chunked = batched_nms(boxes, scores, groups, 0.5, max_elements=1)
    assert full.tolist() == chunked.tolist()
    capped = batched_nms(boxes, scores, groups, 1.0, max_per_group=3)  # threshold 1: nothing suppressed
    assert torch.bincount(groups[capped]).tolist() == [3] * 5
    assert batched_nms(boxes[:0], scores[:0], groups[:0], 0.5).numel() == 0


def test_area_resize_matches_opencv_inter_area():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (97, 131, 3)).astype(np.float32)
    for out_h, out_w in [(48, 66), (30, 41), (12, 12), (97, 131)]:
        ref = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
        got = resize_area(torch.from_numpy(img).permute(2, 0, 1)[None], torch.tensor([[97, 131]]),
                          torch.tensor([[out_h, out_w]]))[0].permute(1, 2, 0).numpy()
        assert np.abs(got - ref).max() < 1e-2, (out_h, out_w, np.abs(got - ref).max())


def test_banded_resize_equals_dense_product():
    """The banded tiles compute exactly the dense area-weight product, for mixed sizes, shrinking and
    enlarging, tiles smaller and larger than the outputs."""
    rng = np.random.default_rng(3)
    shapes = [(250, 250), (97, 131), (13, 300), (301, 12), (64, 64)]
    imgs = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in shapes]
    batch, sizes = pad_images(imgs)
    batch = batch.float()
    for scale in (0.6, 0.3013, 0.0517, 1.7):
        out_sizes = torch.ceil(sizes.double() * scale).long().clamp_min(1)
        dense = resize_area(batch, sizes, out_sizes, tile=0)
        for tile in (1, 3, 8, 64):
            banded = resize_area(batch, sizes, out_sizes, tile=tile)
            assert banded.shape == dense.shape
            assert (banded - dense).abs().max() < 1e-3, (scale, tile)


def test_area_weights_rows_sum_to_one():
    w = area_weights(torch.tensor([10, 7]), torch.tensor([4, 7]), 12, 8)
    assert torch.allclose(w[0, :4].sum(1), torch.ones(4)) and w[0, 4:].abs().sum() == 0
    assert w[0, :, 10:].abs().sum() == 0 and torch.allclose(w[1, :7, :7], torch.eye(7))


def test_padded_batch_equals_single_images():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(40, 60), (75, 33), (50, 50)]]
    batch, sizes = pad_images(imgs)
    out_sizes = torch.tensor([[20, 30], [37, 16], [13, 29]])
    together = resize_area(batch.float(), sizes, out_sizes)
    for i, im in enumerate(imgs):
        b1, s1 = pad_images([im])
        alone = resize_area(b1.float(), s1, out_sizes[i:i + 1])[0]
        h, w = out_sizes[i].tolist()
        assert torch.allclose(together[i, :, :h, :w], alone, atol=1e-3)
        assert together[i, :, h:, :].abs().sum() == 0 and together[i, :, :, w:].abs().sum() == 0


def test_sample_patches_matches_warp_affine_and_ignores_neighbours():
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(64, 80), (50, 40)]]
    batch, sizes = pad_images(imgs)
    # All cross an edge; the last two reach far into where the other image's slot lies (below image 0,
    # above image 1), which must read as black.
    boxes = torch.tensor([[-10.0, 5.0, 40.0, 55.0], [20.0, 30.0, 60.0, 70.0],
                          [30.0, 40.0, 90.0, 100.0], [-5.0, -40.0, 30.0, 20.0]])
    which = [0, 1, 0, 1]
    affine = box_to_affine(boxes, (24, 24))
    batch = batch.float()
    batch[1, :, 50:, :] = 255  # stale padding around the smaller image must read as black too
    batch[1, :, :, 40:] = 255
    got = sample_patches(batch, sizes, torch.tensor(which), affine, (24, 24))
    for i, k in enumerate(which):
        ref = cv2.warpAffine(imgs[k].astype(np.float32), cv2.invertAffineTransform(affine[i].double().numpy()),
                             (24, 24), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        diff = np.abs(got[i].permute(1, 2, 0).numpy() - ref)
        assert diff.max() < 0.5, (i, diff.max())


@pytest.mark.parametrize("threads", [2, 3])
def test_sample_patches_split_over_threads_is_exact(threads):
    """The patches are cut in one grid_sample per thread slice; any split gives the single-thread result."""
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(64, 80), (50, 40), (90, 70)]]
    batch, sizes = pad_images(imgs)
    n = 7   # not a multiple of the thread count: the last slice is padded
    image_index = torch.tensor([0, 1, 2, 2, 0, 1, 2])
    xy = torch.from_numpy(rng.uniform(-10, 50, (n, 2))).float()
    side = torch.from_numpy(rng.uniform(8, 40, (n, 1))).float()
    affine = box_to_affine(torch.cat([xy, xy + side], 1), (24, 24))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sample_patches(batch.float(), sizes, image_index, affine, (24, 24), supersample=2)
        torch.set_num_threads(threads)
        split = sample_patches(batch.float(), sizes, image_index, affine, (24, 24), supersample=2)
    finally:
        torch.set_num_threads(before)
    assert split.shape == (n, 3, 24, 24)
    assert torch.equal(one, split)
    assert one.abs().sum() > 0
