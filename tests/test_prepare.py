"""prepare end to end on real Ray: schemas, row accounting, bad input, resume after a kill, CLI errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pytest

import schemas as S
from tests.badfiles import make_bad_files
from tests.compare import assert_same_rows, commits, committed_shards
from tests.procs import kill_tree
from tests.conftest import REPO, SAMPLE, copy_people, lfw_people, needs_lfw
from workers import dataset
from workers.lease import LEASE_FILE
from workers.pipeline import PrepareConfig, plan_shards, run_prepare, shard_sizes
from workers.records import decode_crops
from workers.graph import PoolSettings

pytestmark = needs_lfw


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_prepare_writes_every_image_and_face(prepared_lfw, lfw_subset):
    out, summary = prepared_lfw
    images = dataset.read_table(str(out), S.IMAGES)
    faces = dataset.read_table(str(out), S.FACES)
    assert images.schema.equals(S.IMAGES_SCHEMA) and faces.schema.equals(S.FACES_SCHEMA)
    assert images.schema.metadata[b"facemill.schema_version"] == S.SCHEMA_VERSION.encode()
    files = _files(lfw_subset)
    # every input accounted for, once
    assert images.num_rows == len(files) == summary["images_in"]
    assert sorted(images.column(S.URI).to_pylist()) == sorted(str(f) for f in files)
    status = images.column(S.STATUS).to_pylist()
    assert status.count("ok") + status.count("no_face") + status.count("error") == len(files)
    assert status.count("ok") == summary["images_with_faces"] >= 0.99 * len(files)
    assert faces.num_rows == pc.sum(images.column(S.NUM_FACES)).as_py() == summary["faces"]
    # identity = folder name, on both tables
    for uri, ident in zip(images.column(S.URI).to_pylist(), images.column(S.IDENTITY).to_pylist()):
        assert ident == Path(uri).parent.name
    emb = faces.column(S.EMBEDDING).combine_chunks().flatten().to_numpy().reshape(-1, S.EMBEDDING_DIM)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    crops = decode_crops(faces.column(S.CROP).combine_chunks()[:8])
    assert crops.shape == (8, 112, 112, 3)
    assert set(faces.column(S.EMBEDDER).to_pylist()) == {"sface"}
    # face_index runs 0..n-1 within each image
    df = faces.select([S.IMAGE_ID, S.FACE_INDEX]).to_pandas()
    assert (df.groupby(S.IMAGE_ID)[S.FACE_INDEX].apply(lambda s: sorted(s) == list(range(len(s))))).all()
    assert (out / "summary.json").is_file()


def test_rerun_of_a_finished_run_does_nothing(prepared_lfw, lfw_subset, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(prepared_lfw[0], out)          # leave the shared fixture's output as it was
    before = committed_shards(str(out))
    version = dataset.table_version(dataset.records_uri(str(out)))
    summary = run_prepare(PrepareConfig(input=str(lfw_subset), output=str(out), shard_size=64),
                          log=lambda *_: None)
    assert summary["images_in"] == 0 and summary["images_already_done"] == summary["images_listed"]
    assert committed_shards(str(out)) == before
    assert dataset.table_version(dataset.records_uri(str(out))) == version == summary["table_version"]


def test_bad_files_are_recorded_not_fatal(ray_session, tmp_path):
    src = tmp_path / "in"
    expected = make_bad_files(SAMPLE / "Tony_Blair" / "Tony_Blair_0001.jpg", src / "odd")
    shutil.copytree(SAMPLE / "Colin_Powell", src / "Colin_Powell")
    (src / "notes.txt").write_text("not an image, skipped and counted")
    out = tmp_path / "out"
    summary = run_prepare(PrepareConfig(input=str(src), output=str(out), shard_size=5), log=lambda *_: None)
    images = dataset.read_table(str(out), S.IMAGES).to_pandas()
    assert len(images) == len(expected) + 2 == summary["images_in"]
    assert summary["skipped_non_image_files"] == 1
    by_name = {Path(u).name: row for u, row in zip(images[S.URI], images.itertuples())}
    for name, (status, reason) in expected.items():
        row = by_name[name]
        if status == "error":
            assert row.status == "error" and row.error == reason, (name, row.error, row.error_detail)
        else:
            assert row.status in ("ok", "no_face") and pd.isna(row.error), (name, row.error_detail)
            assert row.width > 0 and row.height > 0
    # the face photos in odd formats are still found as faces
    for name in ("grayscale.jpg", "rgba.png", "sixteen_bit.png", "cmyk.jpg", "exif_rotated.jpg"):
        assert by_name[name].status == "ok", name
    assert by_name["exif_rotated.jpg"].width == 250
    assert summary["images_error"] == sum(1 for s, _ in expected.values() if s == "error")
    assert sum(summary["errors_by_reason"].values()) == summary["images_error"]


def test_actor_threads_and_cpu_headroom_rules():
    from workers.graph import actor_threads, check_cpu_headroom, write_task_cpus

    assert actor_threads(3, 1.0, 0.0, 1, [2.0]) == 3                   # asked for
    assert actor_threads(0, 1.0, 0.0, 1, [2.0]) == 2                   # laptop: one actor takes both cores
    assert actor_threads(0, 1.0, 0.0, 2, [16.0]) == 8
    assert actor_threads(0, 1.0, 0.0, 1, [16.0, 16.0]) == 1            # several nodes: its reserved CPUs
    assert actor_threads(0, 4.0, 1.0, 1, [16.0]) == 4                  # GPU actors: their reserved CPUs
    check_cpu_headroom(2, 1.0, 0.0, 2.0)                               # decode fused into the actors
    check_cpu_headroom(1, 1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="reserve 2 of the cluster's 2 CPUs"):
        check_cpu_headroom(1, 2.0, 1.0, 2.0)
    # Write tasks get what is left, so that they run while the actors live (the stream keeps flowing).
    assert write_task_cpus(1.0, 0.0, 2.0) == 0.5                         # laptop default: one actor
    assert write_task_cpus(2.0, 0.0, 2.0) == 0.0                         # --actors 2 on 2 CPUs
    assert write_task_cpus(1.0, 1.0, 2.0) == 0.0                         # decode tasks take the rest
    assert write_task_cpus(8.0, 1.0, 16.0) == 0.5                        # a GPU node


def test_actor_pool_that_starves_decoding_is_refused(ray_session, tmp_path):
    """One actor holding both CPUs of the local Ray would leave decode tasks waiting forever: refused with
    a clear message, the output's lock released, and the same output then works."""
    src = tmp_path / "in"
    shutil.copytree(SAMPLE / "Colin_Powell", src / "Colin_Powell")
    out = tmp_path / "out"
    greedy = PrepareConfig(input=str(src), output=str(out), pool=PoolSettings(cpus_per_actor=2))
    with pytest.raises(ValueError, match="leaving less than the 1 its read/decode tasks need"):
        run_prepare(greedy, log=lambda *_: None)
    assert not (out / LEASE_FILE).exists()
    summary = run_prepare(PrepareConfig(input=str(src), output=str(out)), log=lambda *_: None)
    assert summary["images_in"] == len(list((src / "Colin_Powell").iterdir()))


