"""Shared fixtures: one local Ray per session, LFW on disk, and a small prepared LFW dataset."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from workers.graph import PoolSettings

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Dummy credentials for moto's S3 server (inherited by Ray workers started from this process).
for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
LFW = Path(os.environ.get("FACEMILL_LFW", REPO.parent / "shared" / "data" / "lfw"))
LFW_IMAGES = LFW / "images"
SAMPLE = REPO / "tests" / "data" / "sample"


def lfw_available() -> bool:
    return (LFW / "pairs.txt").is_file() and LFW_IMAGES.is_dir()


needs_lfw = pytest.mark.skipif(not lfw_available(), reason=f"LFW not found at {LFW} (set FACEMILL_LFW)")


@pytest.fixture(scope="session")
def lfw_dir() -> Path:
    if not lfw_available():
        pytest.skip(f"LFW not found at {LFW} (set FACEMILL_LFW)")
    return LFW


@pytest.fixture(scope="session")
def ray_session():
    """The one local Ray of the test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # noqa: BLE001
        pass
    yield ray
    ray.shutdown()


def lfw_people(min_images: int, count: int, seed: int = 0) -> list[str]:
    """A seeded choice of LFW identities with at least ``min_images`` images."""
    names = sorted(p.name for p in LFW_IMAGES.iterdir()
                   if p.is_dir() and len(list(p.glob("*.jpg"))) >= min_images)
    return sorted(random.Random(seed).sample(names, count))


def copy_people(names: list[str], dest: Path, per_person: int | None = None) -> int:
    """Copy LFW identities into an <identity>/<image> tree; returns the image count."""
    n = 0
    for name in names:
        (dest / name).mkdir(parents=True, exist_ok=True)
        for f in sorted((LFW_IMAGES / name).glob("*.jpg"))[:per_person]:
            shutil.copy(f, dest / name / f.name)
            n += 1
    return n


@pytest.fixture(scope="session")
def lfw_subset(tmp_path_factory, lfw_dir) -> Path:
    """About 240 LFW images: 30 people with >= 6 images (6 each) + 60 people with 1 image."""
    root = tmp_path_factory.mktemp("lfw_subset")
    many = lfw_people(6, 30, seed=1)
    copy_people(many, root, per_person=6)
    singles = [p for p in lfw_people(1, 200, seed=2) if p not in many][:60]
    copy_people(singles, root, per_person=1)
    return root


@pytest.fixture(scope="session")
def prepared_lfw(tmp_path_factory, ray_session, lfw_subset) -> tuple[Path, dict]:
    """``prepare`` run once over :func:`lfw_subset`: (output root, summary)."""
    from workers.pipeline import PrepareConfig, run_prepare

    out = tmp_path_factory.mktemp("prepared") / "lfw"
    summary = run_prepare(PrepareConfig(input=str(lfw_subset), output=str(out), shard_size=64,
                                        pool=PoolSettings(shards_per_call=1)), log=lambda *_: None)
    return out, summary


FAULT_LINES: list[str] = []


@pytest.fixture(scope="session")
def fault_log():
    """Collects one line per injected fault; printed at the end of the run (and to $FACEMILL_FAULT_LOG)."""
    return FAULT_LINES


def pytest_terminal_summary(terminalreporter):
    if FAULT_LINES:
        terminalreporter.section("fault injection summary")
        for line in FAULT_LINES:
            terminalreporter.write_line(line)
        path = os.environ.get("FACEMILL_FAULT_LOG")
        if path:
            Path(path).write_text("\n".join(FAULT_LINES) + "\n")
