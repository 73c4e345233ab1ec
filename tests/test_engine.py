"""The whole face stage in one process (detect -> align -> embed): chunking and precision options."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from workers.faces.embedders import default_embed_batch, load_embedder
from workers.faces.engine import EngineConfig, FaceEngine
from workers.faces.mtcnn import MTCNN, MTCNNConfig, default_crop_chunk

SAMPLE = Path(__file__).parent / "data" / "sample"


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """The 8 bundled LFW images plus one of them at half size, so the batch mixes sizes."""
    files = sorted(SAMPLE.rglob("*.jpg"))
    out = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    return out + [cv2.resize(out[0], (125, 125), interpolation=cv2.INTER_AREA)]


def _engine(crop_chunk: int = 0, stage1_pixels: int = 0, **options) -> FaceEngine:
    detector = MTCNN.pretrained(MTCNNConfig(crop_chunk=crop_chunk, stage1_pixels=stage1_pixels))
    return FaceEngine(detector, load_embedder("sface").module, EngineConfig(mtcnn=detector.config, **options))


def test_chunking_and_precision(images):
    """Chunk sizes (small ones, as the CPU defaults, against one big chunk per stage) do not change
    results; bfloat16 changes only the embeddings, and only a little."""
    assert default_crop_chunk("cpu") < 4096 and default_embed_batch("cpu") < 256
    big = _engine(crop_chunk=4096, stage1_pixels=1 << 40, embed_batch_size=256).process(images)
    assert big.num_faces.sum() >= len(images) and (big.num_faces >= 1).all()
    # P-Net over groups of 2 images, R-Net and O-Net over chunks of 7 boxes, the embedder over 3 faces
    small = _engine(crop_chunk=7, stage1_pixels=150_000, embed_batch_size=3).process(images)
    np.testing.assert_array_equal(small.num_faces, big.num_faces)
    np.testing.assert_allclose(small.boxes, big.boxes, atol=1e-3)
    np.testing.assert_allclose(small.landmarks, big.landmarks, atol=1e-3)
    assert np.abs(small.crops.astype(int) - big.crops).max() <= 1  # float rounding may flip a pixel value
    assert (small.embeddings * big.embeddings).sum(1).min() > 0.99999
    defaults = _engine().process(images)  # by device
    np.testing.assert_allclose(defaults.boxes, big.boxes, atol=1e-3)
    assert (defaults.embeddings * big.embeddings).sum(1).min() > 0.99999
    half = _engine(embed_precision="bfloat16").process(images)
    np.testing.assert_array_equal(half.crops, defaults.crops)  # detection and alignment stay float32
    cosine = (half.embeddings * defaults.embeddings).sum(1)
    assert half.embeddings.dtype == np.float32 and cosine.min() > 0.98, cosine.min()


def test_engine_config_is_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        EngineConfig(embed_precision="fp8")
    with pytest.raises(ValueError, match="embed_batch_size"):
        EngineConfig(embed_batch_size=-1)
    with pytest.raises(ValueError, match="crop_chunk"):
        MTCNNConfig(crop_chunk=-1)
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        _engine(embed_precision="float16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stage_matches_cpu(images):
    """On a GPU: the same faces within 1 px as on the CPU, and float16 embeddings close to float32."""
    cpu = _engine().process(images)
    gpu = FaceEngine(MTCNN.pretrained(device="cuda"), load_embedder("sface", "cuda").module, EngineConfig())
    got = gpu.process(images)
    np.testing.assert_array_equal(got.num_faces, cpu.num_faces)
    assert np.abs(got.boxes - cpu.boxes).max() < 1.0
    assert ((got.embeddings * cpu.embeddings).sum(1)).min() > 0.999
    fp16 = FaceEngine(gpu.detector, gpu.embedder, EngineConfig(embed_precision="float16")).process(images)
    assert ((fp16.embeddings * cpu.embeddings).sum(1)).min() > 0.99


def test_profiling_hook_sees_every_stage_and_changes_nothing(images):
    """``process(timer=...)`` enters each stage once, in order, with the detector's parts inside the
    detector stages; the results are those of a run without a timer."""
    import contextlib

    from workers.faces.profile import PARTS, STAGES

    class Recorder:
        def __init__(self):
            self.stages, self.parts, self.current = [], set(), None

        @contextlib.contextmanager
        def stage(self, name):
            assert self.current is None, (self.current, name)     # stages never nest
            self.stages.append(name)
            self.current = name
            yield
            self.current = None

        @contextlib.contextmanager
        def part(self, name):
            assert self.current in ("pnet", "rnet", "onet"), (self.current, name)
            self.parts.add((self.current, name))
            yield

    engine = _engine()
    recorder = Recorder()
    timed = engine.process(images, timer=recorder)
    plain = engine.process(images)
    assert tuple(recorder.stages) == STAGES
    assert {p for _, p in recorder.parts} == set(PARTS)
    np.testing.assert_array_equal(timed.num_faces, plain.num_faces)
    np.testing.assert_array_equal(timed.boxes, plain.boxes)
    np.testing.assert_array_equal(timed.embeddings, plain.embeddings)
