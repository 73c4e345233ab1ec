"""MTCNN: weight conversion, detections on real LFW faces, batched == one image at a time."""
import importlib.metadata
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from tests.conftest import LFW_IMAGES, SAMPLE, needs_lfw
import torch.nn.functional as F

from workers.faces.mtcnn import MTCNN, MTCNNConfig, load_mtcnn_nets, max_pool_2x2_ceil


def _rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return MTCNN.pretrained(MTCNNConfig())


@pytest.mark.parametrize("shape", [(2, 10, 7, 9), (3, 10, 8, 8), (1, 10, 5, 4), (2, 4, 1, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_strided_pool_equals_max_pool2d_ceil_mode(shape, channels_last):
    x = torch.randn(shape)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    assert torch.equal(max_pool_2x2_ceil(x), F.max_pool2d(x, 2, 2, ceil_mode=True))


def test_converted_weights_equal_facenet_pytorch_state_dicts():
    try:
        dist = importlib.metadata.distribution("facenet-pytorch")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("facenet-pytorch not installed (pip install --no-deps facenet-pytorch==2.6.0)")
    rename = {"score": {"pnet": "conv4_1", "rnet": "dense5_1", "onet": "dense6_1"},
              "reg": {"pnet": "conv4_2", "rnet": "dense5_2", "onet": "dense6_2"},
              "landmarks": {"onet": "dense6_3"}}
    for stage, net in zip(("pnet", "rnet", "onet"), load_mtcnn_nets()):
        ref = torch.load(Path(str(dist.locate_file(f"facenet_pytorch/data/{stage}.pt"))), weights_only=True)
        for key, value in net.state_dict().items():
            layer, param = key.split(".")
            ref_key = f"{rename[layer][stage]}.{param}" if layer in rename else key
            assert torch.equal(value, ref[ref_key]), (stage, key)


def test_bundled_sample_faces(detector):
    files = sorted(SAMPLE.glob("*/*.jpg"))
    det = detector.detect([_rgb(f) for f in files])
    assert (det.num_faces >= 1).all()
    # the best face contains the image centre and is a plausible size for LFW (about 100 px)
    b = det.boxes[:, 0]
    assert ((b[:, 0] < 125) & (b[:, 2] > 125) & (b[:, 1] < 125) & (b[:, 3] > 125)).all()
    side = (b[:, 2:] - b[:, :2]).mean(1)
    assert ((side > 60) & (side < 180)).all()


@needs_lfw
def test_500_random_lfw_images_have_a_centred_face_with_plausible_landmarks(detector):
    files = sorted(LFW_IMAGES.glob("*/*.jpg"))
    chosen = random.Random(42).sample(files, 500)
    hits, plausible, total_faces = 0, 0, 0
    for i in range(0, len(chosen), 50):
        det = detector.detect([_rgb(f) for f in chosen[i:i + 50]])
        img_idx, boxes, scores, marks = det.flat()
        total_faces += len(img_idx)
        contains = (boxes[:, 0] <= 125) & (boxes[:, 2] >= 125) & (boxes[:, 1] <= 125) & (boxes[:, 3] >= 125)
        for b in range(len(det.num_faces)):
            sel = (img_idx == b) & contains
            if sel.any():
                hits += 1
                m = marks[sel][0]
                eyes_y = m[:2, 1].max()
                ok = (m[0, 0] < m[1, 0]) and (eyes_y < m[2, 1]) and (m[2, 1] < m[3:, 1].min())
                plausible += int(ok)
    assert hits / 500 >= 0.995, hits
    assert plausible / hits >= 0.99, plausible
    assert total_faces >= 500


@needs_lfw
def test_batched_mixed_sizes_equal_one_at_a_time(detector):
    files = sorted(LFW_IMAGES.glob("*/*.jpg"))
    rng = random.Random(7)
    imgs = []
    for f, size in zip(rng.sample(files, 6), [(250, 250), (180, 320), (400, 300), (97, 140), (250, 500), (60, 60)]):
        im = _rgb(f)
        imgs.append(cv2.resize(im, (size[1], size[0]), interpolation=cv2.INTER_LINEAR))
    # a mosaic with 4 faces, and an image with no face at all
    tiles = [_rgb(f) for f in rng.sample(files, 4)]
    imgs.append(np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])]))
    imgs.append(np.full((120, 90, 3), 127, np.uint8))
    together = detector.detect(imgs)
    assert together.num_faces[-2] >= 4 and together.num_faces[-1] == 0
    for i, im in enumerate(imgs):
        alone = detector.detect([im])
        n = int(alone.num_faces[0])
        assert int(together.num_faces[i]) == n, i
        assert torch.allclose(together.boxes[i, :n], alone.boxes[0, :n], atol=0.05), i
        assert torch.allclose(together.landmarks[i, :n], alone.landmarks[0, :n], atol=0.05), i
        assert torch.allclose(together.scores[i, :n], alone.scores[0, :n], atol=1e-4), i


def test_selection_modes_and_config_errors():
    img = np.vstack([np.hstack([_rgb(f) for f in sorted(SAMPLE.glob("*/*.jpg"))[j:j + 2]]) for j in (0, 2)])
    every = MTCNN.pretrained(MTCNNConfig()).detect([img])
    largest = MTCNN.pretrained(MTCNNConfig(select="largest")).detect([img])
    central = MTCNN.pretrained(MTCNNConfig(select="center")).detect([img])
    assert int(every.num_faces[0]) >= 4
    assert int(largest.num_faces[0]) == 1 and int(central.num_faces[0]) == 1
    areas = (every.boxes[0, :, 2:] - every.boxes[0, :, :2]).prod(1)
    assert torch.isclose((largest.boxes[0, 0, 2:] - largest.boxes[0, 0, :2]).prod(), areas.max())
    with pytest.raises(ValueError, match="min_face_size"):
        MTCNNConfig(min_face_size=5)
    with pytest.raises(ValueError, match="select"):
        MTCNNConfig(select="biggest")


def test_empty_and_tiny_inputs(detector):
    det = detector.detect([np.zeros((8, 8, 3), np.uint8), np.zeros((30, 30, 3), np.uint8)])
    assert det.num_faces.tolist() == [0, 0] and det.boxes.shape[:2] == (2, 0)
