"""HTML run reports: self-contained pages from fake shard rows, from a real prepare run, and the
landmark geometry of the sample crops."""
from __future__ import annotations

import base64
import json
import html
import re
import time
from pathlib import Path

import numpy as np
import pytest

import schemas as S
from workers import dataset, plots, report, report_data, storage
from workers.faces.align import AlignConfig, crop_landmarks

DATA_URI = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_rows(n: int, seed: int = 0, t0: float = 1.7e9) -> list[dict]:
    """Shard rows shaped like ``workers.actors.write_shard``'s."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        faces = int(rng.integers(0, 6))
        reasons = {S.ERR_TRUNCATED: 1, S.ERR_DECODE: 2} if i % 3 == 0 else {}
        rows.append({
            "shard": f"part-{i:05d}", "images": 10, "faces": faces, "ok": 6,
            "no_face": 4 - sum(reasons.values()), "error": sum(reasons.values()), "reasons": json.dumps(reasons),
            "face_sizes": rng.uniform(20, 200, faces).astype(np.float32),
            "face_scores": rng.uniform(0.9, 1.0, faces).astype(np.float32),
            "written_at": t0 + 0.5 * i + rng.uniform(0, 0.2), "pid": 1000 + i % 2,
        })
    return rows


def _summary(rows: list[dict], **extra) -> dict:
    reasons: dict[str, int] = {}
    for r in rows:
        for k, v in json.loads(r["reasons"]).items():
            reasons[k] = reasons.get(k, 0) + v
    return {"run_id": "20260101T000000Z-abcdef", "input": "s3://bucket/in", "output": "s3://bucket/out",
            "embedder": "sface", "schema_version": S.SCHEMA_VERSION, "images_listed": 12345,
            "images_already_done": 0, "images_in": sum(r["images"] for r in rows),
            "images_with_faces": sum(r["ok"] for r in rows), "images_no_face": sum(r["no_face"] for r in rows),
            "images_error": sum(r["error"] for r in rows), "errors_by_reason": reasons,
            "faces": sum(r["faces"] for r in rows), "shards": len(rows), "skipped_non_image_files": 2,
            "skipped_by_reason": {"not_an_image_extension": 2}, "skipped_examples": ["a.txt", "b.json"], "median_face_size_px": 88.5, "wall_time_s": 61.25,
            "images_per_s": 9.87, **extra}


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in DATA_URI.findall(page)]


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:)?//""", page, re.I), "external reference"
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert all(m.startswith("data:") for m in re.findall(r"""src=['"]([^'"]*)""", page))
    for png in _images(page):
        assert png.startswith(PNG_MAGIC)


# --------------------------------------------------------------------------------------------------
# Fake rows (always run)
# --------------------------------------------------------------------------------------------------

def test_fake_rows_page(tmp_path):
    rows = _fake_rows(40)
    summary = _summary(rows)
    uri = report.write_prepare_report(str(tmp_path), summary, rows, None)
    assert uri == str(tmp_path / "report.html")
    page = Path(uri).read_text()
    assert_self_contained(page)
    for key in ("images_in", "images_with_faces", "images_no_face", "images_error", "faces"):
        assert f"<div class=v>{summary[key]:,}</div>" in page, key
    assert "61.2 s" in page and "9.9" in page                            # wall time, img/s
    # Errors table: each reason and its count.
    assert re.search(rf"<code>{S.ERR_DECODE}</code></td><td class=n>{summary['errors_by_reason'][S.ERR_DECODE]}<",
                     page)
    assert f"<code>{S.ERR_TRUNCATED}</code>" in page
    # Throughput + 2 histograms; the sample crops cannot be read (no dataset there): a note, not a crash.
    assert len(_images(page)) == 3
    assert "could not be drawn" in page and "is not a facemill dataset" in page


def test_empty_run_page(tmp_path):
    summary = _summary([], images_listed=240, images_already_done=240, images_in=0, wall_time_s=0.4,
                       images_per_s=0.0, median_face_size_px=None)
    uri = report.write_prepare_report(str(tmp_path), summary, [], None)
    page = Path(uri).read_text()
    assert_self_contained(page)
    assert "Nothing was processed" in page and "240 already done" in page
    assert _images(page) == []
    assert "could not be drawn" not in page


