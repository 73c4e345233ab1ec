"""jobs.audit: each finding on a small LFW set with injected faults, the job end to end, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pandas as pd
import pytest

import schemas as S
from scripts.audit_faults import degrade
from tests.conftest import LFW_IMAGES, REPO, SAMPLE, lfw_people, needs_lfw
from workers import dataset
from workers.audit.cluster_metrics import bcubed_scores, pairwise_scores
from workers.audit.clusters import ClusterSettings, cluster_faces, components
from workers.audit.config import AuditConfig
from workers.audit.duplicates import pixel_similarity, thumbnails
from workers.audit.groups import normalise, robust_centres
from workers.audit.knn import Index, SearchSettings, neighbours
from workers.audit.labels import LabelSettings, identity_splits, label_suspects, nearest_other
from workers.audit.quality import laplacian_sharpness, pose
from workers.audit.store import read_audit, read_summary
from workers.graph import PoolSettings
from workers.records import decode_crops

A = S.audit


# --------------------------------------------------------------------------------------------------
# The math, without Ray
# --------------------------------------------------------------------------------------------------

def _people(n_people: int, per: int, spread: float, dim: int = 32, seed: int = 0):
    """Unit embeddings of ``n_people`` synthetic identities: a random centre each plus noise."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.normal(size=(n_people, dim)))
    codes = np.repeat(np.arange(n_people), per)
    return normalise(centres[codes] + spread * rng.normal(size=(len(codes), dim)) / np.sqrt(dim)), codes


def test_robust_centre_ignores_the_wrong_face_and_scores_it_low():
    emb, codes = _people(6, 5, 0.5)
    wrong = codes.copy()
    wrong[0] = 3                                   # a face of person 0 labelled 3
    centres, own, weights, faces = robust_centres(emb, wrong, 6)
    assert weights[0] == 0 and weights[1:].all()   # the wrong face left person 3's centre
    assert own[0] < 0.3 < own[1:].min()
    assert list(faces) == [4, 5, 5, 6, 5, 5]
    idx = Index(centres)
    sims, rows = idx.search(emb, 3)
    other, cos = nearest_other(wrong, sims, rows)
    assert other[0] == 0 and cos[0] > 0.7
    score, flagged = label_suspects(own, cos, LabelSettings())
    assert np.flatnonzero(flagged).tolist() == [0] and score[0] == pytest.approx(cos[0] - own[0])


def test_a_face_alone_under_its_name_is_not_a_suspect():
    emb, codes = _people(3, 4, 0.4)
    codes = np.append(codes, 3)                    # identity 3: one face, of nobody else
    emb = np.vstack([emb, normalise(np.random.default_rng(9).normal(size=(1, emb.shape[1])))])
    _, own, _, _ = robust_centres(emb, codes, 4)
    assert np.isnan(own[-1])
    _, flagged = label_suspects(own, np.full(len(own), 0.9, np.float32))
    assert not flagged[-1]


def test_identity_splits_find_two_people_under_one_name_and_nothing_else():
    emb, codes = _people(5, 6, 0.4)
    merged = np.where(codes == 4, 0, codes)        # persons 0 and 4 under one name
    centres, _, _, _ = robust_centres(emb, merged, 5)
    split = identity_splits(emb, merged, centres).set_index("code")
    assert split.loc[0, "flagged"] and sorted(split.loc[0, "group_sizes"]) == [6, 6]
    assert not split.drop(index=0)["flagged"].any()


def test_knn_ivf_finds_the_exact_neighbours_and_skips_self():
    emb, _ = _people(400, 5, 0.3, dim=32)
    exact = Index(emb, SearchSettings())
    ivf = Index(emb, SearchSettings(exact_max=100))   # the default nprobe
    assert exact.exact and not ivf.exact
    se, re_ = neighbours(exact, emb, np.arange(len(emb)), 4)
    si, ri = neighbours(ivf, emb, np.arange(len(emb)), 4)
    assert not (re_ == np.arange(len(emb))[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(re_, ri)])
    assert recall > 0.95
    assert np.all(np.diff(se, axis=1) <= 1e-6)