def test_killed_run_resumes_to_the_same_rows_as_a_clean_run(ray_session, tmp_path):
    src = tmp_path / "in"
    copy_people(lfw_people(4, 8, seed=11), src, per_person=4)        # 32 images
    clean = tmp_path / "clean"
    run_prepare(PrepareConfig(input=str(src), output=str(clean), shard_size=4), log=lambda *_: None)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.prepare", "--input", str(src), "--output", str(out),
                             "--shard-size", "4", "--shards-per-call", "1", "--local-cpus", "2"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if commits(out) >= 2:
            break
        time.sleep(0.05)
    # the whole tree: Ray's local processes leave the driver's process group, and a write task left
    # running would commit one more shard after we count them
    kill_tree(proc)
    # anything that escaped the tree (reparented to init) dies with its driver; let it settle
    stable_since, seen = time.time(), -1
    while time.time() - stable_since < 3:
        n = commits(out)
        if n != seen:
            stable_since, seen = time.time(), n
        time.sleep(0.2)
    done = committed_shards(str(out))
    assert 0 < len(done) < 8, f"kill landed after {len(done)} of 8 shards"
    # only committed shards are visible, whatever else lies on disk: whole shards of 4 images
    partial = dataset.read_table(str(out), S.IMAGES)
    assert partial.num_rows == 4 * len(done)
    # the dead driver's lease does not block the rerun (same host, its pid is gone): no --force-unlock
    summary = run_prepare(PrepareConfig(input=str(src), output=str(out), shard_size=4), log=lambda *_: None)
    assert summary["images_already_done"] == partial.num_rows
    assert summary["images_in"] == 32 - partial.num_rows
    assert assert_same_rows(str(clean), str(out)) == 32
    assert not list(out.rglob("*.tmp-*"))


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "jobs.prepare", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_bad_arguments_fail_fast_with_one_line(tmp_path):
    missing = _cli("--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    unwritable = _cli("--input", str(SAMPLE), "--output", str(blocker / "sub"))
    assert unwritable.returncode == 2 and "not writable" in unwritable.stderr
    unknown = _cli("--input", str(SAMPLE), "--output", str(tmp_path / "o"), "--embedder", "facenet512")
    assert unknown.returncode == 2 and "unknown embedder" in unknown.stderr
    bad_cfg = _cli("--input", str(SAMPLE), "--output", str(tmp_path / "o"), "--min-face-size", "4")
    assert bad_cfg.returncode == 2 and "min_face_size" in bad_cfg.stderr
    # A shard is one Delta commit whose predicate lists its uris; delta-rs crashes the process on ~25k of them.
    huge = _cli("--input", str(SAMPLE), "--output", str(tmp_path / "o"), "--shard-size", "30000")
    assert huge.returncode == 2 and "shard_size must be in [1, 10000]" in huge.stderr
    assert len(huge.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_first_shards_are_small_and_grow_to_the_shard_size():
    # The first commit waits for one small actor call, not shards_per_call x shard_size images.
    assert shard_sizes(2000, 256, 2) == [8, 8, 16, 16, 32, 32, 64, 64, 128, 128, 256, 256, 256, 256, 256, 224]
    assert shard_sizes(100, 64, 1) == [8, 16, 32, 44]
    assert shard_sizes(100, 64, 1, first=16) == [16, 32, 52]
    assert shard_sizes(32, 4, 1) == [4] * 8 and shard_sizes(5, 256, 2) == [5] and shard_sizes(0, 8, 2) == []
    todo = pd.DataFrame({S.URI: [f"/in/p/{i:04d}.jpg" for i in range(300)][::-1], S.IDENTITY: "p",
                         S.FINGERPRINT: None})
    shards = plan_shards(todo, 128, salt="r", shards_per_call=2)
    uris = [u for s in shards for u in s["uris"]]
    assert [len(s["uris"]) for s in shards] == shard_sizes(300, 128, 2) and uris == sorted(todo[S.URI])
    assert len({s["shard"] for s in shards}) == len(shards)
