"""Tests of evaluate: pure helpers, the job on the prepared LFW subset, and the real LFW protocol (2 folds)."""
from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

import schemas as S
from workers import dataset
from workers.evaluation import evaluate as E
from workers.evaluation import verification as V
from workers.graph import PoolSettings

# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def _pairs(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(V.PAIR_COLUMNS)).astype({V.FOLD: np.int64, V.SAME: bool})


def test_image_keys_are_the_last_two_path_components():
    uris = ["/data/lfw/images/Colin_Powell/Colin_Powell_0001.jpg", "s3://bucket/x/Zico/Zico_0002.jpg",
            "Tony_Blair/Tony_Blair_0001.jpg", "flat.jpg"]
    assert E.image_keys(uris).tolist() == ["Colin_Powell/Colin_Powell_0001.jpg", "Zico/Zico_0002.jpg",
                                           "Tony_Blair/Tony_Blair_0001.jpg", "flat.jpg"]
    # The keys of an LFW pairs file are exactly these keys.
    pairs = V.read_pairs("Zico\t2\t3\n")
    assert pairs[V.IMAGE1][0] in E.image_keys(["/x/Zico/Zico_0002.jpg"])


def test_nearest_centre_faces_matches_a_loop():
    rng = np.random.default_rng(0)
    n = 200
    groups = rng.integers(0, 40, n)
    widths = rng.integers(50, 300, 40)[groups].astype(float)
    heights = rng.integers(50, 300, 40)[groups].astype(float)
    xy = rng.uniform(0, 250, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 60, (n, 2))], 1)
    face_index = np.zeros(n, int)
    for g in np.unique(groups):
        face_index[groups == g] = np.arange((groups == g).sum())
    boxes[5] = boxes[6]  # a tie inside one image if they share it: lowest face_index wins
    got = E.nearest_centre_faces(groups, boxes, widths, heights, face_index)
    want = []
    for g in np.unique(groups):  # slow obvious reference
        best = None
        for i in np.flatnonzero(groups == g):
            cx, cy = (boxes[i, 0] + boxes[i, 2]) / 2, (boxes[i, 1] + boxes[i, 3]) / 2
            d = (cx - widths[i] / 2) ** 2 + (cy - heights[i] / 2) ** 2
            if best is None or d < best[0] or (d == best[0] and face_index[i] < face_index[best[1]]):
                best = (d, i)
        want.append(best[1])
    assert got.tolist() == want


def test_missing_pairs_count_as_wrong():
    keys = np.array(["a/a_0001.jpg", "a/a_0002.jpg", "b/b_0001.jpg", "b/b_0002.jpg"], dtype=object)
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    rows = [(f, True, "a", "a/a_0001.jpg", "a", "a/a_0002.jpg") for f in (0, 1)]
    rows += [(f, False, "a", "a/a_0001.jpg", "b", "b/b_0001.jpg") for f in (0, 1)]
    rows += [(1, True, "b", "b/b_0001.jpg", "b", "b/b_0009.jpg")]  # image absent
    pairs = _pairs(rows)
    scores, valid = E.pair_scores(pairs, keys, emb)
    assert valid.tolist() == [True, True, True, True, False]
    m = E.verification_metrics(scores, pairs[V.SAME].to_numpy(), pairs[V.FOLD].to_numpy(), valid)
    assert m["accuracy"]["num_missing"] == 1
    assert m["accuracy"]["fold_accuracies"].tolist() == [1.0, 2 / 3]
    assert m["auc"] < 1.0  # the missing same pair ranks below every different pair


# --------------------------------------------------------------------------------------------------
# The job on prepare's own output
# --------------------------------------------------------------------------------------------------


def _subset_pairs(root, seed: int = 0) -> pd.DataFrame:
    """~100 same + ~100 different pairs over the prepared subset, people split into 2 folds."""
    images = dataset.read_table(str(root), S.IMAGES, columns=[S.URI, S.IDENTITY]).to_pandas()
    images["key"] = E.image_keys(images[S.URI])
    by_person = images.groupby(S.IDENTITY)["key"].apply(sorted)
    many = sorted(p for p, keys in by_person.items() if len(keys) >= 6)
    assert len(many) == 30
    rng = np.random.default_rng(seed)
    rows = []
    for i, person in enumerate(many):
        fold, keys = i % 2, by_person[person]
        for a, b in [(0, 1), (2, 3), (4, 5)]:
            rows.append((fold, True, person, keys[a], person, keys[b]))
        mates = [p for j, p in enumerate(many) if j % 2 == fold and p != person]
        for other in rng.choice(mates, 3, replace=False):
            a, b = sorted([person, other])
            rows.append((fold, False, a, rng.choice(by_person[a]), b, rng.choice(by_person[b])))
    return _pairs(sorted(rows, key=lambda r: (r[0], not r[1])))