def test_components_and_cluster_metrics():
    assert components(6, np.array([0, 2, 4]), np.array([1, 3, 0])).tolist() == [0, 0, 1, 1, 0, 2]
    truth = np.array([0, 0, 0, 1, 1, 2])
    assert pairwise_scores(truth, truth)["f"] == 1.0 and bcubed_scores(truth, truth)["f"] == 1.0
    one = np.zeros(6)
    # one cluster: pairwise precision = same-label pairs (3 + 1) / all pairs (15); BCubed precision by hand
    assert pairwise_scores(one, truth)["precision"] == pytest.approx(4 / 15)
    assert bcubed_scores(one, truth)["precision"] == pytest.approx((3 * 3 / 6 + 2 * 2 / 6 + 1 / 6) / 6)
    assert bcubed_scores(one, truth)["recall"] == 1.0


def test_clusters_recover_synthetic_identities():
    emb, codes = _people(30, 6, 0.5, dim=64, seed=3)
    sims, rows = neighbours(Index(emb), emb, np.arange(len(emb)), 10)
    labels, confidence = cluster_faces(emb, sims, rows, ClusterSettings())
    assert pairwise_scores(labels, codes)["f"] > 0.95 and bcubed_scores(labels, codes)["f"] > 0.95
    assert np.nanmin(confidence) > 0.4


@needs_lfw
def test_pixel_similarity_tells_a_re_encoded_copy_from_another_photo(tmp_path):
    from workers.faces.embedders import load_embedder
    from workers.faces.engine import EngineConfig, FaceEngine
    from workers.faces.mtcnn import MTCNN

    paths = sorted((LFW_IMAGES / "Colin_Powell").glob("*.jpg"))[:2]
    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in paths]
    copy = cv2.imdecode(np.frombuffer(degrade(images[0], "all"), np.uint8), cv2.IMREAD_COLOR)
    engine = FaceEngine(MTCNN.pretrained(), load_embedder("sface").module, EngineConfig())
    faces = engine.detect_align([np.ascontiguousarray(i[:, :, ::-1]) for i in (images[0], copy, images[1])])
    first = np.searchsorted(faces.image_index.cpu().numpy(), np.arange(3))   # each image's best face
    crops = list(faces.crops.cpu().numpy()[first])
    thumbs = thumbnails(np.stack(crops))
    sim = pixel_similarity(thumbs[[0, 0]], thumbs[[1, 2]])
    assert sim[0] > 0.92 > sim[1]
    assert pixel_similarity(thumbs[:0], thumbs[:0]).shape == (0,)   # no candidates (a set of strangers)
    mirrored = thumbnails(np.stack(crops)[:, :, ::-1])
    assert pixel_similarity(thumbs[:1], mirrored[:1])[0] > 0.999   # the mirror image counts as the same


