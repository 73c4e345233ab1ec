"""The per-user weights cache: remote weights that were replaced are fetched again, and what a killed process
left half-written is cleaned up without touching anything else."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from workers.faces import weights


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEMILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def memfs():
    """A real fsspec filesystem (in memory) standing for a bucket; a fresh root per test."""
    fs = fsspec.filesystem("memory")
    root = f"/bucket-{uuid.uuid4().hex[:8]}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_replaced_remote_weights_are_fetched_again(cache, memfs):
    fs, root = memfs
    uri = f"memory://{root}/model.pt"
    fs.pipe_file(f"{root}/model.pt", b"first weights")
    assert weights.resolve(uri).read_bytes() == b"first weights"
    assert weights.resolve(uri).read_bytes() == b"first weights"        # cached: no second copy
    assert len([p for p in cache.iterdir()]) == 1
    time.sleep(0.01)
    fs.pipe_file(f"{root}/model.pt", b"second weights")                 # the user replaced the file
    assert weights.resolve(uri).read_bytes() == b"second weights"
    time.sleep(0.01)
    fs.pipe_file(f"{root}/model.pt", b"third  weights")                 # same size, newer file
    assert weights.resolve(uri).read_bytes() == b"third  weights"
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no partial download left behind


def test_replaced_file_of_a_remote_folder_is_fetched_again(cache, memfs):
    fs, root = memfs
    fs.pipe_file(f"{root}/ft1/embedder.json", b"{}")
    fs.pipe_file(f"{root}/ft1/weights.pt", b"old")
    uri = f"memory://{root}/ft1"
    assert (weights.resolve(uri) / "weights.pt").read_bytes() == b"old"
    time.sleep(0.01)
    fs.pipe_file(f"{root}/ft1/weights.pt", b"new!")
    folder = weights.resolve(uri)
    assert (folder / "weights.pt").read_bytes() == b"new!" and (folder / "embedder.json").read_bytes() == b"{}"


def test_missing_remote_weights_are_named(cache, memfs):
    _, root = memfs
    with pytest.raises(weights.WeightsNotFound, match="do not exist"):
        weights.resolve(f"memory://{root}/absent.pt")


def test_sweep_removes_only_old_partials(tmp_path):
    """A killed writer's partial file or folder goes once it is over an hour old; fresh partials (a writer
    at work), the user's own files and complete cache entries stay."""
    old = time.time() - 2 * weights.STALE_PARTIAL_S

    def make(name: str, folder: bool = False, age: float | None = old):
        path = tmp_path / name
        if folder:
            path.mkdir()
            (path / "part").write_bytes(b"x")
        else:
            path.write_bytes(b"x")
        if age is not None:
            os.utime(path, (age, age))
        return path

    gone = [make(".partial-0123abcd.4242.pt"), make(".partial-xyz", folder=True),
            make(".0123456789abcdef0123.pt.777.tmp")]                  # the 2026-12-01 naming
    kept = [make(".partial-fresh.1.pt", age=None), make("notes.txt"), make(".hidden-user-file"),
            make("0123456789abcdef0123.pt"), make("ab12cd34", folder=True), make(".0123.pt.777.tmp")]
    assert weights.sweep_partials(tmp_path) == len(gone)
    assert not any(p.exists() for p in gone)
    assert all(p.exists() for p in kept)
    assert weights.sweep_partials(tmp_path / "absent") == 0


def test_sweep_asks_the_writer_on_this_host_before_the_clock(tmp_path):
    """A partial entry names its writer (host, pid). On this host a live writer's entry stays however old it is
    (a download still running after an hour) and a dead writer's entry goes at once; an entry of another host
    sharing the folder falls back to the age rule."""
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 2 * weights.STALE_PARTIAL_S

    def make(name: str, age: float | None = None) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "model.pt").write_bytes(b"half")
        if age is not None:
            os.utime(path, (age, age))
        return path

    live = make(weights.partial_name("slow-download"), age=old)
    gone_dead = make(weights.partial_name("x").replace(f"~{os.getpid()}~", f"~{dead.pid}~"))
    other_fresh = make(".partial-elsewhere~1~fresh")
    other_old = make(".partial-elsewhere~1~old", age=old)
    assert live.name.startswith(weights.PARTIAL_PREFIX) and f"~{os.getpid()}~" in live.name
    assert weights.sweep_partials(tmp_path) == 2
    assert live.exists() and other_fresh.exists()
    assert not gone_dead.exists() and not other_old.exists()
