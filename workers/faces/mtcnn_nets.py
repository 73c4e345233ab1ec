"""MTCNN's three nets (P-Net, R-Net, O-Net) and their pretrained weights.

Weights are the original (Caffe/MATLAB) MTCNN weights shipped as data by the PyPI package ``mtcnn==1.0.0``
(Keras layout: conv kernels HWIO, PReLU alphas (1, 1, C), dense (in, out)); they are converted here.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.faces.weights import MTCNN_MODELS, resolve


def max_pool_2x2_ceil(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2, 2, ceil_mode=True)`` as the maximum of four strided views: float[B, C, H, W] ->
    [B, C, ceil(H / 2), ceil(W / 2)], the same values. For P-Net's 10 channels in NHWC the pooling
    kernel is slow (2 cores, [32, 10, 148, 148]: 7.8 ms against 1.8 ms here)."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:  # ceil mode: the last window hangs over the edge; -inf never wins the max
        x = F.pad(x, (0, w % 2, 0, h % 2), value=float("-inf"))
    rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class PNet(nn.Module):
    """Proposal net: uint8-normalised float[B, 3, H, W] -> (face prob [B, H', W'], box reg [B, 4, H', W'])."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.score, self.reg = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = max_pool_2x2_ceil(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return torch.softmax(self.score(x), 1)[:, 1], self.reg(x)


class RNet(nn.Module):
    """Refine net: float[N, 3, 24, 24] -> (face prob [N], box reg [N, 4])."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.score, self.reg = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        # Caffe/MATLAB order: features flattened as (W, H, C).
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return torch.softmax(self.score(x), 1)[:, 1], self.reg(x)


class ONet(nn.Module):
    """Output net: float[N, 3, 48, 48] -> (face prob [N], box reg [N, 4], landmarks [N, 10] as x1..x5 y1..y5)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.score, self.reg, self.landmarks = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x):
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return torch.softmax(self.score(x), 1)[:, 1], self.reg(x), self.landmarks(x)


# Order of the arrays in the Keras weight files, as (module attribute, parameter) per array.
_KERAS_ORDER = {
    "pnet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "reg", "score"],
    "rnet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "dense4", "prelu4", "reg", "score"],
    "onet": ["conv1", "prelu1", "conv2", "prelu2", "conv3", "prelu3", "conv4", "prelu4", "dense5", "prelu5",
             "reg", "landmarks", "score"],
}


def keras_to_state_dict(arrays: list[np.ndarray], stage: str) -> dict[str, torch.Tensor]:
    """Convert one MTCNN stage's Keras arrays to a torch state_dict.

    Args:
        arrays: the list stored in ``mtcnn/assets/weights/<stage>.lz4``: per conv a kernel float[kh, kw, in,
            out] and a bias, per PReLU alphas float[1, 1, C] or [C], per dense a kernel float[in, out] and
            a bias.
        stage: "pnet", "rnet" or "onet".

    Returns:
        state_dict for :class:`PNet`, :class:`RNet` or :class:`ONet`.

    Raises:
        ValueError: the arrays do not match the stage's layout.
    """
    out: dict[str, torch.Tensor] = {}
    it = iter(arrays)
    try:
        for name in _KERAS_ORDER[stage]:
            if name.startswith("prelu"):
                out[f"{name}.weight"] = torch.from_numpy(np.asarray(next(it), np.float32).reshape(-1))
                continue
            kernel = np.asarray(next(it), np.float32)
            if kernel.ndim == 4:      # HWIO -> OIHW
                kernel = kernel.transpose(3, 2, 0, 1)
            elif kernel.ndim == 2:    # (in, out) -> (out, in)
                kernel = kernel.T
            else:
                raise ValueError(f"{stage}.{name}: unexpected kernel shape {kernel.shape}")
            out[f"{name}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel))
            out[f"{name}.bias"] = torch.from_numpy(np.asarray(next(it), np.float32))
    except StopIteration:
        raise ValueError(f"{stage}: weight file has {len(arrays)} arrays, too few") from None
    if next(it, None) is not None:
        raise ValueError(f"{stage}: weight file has {len(arrays)} arrays, too many")
    return out


def load_mtcnn_nets(device: torch.device | str = "cpu") -> tuple[PNet, RNet, ONet]:
    """Build the three nets with the pretrained weights (read from the ``mtcnn`` package's data files)."""
    import joblib

    nets = []
    for stage, cls in (("pnet", PNet), ("rnet", RNet), ("onet", ONet)):
        arrays = joblib.load(resolve(MTCNN_MODELS[stage].weights))
        net = cls()
        net.load_state_dict(keras_to_state_dict(arrays, stage))
        nets.append(net.eval().to(device))
    return tuple(nets)

