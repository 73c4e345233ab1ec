"""Fault injection on real Ray and a real S3 server: nothing is lost, nothing is duplicated.

Each test appends one line to the session's fault summary (printed at the end of the run).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import schemas as S
from tests.badfiles import make_bad_files
from tests.compare import assert_same_rows, commits
from tests.procs import descendants as _descendants
from tests.procs import ray_workers
from tests.conftest import LFW_IMAGES, REPO, copy_people, lfw_people, needs_lfw
from tests.s3util import MotoS3, free_port
from workers import dataset
from workers.pipeline import PrepareConfig, run_prepare
from workers.graph import PoolSettings

pytestmark = [needs_lfw, pytest.mark.slow]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def fault_input(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault_in")
    copy_people(lfw_people(4, 8, seed=21), root, per_person=4)      # 32 images
    return root


@pytest.fixture(scope="module")
def clean_run(ray_session, fault_input, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault_clean") / "out"
    run_prepare(PrepareConfig(input=str(fault_input), output=str(out), shard_size=4), **QUIET)
    return out


def _run_in_thread(cfg: PrepareConfig):
    box: dict = {}

    def target():
        try:
            box["summary"] = run_prepare(cfg, **QUIET)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_face_actor_killed_mid_run(ray_session, fault_input, clean_run, tmp_path, fault_log):
    out = tmp_path / "out"
    t, box = _run_in_thread(PrepareConfig(input=str(fault_input), output=str(out), shard_size=4,
                                          pool=PoolSettings(shards_per_call=1)))
    _wait_for(lambda: commits(out) >= 1, 240, "a first commit")
    victims = ray_workers("FaceActor")
    assert victims, "no FaceActor process found"
    committed_at_kill = commits(out)
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    t.join(600)
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert committed_at_kill < 8, "the kill landed after the last shard"
    rows = assert_same_rows(str(clean_run), str(out))
    fault_log.append(f"actor-kill: SIGKILL {len(victims)} FaceActor process(es) after {committed_at_kill}/8 shards "
                     f"committed; run completed; rows equal a clean run's: images in 32 / out {rows}, "
                     f"faces {box['summary']['faces']} this run")


def _s3_commits(s3) -> int:
    try:
        return max(0, len(s3.fs().glob("fault-out/run/records/_delta_log/*.json")) - 1)
    except FileNotFoundError:
        return 0


@pytest.fixture
def s3(tmp_path):
    server = MotoS3().start()
    yield server
    server.stop()


def test_s3_server_down_mid_run_is_retried(ray_session, fault_input, clean_run, s3, fault_log):
    fs = s3.fs()
    fs.mkdir("fault-raw")                        # moto's buckets live per process: names of our own
    fs.mkdir("fault-out")
    n = s3.upload_tree(fault_input, "s3://fault-raw/in")
    cfg = PrepareConfig(input="s3://fault-raw/in/", output="s3://fault-out/run", shard_size=4, pool=PoolSettings(shards_per_call=1),
                        storage_options=tuple(s3.options.items()))
    t, box = _run_in_thread(cfg)
    _wait_for(lambda: _s3_commits(s3) >= 1, 240, "a first S3 commit")
    before = _s3_commits(s3)
    down = 4.0
    restarter = s3.restart_later(down)
    t.join(600)
    restarter.join()
    assert not t.is_alive() and "error" not in box, box.get("error")
    assert before < 8, "the outage came after the last shard"
    rows = assert_same_rows(str(clean_run), "s3://fault-out/run", None, s3.options)
    assert rows == n
    fault_log.append(f"s3-outage: moto S3 server stopped {down:.0f} s after {before}/8 shards committed, then "
                     f"restarted; reads/writes retried; rows equal a clean run's: images in {n} / out {rows}")


def test_s3_missing_bucket_and_read_only_bucket_fail_before_work(tmp_path, fault_log):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}   # IAM enforced after 4 set-up calls
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import boto3

        kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                  aws_secret_access_key="testing")
        _wait_for(lambda: _up(url), 30, "moto_server")
        boto3.client("s3", **kw).create_bucket(Bucket="readonly-bucket")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}
        iam.put_user_policy(UserName="reader", PolicyName="ro", PolicyDocument=json.dumps(policy))
        cli_env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                   "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_ENDPOINT_URL": url}
        results = {}
        for name, output in (("read-only", "s3://readonly-bucket/out"), ("missing", "s3://no-such-bucket/out")):
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "jobs.prepare", "--input", "tests/data/sample", "--output",
                                output], cwd=REPO, env=cli_env, capture_output=True, text=True, timeout=120)
            results[name] = (r, time.time() - t0)
            assert r.returncode == 2, r.stderr[-1500:]
            assert r.stderr.startswith("error: output") and "not writable" in r.stderr, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1
            assert "Started a local Ray" not in r.stdout + r.stderr   # failed before any work
        assert "Access Denied" in results["read-only"][0].stderr or "AccessDenied" in results["read-only"][0].stderr
        fault_log.append(
            "s3-permissions: output to a read-only bucket (IAM-enforced moto) and to a missing bucket: exit 2 "
            f"with one line before any work ({results['read-only'][1]:.1f} s, {results['missing'][1]:.1f} s)")
    finally:
        server.terminate()
        server.wait(10)


def _up(url: str) -> bool:
    """TCP connect only: an HTTP request would use up one of moto's unauthenticated actions."""
    import socket

    host, port = url.split("//")[1].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