def test_broken_inputs_still_write_a_page(tmp_path, monkeypatch):
    rows = _fake_rows(3)
    rows[1]["reasons"] = "{not json"
    rows[2].pop("face_scores")
    page = Path(report.write_prepare_report(str(tmp_path), {"run_id": "x"}, rows, None)).read_text()
    assert_self_contained(page)
    assert "could not be drawn" in page                                  # the errors table
    assert "JSONDecodeError" in page
    # An unwritable output is logged, not raised.
    def refuse(*_args, **_kwargs):
        raise PermissionError("denied")

    monkeypatch.setattr(storage, "put_atomic", refuse)
    assert report.write_prepare_report(str(tmp_path / "other"), {}, rows, None) is None
    assert report.write_evaluate_report(str(tmp_path / "other"), {}, None, None) is None


def test_single_shard_and_no_faces(tmp_path):
    rows = _fake_rows(1)
    rows[0].update(faces=0, face_sizes=np.zeros(0, np.float32), face_scores=np.zeros(0, np.float32))
    page = report.build_prepare_report(str(tmp_path), _summary(rows), rows)
    assert "no rate over time" in page and "No faces in this run" in page
    assert "could not be drawn" not in page


def test_throughput_series():
    rows = [{"images": 10, "written_at": 100.0 + 2 * i} for i in range(11)]      # 5 img/s after the first
    edges, rate = report.throughput_series(rows)
    assert edges.size == 11 and edges[-1] == 20.0 and np.allclose(rate, 5.0)
    many = [{"images": 10, "written_at": 0.5 * i} for i in range(101)]
    edges, rate = report.throughput_series(many, max_bins=30)
    assert rate.size == 30 and np.allclose(rate, 20.0)
    assert report.throughput_series(rows[:1])[0].size == 0
    assert report.throughput_series([{"images": 1, "written_at": 5.0}] * 3)[0].size == 0


def test_10k_rows_is_cheap(tmp_path):
    rows = _fake_rows(10_000)
    summary = _summary(rows)
    report.build_prepare_report(str(tmp_path), summary, rows[:5])           # imports, fonts: once
    start = time.process_time()                  # CPU time: other jobs on a shared machine don't count
    page = report.build_prepare_report(str(tmp_path), summary, rows)
    elapsed = time.process_time() - start
    assert len(_images(page)) == 3
    assert elapsed < 2.0, f"report of 10k rows took {elapsed:.2f} s of CPU"


def test_evaluate_page(tmp_path):
    from workers.evaluation import verification as V

    rng = np.random.default_rng(0)
    same = np.repeat([True, False], 300)
    scores = np.where(same, rng.normal(0.6, 0.15, 600), rng.normal(0.1, 0.15, 600))
    folds = np.tile(np.repeat(np.arange(10), 30), 2)
    acc = V.kfold_accuracy(scores, same, folds)
    val = V.val_at_far(scores, same, 1e-2, folds=folds)
    auc = V.roc_auc(scores, same)
    png = plots.plot_roc({"sface": V.roc_curve(scores, same)}, tmp_path / "roc.png").read_bytes()
    result = {"run_id": "eval-1", "embedder": "sface", "dataset": "lfw", "accuracy": acc, "val_at_far": val,
              "auc": auc, "num_pairs": 600}
    uri = report.write_evaluate_report(str(tmp_path), result, png, None)
    page = Path(uri).read_text()
    assert_self_contained(page)
    assert f"{100 * acc['mean']:.2f}% ± {100 * acc['std']:.2f}" in page
    assert f"{100 * val['val']:.2f}%" in page and "FAR=0.01" in page
    assert f"{auc:.4f}" in page
    assert _images(page) == [png]
    assert page.count("<tr><td class=n>") == 10                          # one row per fold
    # Plain floats, no ROC: still a page.
    page = report.build_evaluate_report({"accuracy": 0.9912, "accuracy_std": 0.004}, None)
    assert "99.12% ± 0.40" in page and "No ROC figure" in page


