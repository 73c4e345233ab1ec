"""prepare reading from and writing to s3:// on moto's server at 127.0.0.1 (real HTTP, real s3fs)."""
from __future__ import annotations

import pandas as pd
import pytest

import schemas as S
from tests.conftest import SAMPLE, copy_people, lfw_people, needs_lfw
from tests.s3util import MotoS3
from workers import dataset, inputs, storage
from workers.pipeline import PrepareConfig, run_prepare


@pytest.fixture(scope="module")
def s3():
    server = MotoS3().start()
    fs = server.fs()
    for bucket in ("raw", "faces"):
        fs.mkdir(bucket)
    yield server
    server.stop()


@needs_lfw
def test_prepare_s3_to_s3(ray_session, s3, tmp_path):
    local = tmp_path / "in"
    n = copy_people(lfw_people(3, 6, seed=5), local, per_person=3)
    assert s3.upload_tree(local, "s3://raw/lfw") == n
    opts = tuple(s3.options.items())
    summary = run_prepare(PrepareConfig(input="s3://raw/lfw/", output="s3://faces/run1", shard_size=5,
                                        storage_options=opts), log=lambda *_: None)
    assert summary["images_in"] == n and summary["images_with_faces"] == n
    images = dataset.read_table("s3://faces/run1", S.IMAGES, s3.options)
    faces = dataset.read_table("s3://faces/run1", S.FACES, s3.options)
    assert images.schema.equals(S.IMAGES_SCHEMA) and faces.schema.equals(S.FACES_SCHEMA)
    assert images.num_rows == n and faces.num_rows == summary["faces"] >= n
    uris = images.column(S.URI).to_pylist()
    assert all(u.startswith("s3://raw/lfw/") for u in uris)
    assert images.column(S.IDENTITY).to_pylist() == [u.split("/")[-2] for u in uris]
    assert all(fp and not fp.startswith("None") for fp in images.column(S.FINGERPRINT).to_pylist())
    fs = s3.fs()
    assert fs.exists("faces/run1/summary.json") and not fs.exists("faces/run1/_lease.json")
    # rerun: nothing to do
    again = run_prepare(PrepareConfig(input="s3://raw/lfw/", output="s3://faces/run1", shard_size=5,
                                      storage_options=opts), log=lambda *_: None)
    assert again["images_in"] == 0 and again["images_already_done"] == n
    # training reads a worker's identities' crops straight from s3 (row groups holding them only)
    from workers.training.data import DataConfig, load_encoded_faces

    cfg = DataConfig(faces="s3://faces/run1", storage_options=opts)
    names = sorted(set(images.column(S.IDENTITY).to_pylist()))[:2]
    got = load_encoded_faces(cfg, names)
    want = faces.to_pandas()
    want = want[want[S.IDENTITY].isin(names) & (want[S.FACE_INDEX] == 0)].sort_values(S.IMAGE_ID)
    assert len(got) == len(want) > 0
    assert [got.crop(i).tobytes() for i in range(len(got))] == list(want[S.CROP])


def test_manifest_on_s3_and_missing_bucket(ray_session, s3):
    assert s3.upload_tree(SAMPLE, "s3://raw/sample") == 8
    rows = [{"uri": p.relative_to(SAMPLE).as_posix(), "identity": f"person-{p.parent.name[:3]}"}
            for p in sorted(SAMPLE.glob("*/*.jpg"))]
    s3.fs().pipe_file("raw/sample/manifest.csv", pd.DataFrame(rows).to_csv(index=False).encode())
    listed, _ = inputs.list_inputs("s3://raw/sample/manifest.csv", s3.options)
    assert len(listed) == 8 and listed[S.URI].str.startswith("s3://raw/sample/").all()
    summary = run_prepare(PrepareConfig(input="s3://raw/sample/manifest.csv", output="s3://faces/manifest",
                                        storage_options=tuple(s3.options.items())), log=lambda *_: None)
    assert summary["images_in"] == 8
    idents = set(dataset.read_table("s3://faces/manifest", S.IMAGES, s3.options).column(S.IDENTITY).to_pylist())
    assert idents == {r["identity"] for r in rows}
    with pytest.raises(storage.StorageError, match="not writable"):
        storage.check_writable("s3://no-such-bucket/out", s3.options)
    with pytest.raises(storage.StorageError, match="does not exist"):
        inputs.list_inputs("s3://raw/absent/", s3.options)
