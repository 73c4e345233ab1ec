"""SFace as a torch module: checked against the ONNX graph it comes from and against onnxruntime."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from workers.faces import sface as sface_net
from workers.faces.embedders import (
    Embedder, SFace, freeze_layers, load_embedder, save_embedder, sface_state_dict_from_onnx)
from workers.faces.weights import EMBEDDERS, WeightsNotFound, resolve

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw" / "images"
FACES = ("George_W_Bush/George_W_Bush_0001", "George_W_Bush/George_W_Bush_0002",
         "Colin_Powell/Colin_Powell_0001", "Tony_Blair/Tony_Blair_0001", "Serena_Williams/Serena_Williams_0001")


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    try:
        return resolve(EMBEDDERS["sface"].weights)
    except WeightsNotFound as exc:
        pytest.skip(f"SFace weights unavailable: {exc}")


@pytest.fixture(scope="module")
def sface(onnx_path) -> Embedder:
    return load_embedder("sface")


@pytest.fixture(scope="module")
def onnx_model(onnx_path):
    onnx = pytest.importorskip("onnx")
    return onnx.load(str(onnx_path))


def _ort_session(model, extra_outputs: tuple[str, ...] = ()):
    """onnxruntime session on ``model``, minus its dangling graph inputs.

    The shipped file still declares the pre-quantisation float weights (``conv_1_conv2d_weight`` ...) as
    graph inputs although no node reads them, and onnxruntime refuses to run without them; they are dropped
    here, together with initializers listed as inputs (which only disable constant folding).
    """
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    used = {name for node in model.graph.node for name in node.input}
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name in used and i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    for name in extra_outputs:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def lfw_crops() -> np.ndarray:
    """uint8[5, 112, 112, 3] RGB centre crops (rows/cols 69:181 of the 250x250 LFW images)."""
    cv2 = pytest.importorskip("cv2")
    paths = [LFW / f"{name}.jpg" for name in FACES]
    if not all(p.is_file() for p in paths):
        pytest.skip(f"LFW images not found under {LFW} (needs {FACES})")
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    return np.stack([image[69:181, 69:181] for image in images])


def _random_crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


# ---- the module is the graph -------------------------------------------------------------------------------


def test_module_layers_match_onnx_graph(onnx_model):
    import onnx
    from onnx import numpy_helper

    graph = onnx_model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    nodes = {op: [n for n in graph.node if n.op_type == op] for op in
             ("Conv", "BatchNormalization", "PRelu", "Dropout", "Flatten", "Gemm", "Sub", "Mul")}
    attrs = lambda n: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    module = SFace()

    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(nodes["Conv"]) == 27
    for node, conv in zip(nodes["Conv"], convs):
        a = attrs(node)
        assert tuple(a["strides"]) == conv.stride, node.name
        assert tuple(a["pads"]) == conv.padding * 2, node.name
        assert tuple(a["kernel_shape"]) == conv.kernel_size, node.name
        assert tuple(a.get("dilations", (1, 1))) == conv.dilation, node.name
        assert a.get("group", 1) == conv.groups, node.name
        assert len(node.input) == 2 and conv.bias is None, node.name
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == len(nodes["BatchNormalization"]) == 29
    for node, bn in zip(nodes["BatchNormalization"], bns):
        assert attrs(node)["epsilon"] == pytest.approx(bn.eps, rel=1e-6), node.name
    assert len(nodes["PRelu"]) == sum(isinstance(m, nn.PReLU) for m in module.modules()) == 27
    (dropout,) = nodes["Dropout"]
    assert float(consts[dropout.input[1]]) == pytest.approx(module.head.dropout.p)
    assert attrs(nodes["Flatten"][0]).get("axis", 1) == 1
    gemm = attrs(nodes["Gemm"][0])
    assert (gemm["transA"], gemm["transB"], gemm["alpha"], gemm["beta"]) == (0, 1, 1.0, 1.0)
    assert float(inits[nodes["Sub"][0].input[1]][0]) == module.mean
    assert float(inits[nodes["Mul"][0].input[1]][0]) == 1.0 / module.std


def test_dequantised_weights_equal_onnxruntime(onnx_model, onnx_path):
    """Every DequantizeLinear (+Reshape) output, fetched from onnxruntime, equals our state_dict entry."""
    state = sface_state_dict_from_onnx(onnx_path)
    key_of = sface_net._sface_key_map()
    names = {}
    for node in onnx_model.graph.node:
        if node.op_type in ("DequantizeLinear", "Reshape"):
            names[node.output[0].rsplit("_", 1)[0]] = node.output[0]  # the Reshape output wins
    assert len(names) == 29 and "pre_fc1_bias" in names
    session = _ort_session(onnx_model, tuple(names.values()))
    outputs = session.run(list(names.values()), {"data": np.zeros((1, 3, 112, 112), np.float32)})
    for (base, _), expected in zip(names.items(), outputs):
        ours = state[key_of[base]].numpy()
        assert ours.shape == expected.shape, base
        np.testing.assert_array_equal(ours, expected, err_msg=base)
    # The bias: 128 values in 2 blocks of 64 along axis 0, one scale and zero point per block.
    assert state["head.fc.bias"].shape == (128,)


def test_blocked_dequantisation_reference():
    q = np.arange(-6, 6, dtype=np.int8).reshape(2, 6)
    scale = np.array([[1.0, 10.0], [100.0, 1000.0]], np.float32)
    zp = np.array([[0, 1], [-1, 2]], np.int8)
    got = sface_net._dequantize_blocked(q, scale, zp, axis=1, block_size=4)  # blocks [0:4], [4:6]
    want = np.empty((2, 6), np.float32)
    for i in range(2):
        for j in range(6):
            want[i, j] = (int(q[i, j]) - int(zp[i, j // 4])) * scale[i, j // 4]
    np.testing.assert_array_equal(got, want)


def test_matches_onnxruntime_on_lfw(sface, onnx_model, lfw_crops):
    session = _ort_session(onnx_model)
    assert [i.name for i in session.get_inputs()] == ["data"]
    x = lfw_crops.transpose(0, 3, 1, 2).astype(np.float32)
    expected = np.concatenate([session.run(None, {"data": x[i:i + 1]})[0] for i in range(len(x))])
    with torch.inference_mode():
        got = sface.module(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (len(x), 128)
    diff, scale = np.abs(got - expected).max(), np.abs(expected).max()
    rel = diff / scale
    print(f"max |torch - onnxruntime| = {diff:.2e}, max |onnxruntime| = {scale:.2f}, ratio {rel:.2e}")
    assert rel < 1e-4


# ---- embed ---------------------------------------------------------------------------------------------------


def test_embed_is_normalised_and_batch_independent(sface, lfw_crops):
    batched = sface.embed(lfw_crops, batch_size=3)
    assert batched.dtype == np.float32 and batched.shape == (len(lfw_crops), 128)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    single = np.concatenate([sface.embed(lfw_crops[i:i + 1]) for i in range(len(lfw_crops))])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_array_equal(sface.embed(torch.from_numpy(lfw_crops), batch_size=3), batched)


def test_bfloat16_and_precision_checks(sface, lfw_crops):
    """bfloat16 autocast stays close to float32 on real faces; float16 is refused off CUDA and unknown
    precisions anywhere. (Full LFW: same 10-fold accuracy, see docs/performance.md.)"""
    from workers.faces.embedders import check_precision

    reference = sface.embed(lfw_crops)
    bf16 = sface.embed(lfw_crops, precision="bfloat16")
    cosine = (bf16 * reference).sum(1)
    print(f"bfloat16 vs float32 cosine on LFW crops: min {cosine.min():.4f}")
    assert bf16.dtype == np.float32 and cosine.min() > 0.98
    assert np.abs(bf16 - reference).max() > 1e-6  # it did run in reduced precision
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="float16 needs CUDA"):
        sface.embed(lfw_crops, precision="float16")
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("int4")


def test_same_person_is_closer(sface, lfw_crops):
    e = sface.embed(lfw_crops)
    same = float(e[0] @ e[1])
    different = max(float(e[i] @ e[j]) for i in (0, 1) for j in range(2, len(e)))
    print(f"cosine same person {same:.3f}, most similar different person {different:.3f}")
    assert same > different


def test_embed_empty_and_bad_input(sface):
    empty = sface.embed(np.zeros((0, 112, 112, 3), np.uint8))
    assert empty.shape == (0, 128) and empty.dtype == np.float32
    with pytest.raises(ValueError, match=r"\[2, 96, 112, 3\]"):
        sface.embed(np.zeros((2, 96, 112, 3), np.uint8))
    with pytest.raises(ValueError, match="float32"):
        sface.embed(np.zeros((2, 112, 112, 3), np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        sface.embed(_random_crops(1), batch_size=-1)


def test_embed_leaves_training_mode_alone(sface):
    sface.module.train()
    try:
        a = sface.embed(_random_crops(2))
        assert sface.module.training
    finally:
        sface.module.eval()
    np.testing.assert_array_equal(a, sface.embed(_random_crops(2)))


def test_folded_batchnorm_gives_the_same_features(sface, lfw_crops):
    """The inference copy folds each conv -> BN pair; features stay equal to the module's own."""
    from workers.faces.sface import fold_batchnorm

    folded = fold_batchnorm(sface.module)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.blocks.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in sface.module.blocks.modules())  # original kept
    x = torch.from_numpy(lfw_crops).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        got, want = folded(x), sface.module.eval()(x)
    rel = float((got - want).abs().max() / want.abs().max())
    print(f"folded vs module: max relative difference {rel:.1e}")
    assert rel < 1e-5