# --------------------------------------------------------------------------------------------------
# Landmarks in the crop
# --------------------------------------------------------------------------------------------------

def test_crop_landmarks_recovers_a_known_similarity():
    points = AlignConfig().points().numpy().astype(np.float64)
    rng = np.random.default_rng(3)
    angle, scale, shift = rng.uniform(-0.5, 0.5, 8), rng.uniform(0.5, 4, 8), rng.uniform(-50, 300, (8, 2))
    rot = np.stack([np.stack([np.cos(angle), -np.sin(angle)], 1), np.stack([np.sin(angle), np.cos(angle)], 1)], 1)
    # Landmarks in an "image": the template carried back through the image -> crop map s R x + shift.
    landmarks = ((points[None] - shift[:, None]) @ rot) / scale[:, None, None]
    mapped, m = crop_landmarks(landmarks, points)
    np.testing.assert_allclose(mapped, np.broadcast_to(points, mapped.shape), atol=1e-3)
    np.testing.assert_allclose(m[:, :, :2], scale[:, None, None] * rot, atol=1e-5)
    np.testing.assert_allclose(m[:, :, 2], shift, atol=1e-3)
    with pytest.raises(ValueError, match=r"\[F, 5, 2\]"):
        crop_landmarks(np.zeros((2, 4, 2)), points)


# --------------------------------------------------------------------------------------------------
# A real prepare run (LFW; skipped without it)
# --------------------------------------------------------------------------------------------------