def test_evaluate_prepared_lfw(prepared_lfw, tmp_path, capsys):
    from jobs import evaluate as job

    root, _ = prepared_lfw
    pairs = _subset_pairs(root)
    missing = (1, True, "Nobody", "Nobody/Nobody_0001.jpg", "Nobody", "Nobody/Nobody_0002.jpg")
    pairs = pd.concat([pairs, _pairs([missing])], ignore_index=True)
    assert len(pairs) == 181 and pairs[V.SAME].sum() == 91
    pairs.to_csv(tmp_path / "pairs.csv", index=False)

    result = job.main(["--faces", str(root), "--pairs", str(tmp_path / "pairs.csv"),
                       "--output", str(tmp_path / "eval")])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("facemill evaluate faces: accuracy ")
    with capsys.disabled():
        print(out.splitlines()[0])
    assert result["accuracy"] >= 0.95, result
    assert result["num_missing_pairs"] >= 1 and "Nobody/Nobody_0001.jpg" in result["missing_images"]
    assert result["folds"] == 2 and result["num_pairs"] == 181
    assert result["embedder"] == ["sface@sface-2021dec-int8bq-dequant"]
    assert 0.95 <= result["auc"] <= 1.0
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written["accuracy"] == result["accuracy"]
    png = (tmp_path / "eval" / "roc.png").read_bytes()
    assert png.startswith(b"\x89PNG")

    # --folds 1 is refused (the k-fold protocol needs two), with a one-line error.
    with pytest.raises(SystemExit):
        job.main(["--faces", str(root), "--pairs", str(tmp_path / "pairs.csv"), "--folds", "1",
                  "--output", str(tmp_path / "eval1")])
    assert "at least 2" in capsys.readouterr().err


def test_evaluate_heldout_pairs_keyed_by_image_id(prepared_lfw, tmp_path):
    """A held-out protocol (verification.heldout_pairs over image ids) works like an LFW file."""
    root, _ = prepared_lfw
    images = dataset.read_table(str(root), S.IMAGES).to_pandas()
    images = images[images[S.STATUS] == S.STATUS_OK]
    names = images[S.IDENTITY].unique().tolist()
    pairs = V.heldout_pairs(images, names, n_folds=2, pairs_per_fold=60, seed=3)
    pairs.to_parquet(tmp_path / "heldout.parquet")
    assert E.pair_key_kind(pairs) == E.KEY_IMAGE_ID
    result = E.run_evaluate(E.EvaluateConfig(faces=str(root), pairs=str(tmp_path / "heldout.parquet"),
                                             output=str(tmp_path / "eval")), log=lambda *_: None)
    assert result["key"] == E.KEY_IMAGE_ID and result["num_pairs"] == 120
    assert result["num_missing_pairs"] == 0
    assert result["accuracy"] >= 0.95

    # A degraded domain from the stored crops: deterministic per image, and "clean" re-embeds them as stored.
    def degraded(spec, out):
        return E.run_evaluate(E.EvaluateConfig(faces=str(root), pairs=str(tmp_path / "heldout.parquet"),
                                               output=str(tmp_path / out), degrade=spec), log=lambda *_: None)

    clean = degraded("clean", "e-clean")
    assert abs(clean["accuracy"] - result["accuracy"]) <= 0.02 and clean["degrade"] == "clean"
    low, again = degraded("lowres:12", "e-low"), degraded("lowres:12", "e-low2")
    assert low["fold_accuracies"] == again["fold_accuracies"] and low["thresholds"] == again["thresholds"]
    assert low["degrade"] == "lowres:12" and low["auc"] < clean["auc"]
    with pytest.raises(ValueError, match="lowres"):
        E.EvaluateConfig(faces=str(root), pairs="p", output="o", degrade="lowres:1")


# --------------------------------------------------------------------------------------------------
# The real LFW protocol, 2 folds of pairs.txt
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_lfw_protocol_two_folds(ray_session, lfw_dir, tmp_path):
    """prepare exactly the ~1580 images of the first 2 folds of pairs.txt, then evaluate them."""
    from workers.pipeline import PrepareConfig, run_prepare

    pairs = E.first_folds(V.read_pairs(lfw_dir / "pairs.txt"), 2)
    assert len(pairs) == 1200
    keys = pd.unique(pd.concat([pairs[V.IMAGE1], pairs[V.IMAGE2]]))
    manifest = pd.DataFrame({S.MANIFEST_URI: [str(lfw_dir / "images" / k) for k in keys],
                             S.MANIFEST_IDENTITY: [k.split("/")[0] for k in keys]})
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    t0 = time.time()
    summary = run_prepare(PrepareConfig(input=str(tmp_path / "manifest.csv"), output=str(tmp_path / "lfw"),
                                        shard_size=200, pool=PoolSettings(shards_per_call=1)), log=lambda *_: None)
    prepare_s = time.time() - t0
    assert summary["images_in"] == len(keys)
    result = E.run_evaluate(E.EvaluateConfig(faces=str(tmp_path / "lfw"), pairs=str(lfw_dir / "pairs.txt"),
                                             output=str(tmp_path / "eval"), folds=2), log=print)
    print(f"LFW 2 folds: {len(keys)} images prepared in {prepare_s:.0f} s; accuracy {result['accuracy']:.4f} "
          f"± {result['accuracy_std']:.4f}, VAL@FAR=1e-3 {result['val']:.4f}, AUC {result['auc']:.4f}, "
          f"{result['num_missing_pairs']} pairs missing")
    assert result["num_pairs"] == 1200 and result["folds"] == 2
    assert result["accuracy"] >= 0.985, result
    # The domain the issue measured (all of pairs.txt: 91.4 % at 16 px): far below clean on these 2 folds too.
    low = E.run_evaluate(E.EvaluateConfig(faces=str(tmp_path / "lfw"), pairs=str(lfw_dir / "pairs.txt"),
                                          output=str(tmp_path / "eval16"), folds=2, degrade="lowres:16"), log=print)
    print(f"LFW 2 folds, lowres:16: accuracy {low['accuracy']:.4f}, VAL@FAR=1e-3 {low['val']:.4f}")
    assert low["accuracy"] < result["accuracy"] - 0.02 and low["val"] < result["val"]