def test_inference_module_refolds_after_a_weight_change(sface):
    """embed() reuses the folded copy until the weights change in place (as an optimiser step does)."""
    module, spec = _finetuned(sface)
    embedder = Embedder(spec=spec, module=module)
    crops = _random_crops(3)
    before = embedder.embed(crops)
    first = embedder.inference_module()
    assert embedder.inference_module() is first
    with torch.no_grad():
        module.blocks[0].dw.bn.weight.mul_(0.5)
    assert embedder.inference_module() is not first
    after = embedder.embed(crops)
    assert not np.allclose(before, after, atol=1e-3)
    np.testing.assert_allclose(after, Embedder(spec=spec, module=module).embed(crops), atol=1e-6)


# ---- save / load ---------------------------------------------------------------------------------------------


def _finetuned(sface: Embedder) -> tuple[SFace, object]:
    module = SFace()
    module.load_state_dict(sface.module.state_dict())
    with torch.no_grad():
        module.head.fc.bias.add_(0.5)  # so the weights must come from the saved file, not the ONNX cache
    spec = dataclasses.replace(sface.spec, name="sface-ft-test", version="sface-ft-test-1", weights="")
    return module.eval(), spec


def test_save_load_round_trip(sface, tmp_path):
    module, spec = _finetuned(sface)
    save_embedder(module, spec, tmp_path / "ft")
    fields = json.loads((tmp_path / "ft" / "embedder.json").read_text())
    assert fields["kind"] == "sface" and fields["weights"] == "weights.pt"
    loaded = load_embedder(str(tmp_path / "ft"))
    assert loaded.spec.version == "sface-ft-test-1" and loaded.spec.input_size == (112, 112)
    crops = _random_crops(3)
    expected = Embedder(spec=spec, module=module).embed(crops)
    np.testing.assert_array_equal(loaded.embed(crops), expected)
    assert not np.allclose(expected, sface.embed(crops), atol=1e-3)


