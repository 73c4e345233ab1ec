"""What a hostile probe of the dataset layer found, each reproduced end to end on real Ray and fixed.

Each test names the defect it covers (issue "datasets that never lose or serve stale data"). The numbers
refer to that issue's list: 1 deleted user files, 2 stale faces, 3 missed changes, 4 a weak lock, 8 late
or unclear failures. Input-side defects (5-7) are covered in tests/test_inputs.py.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import schemas as S
from tests.compare import assert_same_rows, commits
from tests.conftest import REPO, SAMPLE, copy_people, lfw_people, needs_lfw
from tests.procs import kill_tree
from workers import dataset
from workers.lease import LEASE_FILE
from workers.pipeline import PrepareConfig, run_prepare
from workers.graph import PoolSettings

QUIET = dict(log=lambda *_: None)
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def _job(module: str, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def _sample_tree(dest: Path, people: int = 4) -> Path:
    for person in sorted(SAMPLE.iterdir())[:people]:
        shutil.copytree(person, dest / person.name)
    return dest


def test_1_prepare_refuses_an_output_that_holds_the_users_files(tmp_path):
    """`prepare --input dataset/images --output dataset` deleted every input ("removed 7 partial files")."""
    user = tmp_path / "dataset"
    (user / "images").mkdir(parents=True)
    for photo in sorted(SAMPLE.glob("*/*.jpg")):                                # a flat folder, as in the probe
        shutil.copy(photo, user / "images" / photo.name)
    before = {p: p.read_bytes() for p in user.rglob("*") if p.is_file()}
    t0 = time.time()
    proc = _job("jobs.prepare", "--input", user / "images", "--output", user)
    _one_line_error(proc, "is not empty and is not a facemill dataset")
    assert time.time() - t0 < 60 and "ray" not in proc.stdout.lower()         # refused before Ray started
    assert {p: p.read_bytes() for p in user.rglob("*") if p.is_file()} == before


def test_2_replaced_images_lose_their_old_faces_and_user_files_survive(ray_session, tmp_path):
    """An image replaced by one with no face, or by a broken file, kept serving its old face rows."""
    src = _sample_tree(tmp_path / "in")
    out = tmp_path / "out"
    first = run_prepare(PrepareConfig(input=str(src), output=str(out), shard_size=3), **QUIET)
    assert first["images_with_faces"] == 8
    (out / "notes.txt").write_text("the user's own file")
    (out / S.RECORDS / "keep.me").write_text("also the user's")
    summary_before = (out / "summary.json").read_text()

    blank, broken = src / "Colin_Powell" / "Colin_Powell_0001.jpg", src / "Tony_Blair" / "Tony_Blair_0002.jpg"
    cv2.imwrite(str(blank), np.full((250, 250, 3), 128, np.uint8))          # no face in it
    broken.write_bytes(b"this is no longer a picture " * 40)
    for path in (blank, broken):
        os.utime(path, (time.time() + 5, time.time() + 5))
    second = run_prepare(PrepareConfig(input=str(src), output=str(out), shard_size=3), **QUIET)
    assert second["images_in"] == 2 and second["images_already_done"] == 6
    images = dataset.read_table(str(out), S.IMAGES).to_pandas().set_index(S.URI)
    faces = dataset.read_table(str(out), S.FACES).to_pandas()
    assert images.loc[str(blank), S.STATUS] == S.STATUS_NO_FACE
    assert images.loc[str(broken), S.STATUS] == S.STATUS_ERROR
    assert not {str(blank), str(broken)} & set(faces[S.URI]), "faces of replaced images are still served"
    assert len(images) == 8 and len(faces) == images[S.NUM_FACES].sum()

    # re-embedding follows the current faces; a no-op rerun leaves summary.json and report.html alone
    from workers.reprocess import ReembedConfig, run_reembed

    run_reembed(ReembedConfig(root=str(out), embedder="sface", name="again"), **QUIET)
    assert dataset.read_embeddings(str(out), "again").num_rows == len(faces)
    summary_now, report_now = (out / "summary.json").read_text(), (out / "report.html").read_bytes()
    assert summary_now != summary_before
    third = run_prepare(PrepareConfig(input=str(src), output=str(out), shard_size=3), **QUIET)
    assert third["nothing_to_do"]
    assert (out / "summary.json").read_text() == summary_now and (out / "report.html").read_bytes() == report_now
    assert json.loads((out / "_runs" / f"{third['run_id']}.json").read_text())["nothing_to_do"]
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert (out / S.RECORDS / "keep.me").read_text() == "also the user's"


def test_3_changes_missing_files_and_settings_are_redone(ray_session, tmp_path):
    """Manifest rows had no fingerprint (changes missed); error rows were never retried; rows made with a
    bad setting blocked the correct rerun."""
    src = _sample_tree(tmp_path / "in", people=2)
    late = src / "late" / "late.jpg"
    manifest = tmp_path / "m.csv"
    uris = sorted(str(p) for p in src.rglob("*.jpg")) + [str(late)]
    pd.DataFrame({"uri": uris, "identity": [Path(u).parent.name for u in uris]}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    run = lambda **kw: run_prepare(PrepareConfig(input=str(manifest), output=str(out), **kw), **QUIET)  # noqa: E731
    first = run()
    images = dataset.read_table(str(out), S.IMAGES).to_pandas().set_index(S.URI)
    assert images.loc[str(late), S.ERROR] == S.ERR_MISSING and first["images_with_faces"] == 4

    late.parent.mkdir()
    shutil.copy(SAMPLE / "Tony_Blair" / "Tony_Blair_0001.jpg", late)              # the file arrives
    changed = Path(uris[0])
    cv2.imwrite(str(changed), cv2.imread(str(changed)), [cv2.IMWRITE_JPEG_QUALITY, 50])  # same uri, new bytes
    second = run()
    assert second["images_in"] == 2 and second["images_with_faces"] == 2
    images = dataset.read_table(str(out), S.IMAGES).to_pandas().set_index(S.URI)
    assert set(images.index[images[S.RUN_ID] == second["run_id"]]) == {str(late), str(changed)}

    # A run with a setting that finds nothing, then the right one: every row is redone, faces come back.
    from workers.faces.engine import EngineConfig
    from workers.faces.mtcnn import MTCNNConfig

    blind = run(engine=EngineConfig(mtcnn=MTCNNConfig(min_face_size=400)))
    assert blind["images_in"] == 5 and blind["images_with_faces"] == 0
    assert dataset.read_table(str(out), S.FACES).num_rows == 0
    fixed = run()
    assert fixed["images_in"] == 5 and fixed["images_with_faces"] == 5
    assert dataset.read_table(str(out), S.FACES).num_rows >= 5


def test_4_two_runs_at_once_one_works_the_other_stops_before_ray(tmp_path):
    src = _sample_tree(tmp_path / "in")
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "jobs.prepare", "--input", str(src), "--output", str(out),
                              "--local-cpus", "2"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / LEASE_FILE).exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    t0 = time.time()
    second = _job("jobs.prepare", "--input", src, "--output", out, "--local-cpus", "2")
    waited = time.time() - t0
    _one_line_error(second, "is in use by run", "prepare")
    assert waited < 30, f"the refusal took {waited:.0f} s (it must come before Ray starts)"
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert "8 images in" in stdout and not (out / LEASE_FILE).exists()


@needs_lfw
@pytest.mark.slow
def test_runs_killed_at_random_points_end_with_a_clean_runs_rows(ray_session, tmp_path, fault_log):
    """Five runs SIGKILLed at seeded random moments, each resumed by the next; a last run completes.
    The dataset then holds exactly a clean run's rows, and no lease is left to clear by hand."""
    src = tmp_path / "in"
    copy_people(lfw_people(4, 6, seed=31), src, per_person=4)                     # 24 images, 12 shards
    clean = tmp_path / "clean"
    run_prepare(PrepareConfig(input=str(src), output=str(clean), shard_size=2), **QUIET)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.prepare", "--input", str(src), "--output", str(out), "--shard-size", "2",
            "--shards-per-call", "1", "--local-cpus", "2"]
    kills = []
    for seed in range(5):
        rng = random.Random(seed)
        target = commits(out) + rng.randint(1, 2)       # let this run commit 1-2 shards, then kill it mid-stream
        proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 180
        while commits(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))   # a warm pipeline commits several 2-image shards a second
        finished = proc.poll() is not None
        kill_tree(proc)
        kills.append("finished" if finished else f"after {commits(out)} commits")
    final = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-2000:]
    assert assert_same_rows(str(clean), str(out)) == 24
    images = dataset.read_table(str(out), S.IMAGES).to_pandas()
    assert images[S.URI].is_unique and len(images) == 24
    assert sum(k != "finished" for k in kills) >= 3, kills
    fault_log.append(f"random-kills: 5 prepare drivers SIGKILLed at seeded points ({'; '.join(kills)}), then "
                     f"one rerun: rows equal a clean run's (24 images)")


