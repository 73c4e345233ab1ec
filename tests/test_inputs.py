"""Input listing and reading on real files: identities, hidden and linked entries, manifests, odd files."""
from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

import schemas as S
from workers import reading
from workers.decode import DecodeConfig, _pil_decode, decode_image
from workers.inputs import list_inputs
from workers.reading import read_many
from workers.storage import StorageError

SAMPLE = Path(__file__).parent / "data" / "sample"
FACE = SAMPLE / "George_W_Bush" / "George_W_Bush_0001.jpg"
FAKE_HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00\x00\x00\x10meta" + bytes(200)


def _put(path: Path, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(FACE.read_bytes() if data is None else data)
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR declaring width x height, a tiny IDAT and IEND (no real pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(16))) + chunk(b"IEND", b"")


def _by_uri(df: pd.DataFrame) -> dict[str, dict]:
    return {r[S.URI]: r for r in df.to_dict("records")}


def _in_thread(fn, timeout_s: float):
    """fn() in a daemon thread: (finished, result or exception)."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["out"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive(), box.get("out")


# 1. identity

def test_identity_is_the_first_folder_under_the_root(tmp_path):
    _put(tmp_path / "alice" / "cam2" / "a.jpg")
    _put(tmp_path / "alice" / "b.jpg")
    _put(tmp_path / "bob" / "x" / "y" / "c.jpg")
    _put(tmp_path / "loose.jpg")
    df, _ = list_inputs(str(tmp_path))
    got = dict(zip(df[S.URI].map(lambda u: os.path.relpath(u, tmp_path)), df[S.IDENTITY]))
    assert got == {"alice/cam2/a.jpg": "alice", "alice/b.jpg": "alice", "bob/x/y/c.jpg": "bob", "loose.jpg": None}


# 2. underscore, hidden and linked entries

def test_underscore_folders_are_processed_and_hidden_entries_are_reported(tmp_path):
    keep = [_put(tmp_path / "_misc" / "a.jpg"), _put(tmp_path / "alice" / "_raw" / "b.jpg")]
    hidden = [_put(tmp_path / ".thumbs" / "c.jpg"), _put(tmp_path / "alice" / ".d.jpg"),
              _put(tmp_path / "bob" / ".cache" / "x" / "e.jpg"), _put(tmp_path / ".DS_Store", b"junk")]
    other = _put(tmp_path / "alice" / "notes.txt", b"hello")
    df, skipped = list_inputs(str(tmp_path))
    assert sorted(df[S.URI]) == sorted(map(str, keep))
    assert dict(zip(df[S.URI], df[S.IDENTITY]))[str(keep[0])] == "_misc"
    assert sorted(skipped["hidden"]) == sorted(map(str, hidden))
    assert skipped["not_an_image_extension"] == [str(other)]


def test_symlinked_folders_and_files_are_followed_without_looping(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    _put(elsewhere / "alice_photos" / "a.jpg")
    real = _put(elsewhere / "b.jpg")
    root.mkdir()
    (root / "alice").symlink_to(elsewhere / "alice_photos", target_is_directory=True)
    (root / "bob").mkdir()
    (root / "bob" / "b.jpg").symlink_to(real)
    (root / "bob" / "again").symlink_to(root / "bob", target_is_directory=True)   # a cycle
    (root / "bob" / "up").symlink_to(root, target_is_directory=True)              # another
    finished, out = _in_thread(lambda: list_inputs(str(root)), 60)
    assert finished, "list_inputs did not return within 60 s"
    if isinstance(out, BaseException):
        raise out
    df, _ = out
    assert dict(zip(df[S.URI], df[S.IDENTITY])) == {str(root / "alice" / "a.jpg"): "alice",
                                                   str(root / "bob" / "b.jpg"): "bob"}
    assert df[S.FINGERPRINT].notna().all() and (df["size"] == FACE.stat().st_size).all()


# 3. duplicate manifest rows

def test_manifest_exact_duplicates_are_collapsed_and_reported(tmp_path):
    _put(tmp_path / "a.jpg"), _put(tmp_path / "b.jpg")
    (tmp_path / "m.csv").write_text("uri,identity\na.jpg,alice\nb.jpg,bob\na.jpg,alice\na.jpg,alice\n")
    df, skipped = list_inputs(str(tmp_path / "m.csv"))
    assert list(df[S.URI]) == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]
    assert skipped["duplicate"] == [str(tmp_path / "a.jpg")] * 2


def test_manifest_uri_with_two_identities_raises(tmp_path):
    (tmp_path / "m.csv").write_text("uri,identity\na.jpg,alice\nb.jpg,bob\na.jpg,carol\nc.jpg,x\nc.jpg,y\n")
    with pytest.raises(StorageError) as err:
        list_inputs(str(tmp_path / "m.csv"))
    msg = str(err.value)
    assert "\n" not in msg and "2 uris" in msg and str(tmp_path / "a.jpg") in msg


# 4. GIF and HEIC

def test_gif_is_listed_and_decodes_its_first_frame(tmp_path):
    red, blue = (Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 0, 255)))
    buf = io.BytesIO()
    red.save(buf, "GIF", save_all=True, append_images=[blue])
    gif = _put(tmp_path / "alice" / "anim.gif", buf.getvalue())
    face = io.BytesIO()
    Image.open(FACE).save(face, "GIF")
    _put(tmp_path / "alice" / "face.gif", face.getvalue())
    df, skipped = list_inputs(str(tmp_path))
    assert len(df) == 2 and not skipped.get("not_an_image_extension")
    res = decode_image(gif.read_bytes())
    assert res.error is None, res.detail
    assert res.image.shape == (48, 64, 3) and res.image.dtype == np.uint8
    assert (res.image[..., 0] > 200).all() and (res.image[..., 2] < 50).all()   # the red first frame
    via_opencv = decode_image(face.getvalue()).image
    assert via_opencv.shape == (250, 250, 3)
    via_pillow = _pil_decode(face.getvalue())          # the fallback for OpenCV builds without GIF
    assert via_pillow.shape == via_opencv.shape and np.abs(via_pillow.astype(int) - via_opencv).max() <= 2


def test_heic_is_listed_and_recorded_as_unsupported(tmp_path):
    _put(tmp_path / "alice" / "a.HEIC", FAKE_HEIC), _put(tmp_path / "alice" / "b.heif", FAKE_HEIC)
    _put(tmp_path / "alice" / "c.avif", FAKE_HEIC.replace(b"heic", b"avif"))
    df, skipped = list_inputs(str(tmp_path))
    assert len(df) == 3 and not skipped.get("not_an_image_extension")
    res = decode_image(FAKE_HEIC)
    assert res.image is None and res.error == S.ERR_UNSUPPORTED and "HEIC" in res.detail


# 5. empty manifest cells

def test_manifest_empty_uri_cells_raise_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("uri,identity\na.jpg,alice\n,bob\nb.jpg,bob\n,carol\n")
    with pytest.raises(StorageError) as err:
        list_inputs(str(tmp_path / "m.csv"))
    msg = str(err.value)
    assert "\n" not in msg and "m.csv" in msg and "2 empty" in msg and "2, 4" in msg
    pq.write_table(pa.table({"uri": ["a.jpg", None, "b.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(StorageError, match=r"1 empty .*row.* 2\b"):
        list_inputs(str(tmp_path / "m.parquet"))


def test_manifest_empty_identity_is_none(tmp_path):
    for name in "abc":
        _put(tmp_path / f"{name}.jpg")
    (tmp_path / "m.csv").write_text("uri,identity\na.jpg,\nb.jpg,NA\nc.jpg,carol\n")
    df, _ = list_inputs(str(tmp_path / "m.csv"))
    assert df[S.IDENTITY].tolist() == [None, "NA", "carol"]
    pq.write_table(pa.table({"uri": ["a.jpg", "b.jpg"], "identity": [None, "bob"]}), tmp_path / "m.parquet")
    df, _ = list_inputs(str(tmp_path / "m.parquet"))
    assert df[S.IDENTITY].tolist() == [None, "bob"]


# 6. non-regular files, byte cap, MemoryError

def test_read_many_refuses_fifos_and_devices(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    ok = _put(tmp_path / "ok.jpg")
    try:
        finished, out = _in_thread(lambda: read_many([str(fifo), "/dev/zero", str(ok)], retries=6), 30)
    finally:  # unblock a reader stuck in open() on the FIFO
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    assert finished, "read_many blocked on a FIFO or /dev/zero"
    if isinstance(out, BaseException):
        raise out
    assert out[2] == FACE.read_bytes()
    for exc in out[:2]:
        assert isinstance(exc, Exception) and reading.error_reason(exc) == S.ERR_NOT_A_FILE, repr(exc)
    df, _ = list_inputs(str(tmp_path))   # a FIFO in a folder is an input row (recorded as not_a_file)
    assert str(fifo) in set(df[S.URI])


def test_read_many_byte_cap_and_error_reasons(tmp_path):
    small, big = _put(tmp_path / "small.jpg", bytes(1000)), _put(tmp_path / "big.jpg", bytes(1001))
    out = read_many([str(small), str(big), str(tmp_path / "gone.jpg"), str(tmp_path)], max_bytes=1000)
    assert out[0] == bytes(1000)
    assert [reading.error_reason(e) for e in out[1:]] == [S.ERR_TOO_LARGE, S.ERR_MISSING, S.ERR_NOT_A_FILE]
    assert "1001" in str(out[1]) and "1000" in str(out[1])
    assert reading.error_reason(ConnectionError("reset")) == S.ERR_READ


class _OutOfMemoryFS(MemoryFileSystem):
    protocol = "oomtest"
    calls = 0

    def cat_file(self, path, start=None, end=None, **kwargs):
        type(self).calls += 1
        raise MemoryError("no room")


def test_memory_error_is_not_retried():
    fsspec.register_implementation("oomtest", _OutOfMemoryFS, clobber=True)
    _OutOfMemoryFS.calls = 0
    out = read_many(["oomtest://a.jpg", "oomtest://b.jpg"], retries=2)
    assert all(isinstance(e, MemoryError) for e in out)
    assert _OutOfMemoryFS.calls == 2


# 7. details never hold file bytes

def test_error_details_never_hold_file_contents():
    for secret in (b"root:x:0:0:root:/root:/bin/bash\n" * 4, b"AWS_SECRET_ACCESS_KEY=hunter2hunter2\x00" * 4):
        res = decode_image(secret)
        assert res.error == S.ERR_NOT_IMAGE
        assert "root" not in res.detail and "hunter2" not in res.detail and "AWS" not in res.detail, res.detail
        assert str(len(secret)) in res.detail


# 8. decompression bombs and DecodeConfig

def test_bomb_header_reports_its_real_size_for_any_max_pixels():
    before = Image.MAX_IMAGE_PIXELS
    bomb = _png_header(50000, 50000)
    res = decode_image(bomb, DecodeConfig(max_pixels=40_000_000))
    assert res.error == S.ERR_TOO_LARGE and res.detail == "50000x50000 exceeds max_pixels=40000000"
    res = decode_image(bomb, DecodeConfig(max_pixels=1_000_000_000))
    assert res.error == S.ERR_TOO_LARGE and res.detail.startswith("50000x50000 "), res.detail
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("kwargs, text", [({"max_pixels": 0}, "got 0"), ({"max_pixels": 2_000_000_000}, "got 2000000000"),
                                          ({"min_side": 0}, "got 0")])
def test_decode_config_rejects_bad_limits(kwargs, text):
    with pytest.raises(ValueError, match=text):
        DecodeConfig(**kwargs)


# 9. MTCNNConfig

def test_mtcnn_config_rejects_negative_max_faces():
    from workers.faces.mtcnn import MTCNNConfig

    with pytest.raises(ValueError, match="max_faces.*-1"):
        MTCNNConfig(max_faces=-1)
    assert MTCNNConfig(max_faces=0).max_faces == 0


# 10. manifest fingerprints and sizes

def test_manifest_rows_get_fingerprints_and_sizes(tmp_path):
    a, b = _put(tmp_path / "imgs" / "a.jpg"), _put(tmp_path / "imgs" / "b.jpg", b"x" * 10)
    (tmp_path / "m.csv").write_text("uri,identity,fingerprint\nimgs/a.jpg,alice,\nimgs/b.jpg,bob,sha256:abc\n"
                                    "imgs/gone.jpg,carol,\n")
    df, _ = list_inputs(str(tmp_path / "m.csv"))
    rows = _by_uri(df)
    st = a.stat()
    assert rows[str(a)][S.FINGERPRINT] == f"{st.st_size}:{st.st_mtime_ns}"
    assert rows[str(b)][S.FINGERPRINT] == "sha256:abc"                     # the manifest's own wins
    assert rows[str(tmp_path / "imgs" / "gone.jpg")][S.FINGERPRINT] is None
    assert df["size"].dtype == "Int64" and df["size"].tolist() == [st.st_size, 10, pd.NA]
    a.write_bytes(FACE.read_bytes()[:-10])                                  # changed behind the same uri
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _by_uri(list_inputs(str(tmp_path / "m.csv"))[0])[str(a)][S.FINGERPRINT] != rows[str(a)][S.FINGERPRINT]
    folder, _ = list_inputs(str(tmp_path / "imgs"))
    assert _by_uri(folder)[str(a)][S.FINGERPRINT] == f"{st.st_size - 10}:{st.st_mtime_ns + 1_000_000_000}"
    assert folder["size"].dtype == "Int64"


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto.server")
    from tests.s3util import MotoS3

    server = MotoS3().start()
    server.fs().mkdir("raw")
    yield server
    server.stop()


def test_s3_manifest_fingerprints_come_from_one_listing_per_prefix(s3):
    fs = s3.fs()
    files = {"sample/a/1.jpg": b"1" * 11, "sample/a/2.jpg": b"2" * 12, "sample/b/3.jpg": b"3" * 13}
    for key, data in files.items():
        fs.pipe_file(f"raw/{key}", data)
    fs.pipe_file("raw/sample/m.csv", b"uri,identity\na/1.jpg,x\na/2.jpg,x\nb/3.jpg,y\nc/4.jpg,z\n")
    mark = s3.log_mark()
    df, _ = list_inputs("s3://raw/sample/m.csv", s3.options)
    requests = s3.requests_since(mark)
    assert not [r for r in requests if ".jpg" in r], requests               # no request per file
    for prefix in ("a", "b", "c"):                                           # one listing per prefix
        assert sum(f"prefix=sample/{prefix}/&" in r for r in requests) == 1, requests
    rows = _by_uri(df)
    for key, data in files.items():
        etag = fs.info(f"raw/{key}")["ETag"].strip('"')
        assert rows[f"s3://raw/{key}"][S.FINGERPRINT] == f"{len(data)}:{etag}"
        assert rows[f"s3://raw/{key}"]["size"] == len(data)
    assert rows["s3://raw/sample/c/4.jpg"][S.FINGERPRINT] is None
    folder, _ = list_inputs("s3://raw/sample/", s3.options)                 # same fingerprints as a folder
    assert _by_uri(folder)["s3://raw/sample/a/1.jpg"][S.FINGERPRINT] == rows["s3://raw/sample/a/1.jpg"][S.FINGERPRINT]


def test_s3_read_many_caps_bytes_in_one_request(s3):
    fs = s3.fs()
    fs.pipe_file("raw/read/empty.jpg", b""), fs.pipe_file("raw/read/ok.jpg", b"k" * 100)
    fs.pipe_file("raw/read/big.jpg", b"b" * 101)
    uris = [f"s3://raw/read/{n}.jpg" for n in ("empty", "ok", "big", "gone")]
    out = read_many(uris, s3.options, retries=1, max_bytes=100)
    assert out[0] == b"" and out[1] == b"k" * 100
    assert [reading.error_reason(e) for e in out[2:]] == [S.ERR_TOO_LARGE, S.ERR_MISSING]