def _first_faces(out: Path, uri: str | None = None, n: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first ``n`` faces of the dataset in (uri, face_index) order, or the faces of one ``uri``."""
    import pyarrow.compute as pc

    from workers.records import decode_crops

    table = dataset.read_table(str(out), S.FACES, columns=[S.URI, S.FACE_INDEX, S.LANDMARKS, S.CROP],
                               filter=None if uri is None else pc.field(S.URI) == uri)
    table = table.sort_by([(S.URI, "ascending"), (S.FACE_INDEX, "ascending")]).slice(0, n)
    landmarks = table.column(S.LANDMARKS).combine_chunks().flatten().to_numpy().reshape(-1, 5, 2)
    return landmarks, decode_crops(table.column(S.CROP)), table.column(S.URI).to_pylist()


@pytest.mark.slow
def test_real_prepare_report(prepared_lfw):
    out, summary = prepared_lfw
    page_path = out / "report.html"
    assert page_path.is_file(), "run_prepare should write report.html"
    page = page_path.read_text()
    assert_self_contained(page)
    assert "could not be drawn" not in page
    for key in ("images_in", "images_with_faces", "images_no_face", "images_error", "faces"):
        assert f"<div class=v>{summary[key]:,}</div>" in page, key
    assert summary["images_in"] > 200 and summary["faces"] > 0
    images = _images(page)
    crops = [png for png in images if png[16:24] == (112).to_bytes(4, "big") * 2]   # IHDR width, height
    assert len(crops) == report.NUM_SAMPLES
    assert len(images) == report.NUM_SAMPLES + 3                              # + throughput, 2 histograms
    assert page.count("<figure>") == report.NUM_SAMPLES
    assert page.count("<circle class=l ") == page.count("<circle class=t ") == 5 * report.NUM_SAMPLES
    assert len(page) < 1_500_000, len(page)
    # The dots drawn are the landmarks mapped into the crop: the first sample's are one of its image's faces.
    first_uri = html.unescape(re.search(r"<img alt='face 0' title='([^']+)'", page).group(1))
    landmarks, crops_stored, _ = _first_faces(out, uri=first_uri)
    points = AlignConfig(size=112).points().numpy().astype(np.float64)
    mapped, _ = crop_landmarks(landmarks, points)
    drawn = np.array(re.findall(r"<circle class=l cx='([-\d.]+)' cy='([-\d.]+)'", page)[:5], float)
    assert np.abs(mapped - drawn[None]).max(axis=(1, 2)).min() < 0.01


@pytest.mark.slow
def test_real_landmarks_land_on_the_template(prepared_lfw):
    out, _ = prepared_lfw
    landmarks, crops, _ = _first_faces(out)
    assert landmarks.shape[0] >= 16
    points = AlignConfig(size=crops.shape[1]).points().numpy().astype(np.float64)
    mapped, m = crop_landmarks(landmarks, points)
    # Reference: the similarity x -> [[a, -b], [b, a]] x + t is linear in (a, b, tx, ty); float64 lstsq per face.
    for i in range(len(landmarks)):
        x, y = landmarks[i].astype(np.float64).T
        rows = np.concatenate([np.stack([x, -y, np.ones(5), np.zeros(5)], 1),
                               np.stack([y, x, np.zeros(5), np.ones(5)], 1)])
        (a, b, tx, ty), *_ = np.linalg.lstsq(rows, np.concatenate([points[:, 0], points[:, 1]]), rcond=None)
        np.testing.assert_allclose(m[i], [[a, -b, tx], [b, a, ty]], rtol=1e-6, atol=1e-3)
    error = np.linalg.norm(mapped - points[None], axis=2)                      # [F, 5] crop pixels
    # The residual of a 5-point similarity fit on real faces (LFW, 112 px crops): eyes land within about
    # 1.5 px, the whole set within 3 px at the median; the nose tip sits a few px off the template (head
    # pose, and MTCNN's nose vs ArcFace's), and no point strays far.
    assert np.median(error) < 3.0, np.median(error)
    assert np.median(error[:, :2]) < 2.5, np.median(error[:, :2], 0)
    assert np.percentile(error[:, :2], 90) < 4.0
    assert error.max() < 15.0, error.max()
    # Least squares with a translation: the residuals average out exactly.
    np.testing.assert_allclose(mapped.mean(1), np.broadcast_to(points.mean(0), (len(mapped), 2)), atol=1e-3)


@pytest.mark.slow
def test_real_transform_is_the_crops(prepared_lfw):
    """The recomputed image -> crop map re-cuts the stored crop from the original image."""
    import cv2

    from workers.decode import decode_image

    out, _ = prepared_lfw
    landmarks, crops, uris = _first_faces(out)
    points = AlignConfig(size=crops.shape[1]).points().numpy().astype(np.float64)
    _, m = crop_landmarks(landmarks[:8], points)
    for i in range(min(8, len(uris))):
        image = decode_image(Path(uris[i]).read_bytes()).image
        recut = cv2.warpAffine(image, m[i], crops.shape[1:3], flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT)
        diff = np.abs(recut.astype(np.float64) - crops[i]).mean()
        shifted = np.abs(np.roll(recut, 3, axis=1).astype(np.float64) - crops[i]).mean()
        assert diff < 6.0 and diff < shifted, (uris[i], diff, shifted)


def test_run_record_sets_the_template_framing(tmp_path):
    from workers.faces.engine import EngineConfig
    from workers.pipeline import PrepareConfig
    from workers.runs import write_run_record

    cfg = PrepareConfig(input="in", output=str(tmp_path), run_id="run-1",
                        engine=EngineConfig(align=AlignConfig(margin=0.1)))
    write_run_record(str(tmp_path), _summary([], run_id="run-1"), cfg)
    align = report_data.run_align(str(tmp_path), "run-1", 112, None)
    assert align == AlignConfig(size=112, margin=0.1)
    assert report_data.run_align(str(tmp_path), "missing", 96, None) == AlignConfig(size=96)


def test_run_record_is_typed_and_names_a_missing_key(tmp_path):
    from workers.runs import PrepareSummary, read_prepare_record

    storage.put_atomic(str(tmp_path / storage.RUNS / "run-2.json"), json.dumps(_summary([])).encode())
    with pytest.raises(ValueError, match="has no 'config'"):
        read_prepare_record(str(tmp_path), "run-2")
    partial = _summary([])
    partial.pop("faces")
    with pytest.raises(ValueError, match="has no 'faces'"):
        PrepareSummary.from_dict(partial)
