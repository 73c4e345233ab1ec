"""The fine-tuning step without Ray: it learns, it is deterministic, distillation and frozen BN statistics do
what they say, a state round trip continues the same run; and the held-out protocol per domain."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.faces.embedders import load_embedder
from workers.training.losses import CombinedLoss, LossConfig
from workers.training.step import FaceTrainNet, TrainStep, distill_loss, frozen_teacher, step_generator


def _crops(seed: int = 0, people: int = 4, per_person: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Smooth random 'faces': one base image per person plus small noise per image."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (people, 14, 14, 3)).astype(np.float32)
    base = np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)          # 112 x 112 blocks
    labels = np.repeat(np.arange(people), per_person)
    crops = base[labels] + rng.normal(0, 8, (len(labels), 112, 112, 3))
    return np.clip(crops, 0, 255).astype(np.uint8), labels.astype(np.int64)


def _step(seed: int = 0, **kwargs) -> TrainStep:
    backbone = copy.deepcopy(load_embedder("sface").module)
    distill = kwargs.get("distill_weight", 0.0)
    teacher = frozen_teacher(backbone) if distill > 0 else None
    torch.manual_seed(seed)   # the classifier's init
    net = FaceTrainNet(backbone, CombinedLoss(4, backbone.embedding_dim, LossConfig()))
    return TrainStep(net, torch.device("cpu"), lr=kwargs.pop("lr", 1e-4), total_epochs=1.0, teacher=teacher,
                     **kwargs)


def _weights(step: TrainStep) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in step.net.parameters()])


def test_steps_lower_the_loss_and_are_deterministic():
    torch.set_num_threads(1)
    crops, labels = _crops()
    a, b = _step(), _step()
    first = [a(crops, labels, (i + 1) / 6, step_generator(1, 0, i)) for i in range(6)]
    for i in range(6):
        b(crops, labels, (i + 1) / 6, step_generator(1, 0, i))
    assert first[-1]["softmax"] < first[0]["softmax"], [r["softmax"] for r in first]
    assert torch.equal(_weights(a), _weights(b))          # same inputs and seeds: bit-identical weights
    assert first[-1]["lr_factor"] == pytest.approx(0.01)  # cosine end of a 1-epoch schedule
    assert "distill" not in first[0]


def test_distillation_is_zero_on_clean_crops_and_pulls_degraded_ones_back():
    torch.set_num_threads(1)
    crops, labels = _crops(1)
    degraded = (crops // 64 * 64).astype(np.uint8)       # posterised: a clear shift of the input
    step = _step(distill_weight=1.0, freeze_bn=True)
    step.train()
    for layer in step.net.modules():          # SFace's dropout would make student != teacher on purpose
        if isinstance(layer, torch.nn.Dropout):
            layer.eval()
    clean = step(crops, labels, 0.5, step_generator(0, 0, 0), clean=crops)
    # Frozen BN statistics, no dropout: student == teacher before any update, so the term is 0 up to float error.
    assert clean["distill"] == pytest.approx(0.0, abs=1e-5)
    rows = [step(degraded, labels, 0.5, step_generator(0, 0, i), clean=crops) for i in range(1, 8)]
    assert rows[0]["distill"] > 1e-3
    assert rows[-1]["distill"] < 0.7 * rows[0]["distill"], [r["distill"] for r in rows]
    assert rows[-1]["total"] > rows[-1]["softmax"]       # the weighted term is part of the total
    with pytest.raises(ValueError, match="un-augmented"):
        step(degraded, labels, 0.5, step_generator(0, 0, 9))
    with pytest.raises(ValueError, match="teacher"):
        TrainStep(step.net, torch.device("cpu"), lr=1e-4, distill_weight=1.0)


def test_precision_choices_and_bfloat16_steps_on_cpu():
    from workers.training.step import autocast_dtype

    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        autocast_dtype("float16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("fp8", cpu)
    torch.set_num_threads(1)
    crops, labels = _crops(4)
    step = _step(precision="bfloat16", lr=3e-4)
    rows = [step(crops, labels, (i + 1) / 4, step_generator(0, 0, i)) for i in range(4)]
    assert all(np.isfinite(r["total"]) for r in rows) and rows[-1]["softmax"] < rows[0]["softmax"]
    assert all(p.dtype == torch.float32 for p in step.net.parameters())      # master weights stay float32


def test_distill_loss_reference():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert float(distill_loss(a, b)) == pytest.approx(0.5)   # mean(1 - 1, 1 - 0)


def test_freeze_bn_keeps_running_statistics():
    torch.set_num_threads(1)
    crops, labels = _crops(2)

    def running_means(step):
        return torch.cat([m.running_mean.clone() for m in step.net.backbone.modules()
                          if isinstance(m, torch.nn.BatchNorm2d)])

    frozen, free = _step(freeze_bn=True), _step()
    before = running_means(frozen)
    for step in (frozen, free):
        step.train()
        step(crops, labels, 0.5, step_generator(0, 0, 0))
    assert torch.equal(running_means(frozen), before)
    assert not torch.equal(running_means(free), before)


def test_state_round_trip_continues_the_same_run():
    torch.set_num_threads(1)
    crops, labels = _crops(3)
    whole = _step()
    for i in range(3):
        whole(crops, labels, (i + 1) / 3, step_generator(0, 0, i))
    first = _step()
    first(crops, labels, 1 / 3, step_generator(0, 0, 0))
    state = first.state_dict()
    resumed = _step(seed=99, lr=1e-4)        # another classifier init: the state must overwrite it
    resumed.load_state_dict(state)
    for i in (1, 2):
        resumed(crops, labels, (i + 1) / 3, step_generator(0, 0, i))
    torch.testing.assert_close(_weights(resumed), _weights(whole), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# Held-out protocol (real LFW crops)


@pytest.mark.slow
def test_heldout_reads_only_the_pairs_faces_and_measures_domains(prepared_lfw):
    from workers.training import heldout as H
    from workers.training.data import DataConfig, plan_split, read_face_index

    root, _ = prepared_lfw
    data = DataConfig(faces=str(root), heldout_fraction=0.5, seed=4)
    split = plan_split(data)
    held = H.load_heldout(data, split, max_folds=3, max_pairs_per_fold=20)
    assert held is not None and len(held.pairs) == 60
    used = set(held.pairs["image1"]) | set(held.pairs["image2"])
    assert set(held.keys) == used                                   # nothing beyond what the pairs use
    index = read_face_index(data)
    heldout_faces = int(index["identity"].isin(set(split.heldout)).sum())
    assert len(held.keys) < heldout_faces
    assert all(isinstance(c, bytes) and c[:2] == b"\xff\xd8" for c in held.crops)   # JPEG bytes, not decoded
    names = dict(zip(H.face_keys(index), index["identity"]))
    assert all(names[k] in set(split.heldout) for k in held.keys)
    embedder = load_embedder("sface")
    metrics = H.heldout_metrics(held, lambda c: embedder.embed(c), ["lowres:8", "lowres:8"], 1e-3, batch_size=16)
    assert list(metrics) == ["clean", "lowres:8"]
    assert metrics["clean"]["accuracy"] > metrics["lowres:8"]["accuracy"]
    again = H.heldout_metrics(held, lambda c: embedder.embed(c), ["lowres:8"], 1e-3, batch_size=7)
    assert again["lowres:8"] == pytest.approx(metrics["lowres:8"])          # batching changes nothing
    row = H.flatten(metrics)
    assert row["heldout_accuracy"] == metrics["clean"]["accuracy"]
    assert row["heldout_lowres8_accuracy"] == metrics["lowres:8"]["accuracy"]


def test_activation_checkpointing_gives_the_same_gradients():
    from workers.training.step import keep_bn_statistics

    torch.set_num_threads(1)
    crops, _ = _crops(5, people=2, per_person=2)
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
    grads = []
    for segments in (0, 4):
        net = copy.deepcopy(load_embedder("sface").module)
        net.frozen_stages = 3              # stem + 2 blocks frozen: recompute starts after them
        for stage in net.stages[:3]:
            for p in stage.parameters():
                p.requires_grad_(False)
        net.checkpoint_segments = segments
        net.train()
        keep_bn_statistics(net)
        for layer in net.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.eval()
        net(images).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)


def test_checkpointing_in_train_mode_moves_bn_statistics_once():
    # Without frozen BN the recompute runs BatchNorm in train mode a second time: plain checkpointing moved
    # every running mean and counter twice per step. Same gradients and same statistics as no checkpointing.
    from workers.training.config import TrainConfig
    from workers.training.data import DataConfig

    torch.set_num_threads(1)
    crops, _ = _crops(5, people=2, per_person=2)
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float()
    grads, stats = [], []
    for segments in (0, 3):
        net = copy.deepcopy(load_embedder("sface").module)
        net.checkpoint_segments = segments
        net.train()
        for layer in net.modules():
            if isinstance(layer, torch.nn.Dropout):
                layer.eval()
        net(images).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        stats.append({k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k})
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    assert stats[1].keys() == stats[0].keys() and len(stats[0]) == 3 * 29
    for key in stats[0]:
        torch.testing.assert_close(stats[1][key], stats[0][key], rtol=1e-5, atol=1e-6, msg=key)
    assert int(stats[1]["blocks.5.dw.bn.num_batches_tracked"]) == 1
    assert TrainConfig(data=DataConfig(faces="x"), output="o", checkpoint_activations=True).checkpoint_activations


def test_malloc_mmap_threshold_is_applied(tmp_path):
    # In a fresh process: after a freed 4 MiB block glibc raises its threshold and serves the next ones from the
    # heap; with --malloc-mmap-threshold-mb 1 each one is its own mapping (mallinfo2's hblks counts them).
    import subprocess
    import sys

    from workers.training.config import TrainConfig
    from workers.training.data import DataConfig

    code = """
import ctypes, sys
from workers.training.worker import tune_malloc
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
mb = int(sys.argv[1])
assert tune_malloc(0, mb) is True
libc.free(libc.malloc(4 << 20))            # glibc's dynamic threshold rises past 4 MiB here
before = libc.mallinfo2().hblks
blocks = [libc.malloc(4 << 20) for _ in range(8)]
print(libc.mallinfo2().hblks - before)
"""
    counts = []
    for mb in (0, 1):
        r = subprocess.run([sys.executable, "-c", code, str(mb)], capture_output=True, text=True, timeout=60,
                           cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 0, r.stderr[-1500:]
        counts.append(int(r.stdout))
    assert counts == [0, 8]
    with pytest.raises(ValueError, match="malloc_mmap_threshold_mb must be in"):
        TrainConfig(data=DataConfig(faces="x"), output="o", malloc_mmap_threshold_mb=64)