def test_truncated_weights_are_refused(sface, tmp_path):
    module, spec = _finetuned(sface)
    save_embedder(module, spec, tmp_path)
    weights = tmp_path / "weights.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="weights.pt"):
        load_embedder(str(tmp_path))


def test_mismatched_weights_are_refused(sface, tmp_path):
    module, spec = _finetuned(sface)
    save_embedder(module, spec, tmp_path)
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    state["head.fc.weight"] = state["head.fc.weight"][:64]
    del state["stem.conv.weight"]
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"weights\.pt.*stem\.conv\.weight.*head\.fc\.weight"):
        load_embedder(str(tmp_path))


def test_unknown_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"'no-such-model'.*sface"):
        load_embedder("no-such-model")
    with pytest.raises(ValueError, match="embedder.json"):
        load_embedder(str(tmp_path))


def test_loaded_modules_do_not_share_weights(sface):
    other = load_embedder("sface")
    with torch.no_grad():
        other.module.stem.conv.weight.zero_()
    assert sface.module.stem.conv.weight.abs().sum() > 0
    assert load_embedder("sface").module.stem.conv.weight.abs().sum() > 0


# ---- fine-tuning -----------------------------------------------------------------------------------------------


def test_freeze_layers(sface):
    module, _ = _finetuned(sface)
    assert len(module.stages) == 15
    freeze_layers(module, 5)  # stem + blocks conv_2 .. conv_5
    module.train()
    frozen_bn = module.blocks[3].pw.bn
    assert not frozen_bn.training and module.blocks[4].dw.bn.training
    mean_before = frozen_bn.running_mean.clone()
    x = torch.from_numpy(_random_crops(2)).permute(0, 3, 1, 2).float()
    module(x).pow(2).sum().backward()
    assert torch.equal(frozen_bn.running_mean, mean_before)
    assert all(p.grad is None and not p.requires_grad for s in module.stages[:5] for p in s.parameters())
    assert all(p.grad is not None for s in module.stages[5:] for p in s.parameters())
    freeze_layers(module, 0)
    assert all(p.requires_grad for p in module.parameters()) and module.stem.bn.training
    with pytest.raises(ValueError, match="16"):
        freeze_layers(module, 16)