def test_sharpness_and_pose_measure_what_they_say():
    rng = np.random.default_rng(0)
    sharp = rng.integers(0, 255, size=(1, 112, 112, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(sharp[0], (0, 0), 3)[None]
    assert laplacian_sharpness(sharp)[0] > laplacian_sharpness(blurred)[0] + 1
    frontal = np.array([[40, 50, 72, 50, 56, 66, 44, 82, 68, 82]], np.float32)
    turned = frontal.copy()
    turned[0, 4] += 12                              # nose moved 12 px right of the eyes' middle
    yaw, pitch, roll = pose(np.vstack([frontal, turned]))
    assert abs(yaw[0]) < 1e-6 and yaw[1] == pytest.approx(12 / 32)
    assert roll[0] == pytest.approx(0.0) and pitch[0] == pytest.approx(0.0, abs=1e-6)


def test_a_corrupt_stored_crop_is_marked_not_raised():
    from workers.audit.scan import decode_each
    from workers.records import encode_crops

    good = encode_crops(np.full((2, 112, 112, 3), 90, np.uint8)).to_pylist()
    crops, ok = decode_each([good[0], b"not a jpeg", good[1]])
    assert ok.tolist() == [True, False, True] and crops.shape == (3, 112, 112, 3)
    assert crops[1].max() == 0 and abs(int(crops[0].mean()) - 90) <= 2


def test_config_and_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="candidate"):
        from workers.audit.duplicates import DuplicateSettings
        DuplicateSettings(candidate=0.9, cosine_min=0.8)
    with pytest.raises(ValueError, match="against_dataset needs"):
        AuditConfig(root="a", output="b", against_dataset="c")
    with pytest.raises(ValueError, match="run_id"):
        AuditConfig(root="a", output="b", run_id="../x")


# --------------------------------------------------------------------------------------------------
# The job on a small LFW set with known faults
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty(tmp_path_factory, ray_session, lfw_dir):
    """10 LFW people x 6 images, 2 relabelled, 3 near-copies (one under another name), prepared."""
    from workers.faces.engine import EngineConfig
    from workers.faces.mtcnn import MTCNNConfig
    from workers.pipeline import PrepareConfig, run_prepare

    work = tmp_path_factory.mktemp("audit")
    people = lfw_people(6, 10, seed=4)
    rows = [{"uri": str(p), "identity": name} for name in people
            for p in sorted((LFW_IMAGES / name).glob("*.jpg"))[:6]]
    manifest = pd.DataFrame(rows)
    relabelled = {1: people[5], 20: people[0]}               # row -> the wrong identity
    for row, name in relabelled.items():
        manifest.loc[row, "identity"] = name
    copies = []
    for k, (row, transform, name) in enumerate([(8, "jpeg40", None), (33, "hflip", people[9]),
                                                (45, "all", None)]):
        image = cv2.imread(manifest.loc[row, "uri"], cv2.IMREAD_COLOR)
        path = work / "copies" / f"copy{k}_{transform}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(degrade(image, transform))
        copies.append((str(path), manifest.loc[row, "uri"], name or manifest.loc[row, "identity"]))
    unrelated = sorted((LFW_IMAGES / lfw_people(1, 1, seed=11)[0]).glob("*.jpg"))[0]
    extra = pd.DataFrame([{"uri": c, "identity": n} for c, _, n in copies] + [{"uri": str(unrelated),
                                                                                  "identity": "someone_else"}])
    manifest = pd.concat([manifest, extra], ignore_index=True)
    manifest.to_csv(work / "manifest.csv", index=False)
    root = work / "ds"
    run_prepare(PrepareConfig(input=str(work / "manifest.csv"), output=str(root), shard_size=32,
                              engine=EngineConfig(mtcnn=MTCNNConfig(select="center")), pool=PoolSettings(shards_per_call=1)), log=lambda *_: None)
    pairs = work / "pairs.txt"     # an evaluation protocol naming the original of the first copy
    orig = copies[0][1].split("/")
    number = int(orig[-1][-8:-4])
    pairs.write_text(f"{orig[-2]}\t{number}\t{1 if number != 1 else 2}\n")
    return {"root": str(root), "work": work, "manifest": manifest, "people": people, "copies": copies,
            "relabelled": {rows[r]["uri"] for r in relabelled}, "unrelated": str(unrelated), "pairs": str(pairs)}


def _audit(faulty, name: str, **kw) -> tuple[str, dict]:
    from workers.audit.run import run_audit

    out = str(faulty["work"] / name)
    cfg = AuditConfig(root=faulty["root"], output=out, chunk_size=16, **kw)
    return out, run_audit(cfg, log=lambda *_: None)


@needs_lfw
@pytest.mark.slow
def test_audit_finds_the_injected_faults_and_nothing_else(faulty):
    out, summary = _audit(faulty, "a1", against=faulty["pairs"], cluster=True)
    labels = read_audit(out, A.AUDIT_LABELS).to_pandas()
    flagged = set(labels.loc[labels[A.FLAGGED], S.URI])
    conflict = {c for c, _, n in faulty["copies"] if n == faulty["people"][9]}
    assert faulty["relabelled"] <= flagged <= faulty["relabelled"] | conflict
    dups = read_audit(out, A.AUDIT_DUPLICATES).to_pandas()
    inner = dups[dups[A.FLAGGED] & (dups[A.KIND] != A.DUP_LEAK)]
    found = {frozenset(p) for p in zip(inner[S.URI + "_a"], inner[S.URI + "_b"])}
    assert found == {frozenset((c, o)) for c, o, _ in faulty["copies"]}
    kinds = dict(zip(map(frozenset, zip(inner[S.URI + "_a"], inner[S.URI + "_b"])), inner[A.KIND]))
    assert sorted(kinds.values()) == [A.DUP_CROSS_IDENTITY, A.DUP_SAME_IDENTITY, A.DUP_SAME_IDENTITY]
    assert faulty["unrelated"] not in set(dups[S.URI + "_a"]) | set(dups[S.URI + "_b"])
    leaks = dups[dups[A.KIND] == A.DUP_LEAK]
    assert leaks[A.FLAGGED].sum() == 1
    leak = leaks[leaks[A.FLAGGED]].iloc[0]
    assert leak[S.URI + "_a"] == faulty["copies"][0][0] and leak[S.URI + "_b"] == faulty["copies"][0][1]
    quality = read_audit(out, A.AUDIT_QUALITY).to_pandas()
    assert len(quality) == summary["faces"] == len(faulty["manifest"])
    assert quality[A.SCORE_].between(0, 1).all() and quality["sharpness"].gt(0).all()
    clusters = read_audit(out, A.AUDIT_CLUSTERS).to_pandas()
    truth = clusters[S.URI].map(dict(zip(faulty["manifest"]["uri"], faulty["manifest"]["identity"])))
    originals = ~clusters[S.URI].isin(faulty["relabelled"] | {c for c, _, _ in faulty["copies"]})
    assert bcubed_scores(clusters[A.CLUSTER][originals], truth[originals])["f"] > 0.9
    s = read_summary(out)
    assert s["flagged"][A.AUDIT_DUPLICATES] == 4 and set(s["tables"]) == set(A.AUDIT_TABLES)
    html = (faulty["work"] / "a1" / "report.html").read_text()
    assert html.count("data:image/jpeg;base64") >= 10 and "Label suspects" in html


@needs_lfw
@pytest.mark.slow
def test_audit_is_deterministic_and_thresholds_apply(faulty):
    out1, _ = _audit(faulty, "d1")
    out2, _ = _audit(faulty, "d2", duplicates=__import__("workers.audit.duplicates", fromlist=["x"])
                     .DuplicateSettings(cosine_min=0.99, pixel_min=0.999, candidate=0.8))
    keys = [S.IMAGE_ID, S.FACE_INDEX]
    for name in (A.AUDIT_LABELS, A.AUDIT_QUALITY):
        a = read_audit(out1, name).to_pandas().drop(columns=[S.RUN_ID]).sort_values(keys, ignore_index=True)
        b = read_audit(out2, name).to_pandas().drop(columns=[S.RUN_ID]).sort_values(keys, ignore_index=True)
        pd.testing.assert_frame_equal(a, b)
    d1, d2 = read_audit(out1, A.AUDIT_DUPLICATES).to_pandas(), read_audit(out2, A.AUDIT_DUPLICATES).to_pandas()
    assert d1[A.FLAGGED].sum() == 3 and d2[A.FLAGGED].sum() < 3
    assert len(d1) == len(d2)          # same candidates, other flags


def _job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.audit", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@needs_lfw
def test_bad_input_fails_with_one_line(faulty, tmp_path):
    gone = _job("--dataset", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"))
    assert gone.returncode == 2 and len(gone.stderr.strip().splitlines()) == 1 and "error:" in gone.stderr
    empty = tmp_path / "empty"
    dataset.create_dataset(str(empty), S.EMBEDDING_DIM)   # a dataset without faces (nor embeddings)
    none = _job("--dataset", str(empty), "--output", str(tmp_path / "o"))
    assert none.returncode == 2 and "holds no faces" in none.stderr and len(none.stderr.strip().splitlines()) == 1
    unknown = _job("--dataset", faulty["root"], "--embeddings", "nope", "--output", str(tmp_path / "o"))
    assert unknown.returncode == 2 and "no embeddings table 'nope'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    # an embeddings table that covers only one shard of the faces
    emb = dataset.read_table(faulty["root"], S.FACES, columns=[*S.embeddings_schema().names[:6]])
    shard = emb.column(S.SHARD)[0].as_py()
    part = emb.filter(__import__("pyarrow.compute", fromlist=["x"]).equal(emb[S.SHARD], shard))
    import pyarrow as pa
    n = part.num_rows
    part = part.append_column(S.EMBEDDER, pa.array(["x"] * n)).append_column(
        S.EMBEDDER_VERSION, pa.array(["1"] * n)).append_column(S.RUN_ID, pa.array(["r"] * n))
    dataset.commit_embeddings(faulty["root"], "partial", shard, part)
    partial = _job("--dataset", faulty["root"], "--embeddings", "partial", "--output", str(tmp_path / "o"))
    assert partial.returncode == 2 and "does not match the faces" in partial.stderr
    bad_pairs = tmp_path / "pairs.txt"
    bad_pairs.write_text("10 300\nAbel_Pacheco 1\n")
    bad = _job("--dataset", faulty["root"], "--against", str(bad_pairs), "--output", str(tmp_path / "o"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@needs_lfw
@pytest.mark.slow
def test_exclude_audit_drops_exactly_the_flagged_faces(faulty):
    from workers.audit.exclude import excluded_faces
    from workers.training.data import DataConfig, read_face_index

    out, _ = _audit(faulty, "x1")
    excluded = excluded_faces(out)
    labels = read_audit(out, A.AUDIT_LABELS).to_pandas()
    dups = read_audit(out, A.AUDIT_DUPLICATES).to_pandas()
    quality = read_audit(out, A.AUDIT_QUALITY).to_pandas()
    expect = set(labels.loc[labels[A.FLAGGED], S.IMAGE_ID]) | set(quality.loc[quality[A.FLAGGED], S.IMAGE_ID])
    expect |= set(dups.loc[dups[A.FLAGGED], S.IMAGE_ID + "_b"])
    conflicts = dups[dups[A.FLAGGED] & (dups[A.KIND] == A.DUP_CROSS_IDENTITY)]
    expect |= set(conflicts[S.IMAGE_ID + "_a"])
    idents = read_audit(out, A.AUDIT_IDENTITIES).to_pandas()
    expect |= set(labels.loc[labels[S.IDENTITY].isin(idents.loc[idents[A.FLAGGED], S.IDENTITY]), S.IMAGE_ID])
    assert set(excluded[S.IMAGE_ID]) == expect and len(expect) >= 5
    full = read_face_index(DataConfig(faces=faulty["root"]))
    kept = read_face_index(DataConfig(faces=faulty["root"], exclude_audit=out))
    gone = set(full[S.IMAGE_ID]) - set(kept[S.IMAGE_ID])
    assert gone == expect & set(full[S.IMAGE_ID]) and len(kept) == len(full) - len(gone)


@pytest.mark.slow
def test_audit_on_s3(ray_session, tmp_path):
    from tests.s3util import MotoS3
    from workers.audit.run import run_audit
    from workers.pipeline import PrepareConfig, run_prepare

    server = MotoS3().start()
    try:
        server.fs().mkdir("faces")
        opts = tuple(server.options.items())
        server.upload_tree(SAMPLE, "s3://faces/raw")
        run_prepare(PrepareConfig(input="s3://faces/raw/", output="s3://faces/ds", storage_options=opts),
                    log=lambda *_: None)
        summary = run_audit(AuditConfig(root="s3://faces/ds", output="s3://faces/ds/audit", cluster=True,
                                        storage_options=opts), log=lambda *_: None)
        faces = dataset.read_table("s3://faces/ds", S.FACES, server.options)
        quality = read_audit("s3://faces/ds/audit", A.AUDIT_QUALITY, server.options)
        assert quality.num_rows == summary["faces"] == faces.num_rows
        assert read_summary("s3://faces/ds/audit", server.options)["run_id"] == summary["run_id"]
        assert server.fs().exists("faces/ds/audit/report.html")
        assert not server.fs().exists("faces/ds/audit/_lease.json")
    finally:
        server.stop()
