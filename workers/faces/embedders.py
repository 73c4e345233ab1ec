"""Face embedders: precision, a batched ``embed``, and loading / saving an embedder.

The network itself (SFace, its ONNX weights, BatchNorm folding) lives in :mod:`workers.faces.sface`.
A fine-tuned model is saved as a directory with ``embedder.json`` (a :class:`ModelSpec` as JSON) and
``weights.pt`` (a ``state_dict``); :func:`load_embedder` takes either a registry name or such a directory.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.faces.config import check_precision
from workers.faces.sface import (ARCHITECTURES, SFACE_INPUT_SIZE, SFace, cached_onnx_state_dict, fold_batchnorm, freeze_layers,
                                 sface_state_dict_from_onnx)
from workers.faces.weights import EMBEDDERS, ModelSpec, resolve

__all__ = ["SPEC_FILE", "WEIGHTS_FILE", "EMBED_PRECISIONS", "default_embed_batch", "check_precision",
           "precision_autocast", "embed_crops", "Embedder", "load_embedder", "save_embedder",
           "SFace", "freeze_layers", "fold_batchnorm", "sface_state_dict_from_onnx"]

SPEC_FILE = "embedder.json"
WEIGHTS_FILE = "weights.pt"

#: Embedding precisions: None = float32 as stored; otherwise the autocast dtype.
EMBED_PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16,
                                                   "float16": torch.float16}


def default_embed_batch(device: torch.device | str) -> int:
    """Faces per embedder forward pass when the caller says 0: 256 on CUDA; 8 on CPU, where a batch's
    activations then stay in cache (SFace fp32 on 2 cores: 9 ms/face at 8, 26.5 ms/face at 256)."""
    return 256 if torch.device(device).type == "cuda" else 8


def precision_autocast(device: torch.device | str, precision: str = "float32"):
    """The autocast context for running an embedder at ``precision`` on ``device`` (a no-op for float32)."""
    check_precision(precision, device)
    dtype = EMBED_PRECISIONS[precision]
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


def _weights_key(module: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``module`` is replaced, moved or modified in place."""
    return tuple((t.data_ptr(), None if t.is_inference() else t._version)
                 for t in itertools.chain(module.parameters(), module.buffers()))


def embed_crops(module: nn.Module, crops: torch.Tensor, batch_size: int = 0,
                precision: str = "float32") -> torch.Tensor:
    """L2-normalised embeddings of aligned crops.

    Args:
        module: embedder taking float[N, 3, S, S] RGB 0..255, returning float[N, D].
        crops: uint8[N, S, S, 3] RGB, on the module's device. Its NHWC storage reaches the module as a
            channels_last tensor, the layout the convolutions run fastest in.
        batch_size: faces per forward pass (0: ``default_embed_batch`` of the device).
        precision: a key of :data:`EMBED_PRECISIONS`; reduced precision runs under autocast.

    Returns:
        float32[N, D] unit vectors.
    """
    batch_size = batch_size or default_embed_batch(crops.device)
    with precision_autocast(crops.device, precision):
        outs = [F.normalize(module(chunk.permute(0, 3, 1, 2).float()).float(), dim=1)
                for chunk in crops.split(batch_size)]
    if outs:
        return torch.cat(outs)
    dim = getattr(module, "embedding_dim", 128)
    return torch.zeros((0, dim), device=crops.device)


@dataclasses.dataclass(frozen=True, eq=False)
class Embedder:
    """A face embedding model ready for inference.

    Attributes:
        spec: the model's registry entry (``version`` is recorded next to every embedding).
        module: the network, mapping float32[N, 3, H, W] RGB 0..255 to raw features float32[N, D].
    """

    spec: ModelSpec
    module: nn.Module
    _folded: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def inference_module(self) -> nn.Module:
        """:func:`fold_batchnorm` of ``module``, folded again only after its weights changed (an optimiser
        step between two calls, ``load_state_dict``, a move to another device)."""
        key = _weights_key(self.module)
        if self._folded.get("key") != key:
            self._folded.update(key=key, module=fold_batchnorm(self.module))
        return self._folded["module"]

    def embed(self, crops: np.ndarray | torch.Tensor, batch_size: int = 0,
              precision: str = "float32") -> np.ndarray:
        """L2-normalised embeddings of aligned face crops.

        Args:
            crops: uint8[N, H, W, 3] RGB, ``(H, W) == spec.input_size``; numpy or torch (any device).
            batch_size: crops per forward pass (0: :func:`default_embed_batch` of the module's device).
            precision: a key of :data:`EMBED_PRECISIONS` (reduced precision runs under autocast).

        Returns:
            float32[N, spec.embedding_dim], each row of unit L2 norm; ``[0, D]`` when ``N == 0``.

        Raises:
            ValueError: ``crops`` has the wrong shape or dtype, ``batch_size < 0`` or ``precision`` is
                unknown or unusable on the module's device.
        """
        height, width = self.spec.input_size
        shape = tuple(crops.shape)
        if len(shape) != 4 or shape[1:] != (height, width, 3):
            raise ValueError(f"crops must be [N, {height}, {width}, 3], got {list(shape)}")
        if crops.dtype not in (np.uint8, torch.uint8):
            raise ValueError(f"crops must be uint8, got {crops.dtype}")
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0 (0: by device), got {batch_size}")
        out = np.empty((shape[0], self.spec.embedding_dim), dtype=np.float32)
        device = self.device
        check_precision(precision, device)
        batch_size = batch_size or default_embed_batch(device)
        if shape[0] == 0:
            return out
        net = self.inference_module()
        with torch.inference_mode():
            for start in range(0, shape[0], batch_size):  # uploads one forward pass at a time
                chunk = crops[start:start + batch_size]
                if isinstance(chunk, np.ndarray):
                    chunk = torch.from_numpy(np.ascontiguousarray(chunk))
                features = embed_crops(net, chunk.to(device, non_blocking=True), batch_size, precision)
                out[start:start + len(features)] = features.cpu().numpy()
        return out


