"""The training checkpoint format: one ``train_state.pt`` per Ray Train checkpoint folder.

A state holds only tensors, numbers, strings, lists, dicts and None, so that ``torch.load(weights_only=True)``
reads it back (nothing is unpickled). Keys: ``epoch`` (epochs done), ``backbone`` / ``loss`` / ``optimizer`` /
``scheduler`` / ``scaler`` (state dicts), ``sampler`` (seed, P, K, world size, the chief's probe
identities), ``identities`` (the training identities, in label order: a resume must have the same ones),
``run_id``, ``init`` (the starting embedder's name / version / kind), ``heldout_before`` / ``heldout_last`` /
``probe_before`` (measurements kept for the reports).
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from workers import storage

CHECKPOINT_FILE = "train_state.pt"
CHECKPOINT_FORMAT = "facemill.train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("epoch", "backbone", "loss", "optimizer", "scheduler", "scaler", "sampler", "identities",
                   "run_id", "init", "heldout_before", "heldout_last", "probe_before")
#: Ray Train's storage folder under the run's output, and the run name under it.
RAY_DIR = "ray"
RAY_RUN_NAME = "train"


def save_checkpoint_state(state: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write a training state (the keys of ``CHECKPOINT_KEYS``) as ``<directory>/train_state.pt``.

    Only tensors, numbers, strings, lists, dicts and None may appear, so that
    ``torch.load(weights_only=True)`` reads it back.
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"training state lacks {missing}")
    path = Path(directory) / CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint_state(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check a training state written by :func:`save_checkpoint_state` (CPU tensors).

    Raises:
        ValueError: the folder has no ``train_state.pt``, or it is truncated, not a torch file, unsafe
            to unpickle, or not a facemill training checkpoint of this version (the message says which).
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        found = sorted(p.name for p in Path(directory).iterdir())[:5] if Path(directory).is_dir() else None
        raise ValueError(f"{str(directory)!r} is not a facemill training checkpoint: no {CHECKPOINT_FILE} "
                         f"(found {found})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, unsafe pickle
        raise ValueError(f"cannot read checkpoint {str(path)!r} ({path.stat().st_size} bytes): truncated or not "
                         f"a torch file: {type(exc).__name__}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        what = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{str(path)!r} is not a facemill training checkpoint (format {what!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(path)!r} is a training checkpoint of version {state.get('version')!r}, "
                         f"this code reads version {CHECKPOINT_VERSION}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(f"{str(path)!r} lacks {missing}: incomplete training checkpoint")
    return state


def checkpoints_in(output: str, storage_options: dict | None = None) -> list[str]:
    """Names of the epoch checkpoint folders of a run folder, oldest first."""
    fs, path = storage.url_to_fs(storage.join(output, RAY_DIR, RAY_RUN_NAME), storage_options)
    try:
        names = fs.ls(path, detail=False) if fs.exists(path) else []
    except FileNotFoundError:
        names = []
    found = [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
    return sorted(n for n in found if n.startswith("epoch_"))


def read_checkpoint_state(uri: str, storage_options: dict | None = None) -> dict[str, Any]:
    """:func:`load_checkpoint_state` of a checkpoint folder given as a local path or an fsspec URI."""
    if "://" not in uri or uri.startswith("file://"):
        return load_checkpoint_state(uri.removeprefix("file://"))
    fs, path = storage.url_to_fs(storage.join(uri, CHECKPOINT_FILE), storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            fs.get_file(path, os.path.join(tmp, CHECKPOINT_FILE))
        except FileNotFoundError:
            pass   # load_checkpoint_state names what is missing
        return load_checkpoint_state(tmp)