_TWO_NODES = """
import sys
sys.path.insert(0, sys.argv[1])
import ray
from ray.cluster_utils import Cluster
from workers.pipeline import check_cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
try:
    check_cluster(["/data/in", "s3://b/out"], "auto", "float32", False)
    print("NOT REFUSED")
except ValueError as exc:
    print("refused:", exc)
check_cluster(["/data/in"], "auto", "float32", True)
check_cluster(["s3://b/in", "s3://b/out"], "auto", "float32", False)
print("shared-fs and s3 accepted")
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_local_paths_on_a_two_node_cluster_are_refused():
    proc = subprocess.run([sys.executable, "-c", _TWO_NODES, str(REPO)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert "refused: the Ray cluster has 2 nodes, but '/data/in' is a local path" in proc.stdout, proc.stderr[-3000:]
    assert "shared-fs and s3 accepted" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("flags, needle", [
    (["--device", "cpu", "--embed-precision", "float16"], "float16 needs CUDA"),
    (["--torch-threads", "-3"], "torch_threads must be >= 0"),
    (["--actors", "-1"], "actors must be >= 0"),
    (["--max-faces", "-1"], "max_faces"),
    (["--max-pixels", "-1"], "max_pixels"),
    (["--run-id", "../outside"], "run_id must be"),
    (["--run-id", "/abs/path"], "run_id must be"),
])
def test_8_bad_settings_fail_at_once_with_one_line(tmp_path, flags, needle):
    t0 = time.time()
    proc = _job("jobs.prepare", "--input", SAMPLE, "--output", tmp_path / "o", *flags)
    _one_line_error(proc, needle)
    assert time.time() - t0 < 60 and not (tmp_path / "o").exists()


def test_8_device_cuda_without_a_gpu_is_one_line(ray_session, tmp_path):
    import ray

    if ray.cluster_resources().get("GPU"):
        pytest.skip("this Ray has a GPU")
    with pytest.raises(ValueError, match="--device cuda, but the Ray cluster has no GPU"):
        run_prepare(PrepareConfig(input=str(SAMPLE), output=str(tmp_path / "o"), pool=PoolSettings(device="cuda")), **QUIET)
    assert not (tmp_path / "o" / LEASE_FILE).exists()


def test_8_evaluate_names_a_missing_dataset_and_a_folder_given_as_pairs(tmp_path, prepared_lfw, lfw_dir):
    missing = _job("jobs.evaluate", "--faces", tmp_path / "nope", "--pairs", lfw_dir / "pairs.txt",
                   "--output", tmp_path / "e")
    _one_line_error(missing, "is not a facemill dataset")
    folder = _job("jobs.evaluate", "--faces", prepared_lfw[0], "--pairs", tmp_path, "--output", tmp_path / "e")
    _one_line_error(folder, "is a folder")


def test_8_a_sigkilled_driver_leaves_no_ray_processes_behind(tmp_path):
    """A SIGKILLed embedded-Ray driver left ray::DashboardAgent and ray::RuntimeEnvAgent running."""
    from jobs._watchdog import alive
    from tests.procs import descendants

    src = _sample_tree(tmp_path / "in")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.prepare", "--input", str(src), "--output",
                             str(tmp_path / "out"), "--local-cpus", "2"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    agents: list[int] = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        tree = descendants(proc.pid)
        names = {p: Path(f"/proc/{p}/cmdline").read_bytes() if Path(f"/proc/{p}/cmdline").exists() else b""
                 for p in tree}
        agents = [p for p, c in names.items() if b"DashboardAgent" in c or b"RuntimeEnvAgent" in c]
        if len(agents) >= 2:
            break
        time.sleep(0.2)
    assert len(agents) >= 2, "the embedded Ray's agents never appeared"
    ray_tree = [p for p in descendants(proc.pid) if p != proc.pid]
    os.kill(proc.pid, signal.SIGKILL)                                    # the driver only
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(alive(p) for p in ray_tree):
        time.sleep(0.5)
    left = [p for p in ray_tree if alive(p)]
    assert not left, f"{len(left)} Ray processes outlived their driver, agents among them: " \
                     f"{sorted(set(left) & set(agents))}"
