"""The user's path: `ray start` + `ray job submit` + `ray stop`.

Runs last (file name): `ray stop` kills every Ray on the machine, so the session's local Ray goes first.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import schemas as S
from tests.conftest import REPO
from tests.s3util import free_port
from workers import dataset


@pytest.mark.slow
def test_ray_start_job_submit_stop(tmp_path):
    import ray

    ray.shutdown()
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    # Token authentication on, as Ray >= 2.59 wants for local clusters: one secret for server and client.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    dash = free_port()
    start = subprocess.run(
        [ray_bin, "start", "--head", f"--port={free_port()}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        out = tmp_path / "out"
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(REPO),
             "--", sys.executable, "-m", "jobs.prepare", "--input", "tests/data/sample", "--output", str(out)],
            env=env, capture_output=True, text=True, timeout=600)
        log = job.stdout[-4000:] + job.stderr[-2000:]
        assert job.returncode == 0, log
        assert "succeeded" in job.stdout, log
        assert "8 images in" in job.stdout, log
        images = dataset.read_table(str(out), S.IMAGES)
        assert images.num_rows == 8 and set(images.column(S.STATUS).to_pylist()) == {"ok"}
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