def test_dequantised_sface_is_cached_on_disk(onnx_path, tmp_path, monkeypatch):
    """The ONNX conversion runs once per machine: later processes load the cached file (checked key for key),
    a truncated or foreign cache file is converted again and replaced, an unwritable cache is skipped."""
    monkeypatch.setenv("FACEMILL_CACHE", str(tmp_path / "cache"))
    calls = []
    real = sface_net.sface_state_dict_from_onnx
    monkeypatch.setattr(sface_net, "sface_state_dict_from_onnx", lambda p: calls.append(p) or real(p))
    convert = sface_net.cached_onnx_state_dict.__wrapped__      # past the per-process memo: a new process
    mtime = onnx_path.stat().st_mtime_ns
    (tmp_path / "cache" / "sface").mkdir(parents=True)
    killed = tmp_path / "cache" / "sface" / ".partial-0123abcd.99.pt"  # what a killed writer left, 2 h ago
    killed.write_bytes(b"half")
    os.utime(killed, (time.time() - 7200,) * 2)
    first = convert(str(onnx_path), mtime)
    assert not killed.exists()
    (cached,) = (tmp_path / "cache" / "sface").glob("*.pt")
    assert len(calls) == 1 and not list(cached.parent.glob(".partial-*"))
    again = convert(str(onnx_path), mtime)
    assert len(calls) == 1 and again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    cached.write_bytes(cached.read_bytes()[:1000])             # truncated
    assert torch.equal(convert(str(onnx_path), mtime)["head.fc.weight"], first["head.fc.weight"])
    assert len(calls) == 2 and cached.stat().st_size > 1_000_000
    torch.save({"x": torch.zeros(1)}, cached)                  # a foreign file
    convert(str(onnx_path), mtime)
    assert len(calls) == 3
    assert convert(str(onnx_path), mtime + 1) is not None and len(calls) == 4   # a changed ONNX file: new key
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("FACEMILL_CACHE", str(blocked))           # the cache cannot be created
    assert torch.equal(convert(str(onnx_path), mtime)["head.fc.weight"], first["head.fc.weight"])