def test_poison_data_at_scale(tmp_path, fault_log):
    src = tmp_path / "in"
    n_good = copy_people(lfw_people(1, 240, seed=31), src, per_person=1)
    faces = sorted(LFW_IMAGES.glob("*/*.jpg"))
    expected = {}
    for seed in range(2):
        folder = src / f"poison_{seed}"
        expected.update({f"poison_{seed}/{k}": v for k, v in make_bad_files(faces[seed * 7], folder, seed).items()})
    out = tmp_path / "out"
    peak = {"rss": 0, "proc": 0}
    stop = threading.Event()
    root_pid = {}

    def watch():
        while not stop.is_set():
            total = 0
            for pid in _descendants(root_pid["pid"]):
                try:
                    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, IndexError, ValueError):
                    continue
                total += rss
                peak["proc"] = max(peak["proc"], rss)
            peak["rss"] = max(peak["rss"], total)
            time.sleep(0.2)

    proc = subprocess.Popen([sys.executable, "-m", "jobs.prepare", "--input", str(src), "--output", str(out),
                             "--shard-size", "32", "--local-cpus", "2"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    root_pid["pid"] = proc.pid
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, stderr = proc.communicate(timeout=900)
    stop.set()
    watcher.join()
    assert proc.returncode == 0, stderr[-3000:]
    images = dataset.read_table(str(out), S.IMAGES).to_pandas()
    n_files = n_good + len(expected)
    assert len(images) == n_files and images[S.URI].is_unique
    errors = images[images[S.STATUS] == S.STATUS_ERROR]
    want_errors = sum(1 for s, _ in expected.values() if s == "error")
    assert len(errors) == want_errors and errors[S.ERROR].notna().all()
    by_rel = {"/".join(Path(u).parts[-2:]): e for u, e in zip(images[S.URI], images[S.ERROR])}
    for rel, (status, reason) in expected.items():
        if status == "error":
            assert by_rel[rel] == reason, rel
    assert peak["proc"] < 3 * 2 ** 30, f"a process peaked at {peak['proc'] / 2**30:.2f} GiB"
    reasons = errors[S.ERROR].value_counts().to_dict()
    fault_log.append(
        f"poison: {n_good} LFW images + {len(expected)} odd files ({len(expected) / n_files:.0%}; "
        f"{want_errors} unusable): exit 0, {len(images)}/{n_files} files accounted for, errors {reasons}, "
        f"peak RSS one process {peak['proc'] / 2**30:.2f} GiB, all Ray processes {peak['rss'] / 2**30:.2f} GiB")


def test_train_worker_killed_mid_run_resumes_from_checkpoint(ray_session, prepared_lfw, tmp_path, fault_log):
    from workers.training.data import DataConfig
    from workers.training.losses import LossConfig
    from workers.training.checkpoint import checkpoints_in
    from workers.training.config import METRICS_FILE, TrainConfig
    from workers.training.run import run_training

    root, _ = prepared_lfw
    images = dataset.read_table(str(root), S.IMAGES).to_pandas()
    counts = images[images[S.STATUS] == S.STATUS_OK].groupby(S.IDENTITY).size()
    singles = sorted(counts[counts < 2].index)
    pairs = tmp_path / "exclude.txt"
    pairs.write_text("".join(f"{a} 1 {b} 1\n" for a, b in zip(singles, singles[1:] + singles[:1])))
    output = tmp_path / "ft"
    cfg = TrainConfig(data=DataConfig(faces=str(root), exclude_pairs=str(pairs), heldout_fraction=0.2, seed=0),
                      output=str(output), loss=LossConfig(), workers=2, epochs=3, people_per_batch=4,
                      images_per_person=3, steps_per_epoch=2, lr=5e-4, warmup_epochs=0.5, use_gpu="false",
                      heldout_pairs_per_fold=40, max_failures=2)
    box: dict = {}

    def target():
        try:
            box["summary"] = run_training(cfg, log=lambda *_: None)
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    _wait_for(lambda: len(checkpoints_in(str(output))) >= 1 or not t.is_alive(), 600, "the first checkpoint")
    time.sleep(2.0)  # the checkpoint folder appears before Ray Train registers it as the latest
    metrics_at_kill = (output / METRICS_FILE).read_text().splitlines() if (output / METRICS_FILE).exists() else []
    victims = ray_workers("RayTrainWorker")
    assert victims and t.is_alive(), "no training worker to kill (run already over?)"
    os.kill(victims[-1], signal.SIGKILL)
    checkpoints_at_kill = len(checkpoints_in(str(output)))
    t.join(900)
    assert not t.is_alive() and "error" not in box, box.get("error")
    rows = [json.loads(line) for line in (output / METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    # the epochs finished before the kill were restored, not retrained: their rows are unchanged
    before = [json.loads(line) for line in metrics_at_kill]
    changed = {r["epoch"]: sorted(k for k in r if r[k] != b.get(k)) for r, b in zip(rows, before) if r != b}
    assert not changed, changed
    assert checkpoints_at_kill < 3
    fault_log.append(f"train-worker-kill: SIGKILL 1 of 2 RayTrainWorkers with {checkpoints_at_kill}/3 epoch "
                     f"checkpoints written; FailureConfig restarted the group from the last checkpoint; "
                     f"epochs 0-3 each recorded once, {len(metrics_at_kill)} earlier metric rows unchanged")