def _build_module(spec: ModelSpec) -> SFace:
    if spec.kind not in ARCHITECTURES:
        raise ValueError(f"unknown embedder kind {spec.kind!r}; known: {sorted(ARCHITECTURES)}")
    if tuple(spec.input_size) != SFACE_INPUT_SIZE:
        raise ValueError(f"{spec.kind} needs input_size {SFACE_INPUT_SIZE}, got {spec.input_size}")
    return ARCHITECTURES[spec.kind](embedding_dim=spec.embedding_dim, mean=spec.mean, std=spec.std)


def _check_state_dict(state: Any, module: nn.Module, source: str) -> None:
    """Raise ValueError unless ``state`` has exactly ``module``'s keys, shapes and dtypes."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source!r} does not hold a state_dict of tensors (got {type(state).__name__})")
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(want[k].shape)}"
             for k in want if k in state and state[k].shape != want[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source!r} does not match the {type(module).__name__} architecture: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")


def _load_weights_file(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, unsafe pickle: all mean "bad weights"
        raise ValueError(f"cannot read weights {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def _read_spec(directory: Path, source: str) -> tuple[ModelSpec, Path]:
    spec_path = directory / SPEC_FILE
    try:
        fields = json.loads(spec_path.read_text())
        fields["input_size"] = tuple(fields["input_size"])
        rel = fields["weights"]
        spec = ModelSpec(**{**fields, "weights": f"{source.rstrip('/')}/{rel}"})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read embedder spec {str(spec_path)!r}: {type(exc).__name__}: {exc}") from exc
    return spec, directory / rel


def load_embedder(name_or_path: str, device: str | torch.device = "cpu") -> Embedder:
    """Load a registered embedder or a saved (fine-tuned) one, in eval mode on ``device``.

    Args:
        name_or_path: a key of ``EMBEDDERS`` (``"sface"``), or a local directory / fsspec URI holding
            ``embedder.json`` and its weights file as written by :func:`save_embedder`.
        device: torch device for the module.

    Returns:
        The embedder. Loading the registry SFace dequantises its ONNX file once per process.

    Raises:
        ValueError: unknown name, or an unreadable / mismatched spec or weights file (the message names it).
        WeightsNotFound: a registry model whose package or file is missing.
    """
    if name_or_path in EMBEDDERS:
        spec = EMBEDDERS[name_or_path]
        module = _build_module(spec)
        weights = resolve(spec.weights)
        if weights.suffix == ".onnx":
            state = cached_onnx_state_dict(str(weights), weights.stat().st_mtime_ns)
        else:
            state = _load_weights_file(weights)
        source = str(weights)
    else:
        is_uri = "://" in name_or_path and not name_or_path.startswith("file://")
        local = Path(name_or_path.removeprefix("file://")).expanduser()
        if not is_uri and not (local / SPEC_FILE).is_file():
            what = "a directory without " + SPEC_FILE if local.is_dir() else "not a registry name nor a directory"
            raise ValueError(f"unknown embedder {name_or_path!r} ({what}); known names: {sorted(EMBEDDERS)}")
        directory = resolve(name_or_path) if is_uri else local
        spec, weights = _read_spec(directory, name_or_path)
        module = _build_module(spec)
        state = _load_weights_file(weights)
        source = str(weights)
    _check_state_dict(state, module, source)
    module.load_state_dict(state)
    module.to(device).eval()
    return Embedder(spec=spec, module=module)


def save_embedder(module: nn.Module, spec: ModelSpec, directory: str | os.PathLike) -> Path:
    """Write ``module`` so that :func:`load_embedder` (``directory``) restores it.

    Writes ``weights.pt`` (CPU ``state_dict``, ``torch.save``) and ``embedder.json`` (the fields of
    ``spec`` with ``weights`` set to ``"weights.pt"``), each atomically.

    Args:
        module: an instance of the architecture named by ``spec.kind`` (e.g. :class:`SFace`).
        spec: its description; ``name``/``version`` should say what was fine-tuned.
        directory: a local directory, created if missing.

    Returns:
        The directory.

    Raises:
        ValueError: ``spec.kind`` is unknown or ``module`` does not match it.
    """
    expected = _build_module(spec)
    if not isinstance(module, type(expected)):
        raise ValueError(f"spec.kind {spec.kind!r} needs a {type(expected).__name__}, got {type(module).__name__}")
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    _check_state_dict(state, expected, f"{type(module).__name__} state_dict")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {**dataclasses.asdict(spec), "weights": WEIGHTS_FILE}
    fields["input_size"] = list(fields["input_size"])
    _write_atomic(directory / WEIGHTS_FILE, lambda f: torch.save(state, f))
    _write_atomic(directory / SPEC_FILE, lambda f: f.write(json.dumps(fields, indent=2).encode() + b"\n"))
    return directory


def _write_atomic(path: Path, write) -> None:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
