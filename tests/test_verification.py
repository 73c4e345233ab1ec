"""Tests of workers.evaluation.verification: pair protocols and verification metrics."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from workers import plots
from workers.evaluation import pairs as pairs_module
from workers.evaluation import verification as v

LFW = Path(__file__).resolve().parents[2] / "shared" / "data" / "lfw"
LFW_PAIRS = LFW / "pairs.txt"
LFW_IMAGES = LFW / "images"

SMALL_PAIRS = """2\t1
Abel_Pacheco\t1\t4
Abdel_Madi_Shabneh\t1\tDean_Barker\t1

Zico\t2\t3
Abdul_Rahman\t1\tPortia_de_Rossi\t12
"""


# --------------------------------------------------------------------------------------------------
# read_pairs
# --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not LFW_PAIRS.exists(), reason=f"LFW pairs.txt not found at {LFW_PAIRS}")
def test_read_pairs_lfw_view2():
    pairs = v.read_pairs(LFW_PAIRS)
    assert list(pairs.columns) == list(v.PAIR_COLUMNS)
    assert len(pairs) == 6000
    assert pairs[v.FOLD].dtype == np.int64 and pairs[v.SAME].dtype == bool
    per_fold = pairs.groupby(v.FOLD)[v.SAME].agg(["sum", "size"])
    assert per_fold.index.tolist() == list(range(10))
    assert (per_fold["sum"] == 300).all() and (per_fold["size"] == 600).all()
    assert pairs.iloc[0].tolist() == [0, True, "Abel_Pacheco", "Abel_Pacheco/Abel_Pacheco_0001.jpg",
                                      "Abel_Pacheco", "Abel_Pacheco/Abel_Pacheco_0004.jpg"]
    assert (pairs.loc[pairs[v.SAME], v.NAME1] == pairs.loc[pairs[v.SAME], v.NAME2]).all()
    assert (pairs.loc[~pairs[v.SAME], v.NAME1] != pairs.loc[~pairs[v.SAME], v.NAME2]).all()
    # LFW folds are identity-disjoint.
    fold_of = {}
    for fold, name1, name2 in pairs[[v.FOLD, v.NAME1, v.NAME2]].itertuples(index=False):
        for name in (name1, name2):
            assert fold_of.setdefault(name, fold) == fold
    assert len(v.pair_identities(pairs)) == len(fold_of)
    if LFW_IMAGES.exists():
        sample = pairs.sample(50, random_state=0)
        for image in pd.concat([sample[v.IMAGE1], sample[v.IMAGE2]]):
            assert (LFW_IMAGES / image).is_file(), image


def test_read_pairs_small_text_and_file(tmp_path):
    pairs = v.read_pairs(SMALL_PAIRS)
    assert pairs[v.FOLD].tolist() == [0, 0, 1, 1]
    assert pairs[v.SAME].tolist() == [True, False, True, False]
    assert pairs.iloc[3].tolist() == [1, False, "Abdul_Rahman", "Abdul_Rahman/Abdul_Rahman_0001.jpg",
                                      "Portia_de_Rossi", "Portia_de_Rossi/Portia_de_Rossi_0012.jpg"]
    assert v.pair_identities(pairs) == {"Abel_Pacheco", "Abdel_Madi_Shabneh", "Dean_Barker", "Zico",
                                        "Abdul_Rahman", "Portia_de_Rossi"}
    path = tmp_path / "pairs.txt"
    path.write_text(SMALL_PAIRS)
    pd.testing.assert_frame_equal(v.read_pairs(path), pairs)
    pd.testing.assert_frame_equal(v.read_pairs(str(path)), pairs)


def test_read_pairs_view1_header_and_plain():
    view1 = v.read_pairs("1\nA 1 2\nB 1 C 2\n")
    assert view1[v.FOLD].tolist() == [0, 0] and view1[v.SAME].tolist() == [True, False]
    plain = v.read_pairs("A 1 2\nB 1 C 2\nD 2 3\n")
    assert plain[v.FOLD].tolist() == [0, 0, 0]
    assert plain[v.SAME].tolist() == [True, False, True]
    assert plain[v.IMAGE2].tolist() == ["A/A_0002.jpg", "C/C_0002.jpg", "D/D_0003.jpg"]


@pytest.mark.parametrize("text, match", [
    ("2 1\nA 1 2\nB 1 2\nC 1 2\nD 1 E 1\n", r"line 3: expected a different pair"),
    ("2 1\nA 1 2\nB 1 C 1\nD 1 E 1\nF 1 G 1\n", r"line 4: expected a same pair"),
    ("A 1 2\nB 1 C x\n", r"line 2: image numbers must be positive integers.*'B 1 C x'"),
    ("A 1 2\nB 0 C 1\n", r"line 2: image numbers"),
    ("A 1 2 3 4 5\nB 1 2\n", r"line 1: expected a"),
    ("A 2 2\nB 1 C 1\n", r"line 1: same pair of an image with itself"),
    ("A 1 2\nB 1 B 2\n", r"line 2: different pair names one person twice"),
    ("2 2\nA 1 2\nB 1 C 1\n", r"announces 2 fold\(s\) x 2 x 2 = 8 pairs, found 2"),
    ("\n\n", r"no pairs"),
])
def test_read_pairs_malformed_names_the_line(text, match):
    with pytest.raises(ValueError, match=match):
        v.read_pairs(text)


def test_lookup_pairs():
    pairs = v.read_pairs("A 1 2\nB 1 C 2\n")
    keys = ["C/C_0002.jpg", "A/A_0001.jpg", "B/B_0001.jpg"]
    index1, index2, valid = v.lookup_pairs(pairs, keys)
    assert index1.tolist() == [1, 2] and index2.tolist() == [-1, 0]
    assert valid.tolist() == [False, True]
    with pytest.raises(ValueError, match="A/A_0001.jpg"):
        v.lookup_pairs(pairs, keys + ["A/A_0001.jpg"])


# --------------------------------------------------------------------------------------------------
# split_identities / heldout_pairs
# --------------------------------------------------------------------------------------------------

def _synthetic_images(num_identities=300, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, size=num_identities)
    return {f"person_{i:03d}": [f"person_{i:03d}/img_{j}.jpg" for j in range(c)]
            for i, c in enumerate(counts)}


def test_split_identities_deterministic_and_disjoint():
    names = [f"id{i}" for i in range(101)]
    train, heldout = v.split_identities(names, 0.3, seed=7)
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == set(names)
    assert len(heldout) == 30
    assert train == sorted(train) and heldout == sorted(heldout)
    assert v.split_identities(list(reversed(names)) + names[:5], 0.3, seed=7) == (train, heldout)
    assert v.split_identities(names, 0.3, seed=8)[1] != heldout
    assert v.split_identities(names, 0.0, seed=1) == (sorted(names), [])
    assert v.split_identities(names, 1.0, seed=1) == ([], sorted(names))
    with pytest.raises(ValueError, match="1.5"):
        v.split_identities(names, 1.5)


def _check_protocol(pairs, images, n_folds, pairs_per_fold):
    assert list(pairs.columns) == list(v.PAIR_COLUMNS)
    assert len(pairs) == n_folds * pairs_per_fold
    assert pairs[v.FOLD].dtype == np.int64 and pairs[v.SAME].dtype == bool
    counts = pairs.groupby([v.FOLD, v.SAME]).size()
    assert (counts == pairs_per_fold // 2).all() and len(counts) == 2 * n_folds
    # Same-before-different within each fold, folds in order.
    expected_same = np.tile(np.repeat([True, False], pairs_per_fold // 2), n_folds)
    assert pairs[v.SAME].tolist() == expected_same.tolist()
    assert pairs[v.FOLD].is_monotonic_increasing
    for fold, same, name1, image1, name2, image2 in pairs.itertuples(index=False):
        assert image1 in images[name1] and image2 in images[name2]
        if same:
            assert name1 == name2 and image1 < image2
        else:
            assert name1 < name2
    unordered = {frozenset([(n1, i1), (n2, i2)]) for _, _, n1, i1, n2, i2 in
                 pairs.itertuples(index=False)}
    assert len(unordered) == len(pairs), "a pair repeats"
    fold_of = {}
    for fold, name1, name2 in pairs[[v.FOLD, v.NAME1, v.NAME2]].itertuples(index=False):
        for name in (name1, name2):
            assert fold_of.setdefault(name, fold) == fold, f"{name} in two folds"


def test_heldout_pairs_counts_identities_and_determinism():
    images = _synthetic_images()
    train, heldout = v.split_identities(images, 0.5, seed=1)
    pairs = v.heldout_pairs(images, heldout, n_folds=5, pairs_per_fold=40, seed=3)
    _check_protocol(pairs, images, 5, 40)
    used = v.pair_identities(pairs)
    assert used <= set(heldout) and used.isdisjoint(train)

    again = v.heldout_pairs(dict(reversed(list(images.items()))), list(reversed(heldout)),
                            n_folds=5, pairs_per_fold=40, seed=3)
    pd.testing.assert_frame_equal(pairs, again)
    other = v.heldout_pairs(images, heldout, n_folds=5, pairs_per_fold=40, seed=4)
    assert not pairs.equals(other)

    table = pd.DataFrame([(name, key) for name, keys in images.items() for key in keys],
                         columns=["identity", "image_id"])
    table = pd.concat([table, pd.DataFrame({"identity": [None], "image_id": ["orphan.jpg"]})])
    pd.testing.assert_frame_equal(
        v.heldout_pairs(table, heldout, n_folds=5, pairs_per_fold=40, seed=3), pairs)


def test_heldout_pairs_spreads_same_pairs_over_identities():
    images = _synthetic_images()
    heldout = sorted(images)
    pairs = v.heldout_pairs(images, heldout, n_folds=2, pairs_per_fold=100, seed=0)
    same = pairs[pairs[v.SAME]]
    # Each fold has ~120 identities with >= 2 images, so 50 same pairs use 50 distinct identities.
    assert (same.groupby(v.FOLD)[v.NAME1].nunique() == 50).all()


def test_heldout_pairs_uses_every_pair_when_capacity_is_tight():
    images = {"a": ["a1", "a2", "a3"], "b": ["b1", "b2"], "c": ["c1"]}
    pairs = v.heldout_pairs(images, ["a", "b", "c"], n_folds=1, pairs_per_fold=8, seed=5)
    _check_protocol(pairs, images, 1, 8)
    same = pairs[pairs[v.SAME]]
    assert sorted(zip(same[v.IMAGE1], same[v.IMAGE2])) == [
        ("a1", "a2"), ("a1", "a3"), ("a2", "a3"), ("b1", "b2")]
    # 4 different pairs over 3 identity pairs: every identity pair is used.
    different = pairs[~pairs[v.SAME]]
    assert set(zip(different[v.NAME1], different[v.NAME2])) == {("a", "b"), ("a", "c"), ("b", "c")}


def test_heldout_pairs_errors():
    images = {"a": ["a1", "a2"], "b": ["b1"], "c": ["c1"]}
    with pytest.raises(ValueError, match="fold 0: 2 same pairs needed"):
        v.heldout_pairs(images, ["a", "b", "c"], n_folds=1, pairs_per_fold=4)
    with pytest.raises(ValueError, match=r"no images, e.g. \['zed'\]"):
        v.heldout_pairs(images, ["a", "zed"], n_folds=1, pairs_per_fold=2)
    with pytest.raises(ValueError, match="pairs_per_fold must be even"):
        v.heldout_pairs(images, ["a", "b"], n_folds=1, pairs_per_fold=3)


def test_unrank_pairs_matches_triu_indices():
    for n in (2, 3, 7, 50, 1001):
        rows, cols = np.triu_indices(n, 1)
        i, j = pairs_module._unrank_pairs(np.arange(len(rows)), n)
        np.testing.assert_array_equal(i, rows)
        np.testing.assert_array_equal(j, cols)


@pytest.mark.skipif(not LFW_IMAGES.exists(), reason=f"LFW images not found at {LFW_IMAGES}")
def test_heldout_pairs_on_lfw_identities():
    images = {entry.name: sorted(f"{entry.name}/{f}" for f in os.listdir(entry.path))
              for entry in os.scandir(LFW_IMAGES) if entry.is_dir()}
    train, heldout = v.split_identities(images, 0.3, seed=0)
    # pairs_per_fold=600 gives LFW View 2's size: 300 same + 300 different per fold.
    pairs = v.heldout_pairs(images, heldout, n_folds=10, pairs_per_fold=600, seed=0)
    assert len(pairs) == 6000
    assert (pairs.groupby([v.FOLD, v.SAME]).size() == 300).all()
    assert v.pair_identities(pairs).isdisjoint(train)
    same = pairs[pairs[v.SAME]]
    assert (same[v.NAME1] == same[v.NAME2]).all()
    for image in pd.concat([pairs[v.IMAGE1], pairs[v.IMAGE2]]).sample(100, random_state=0):
        assert (LFW_IMAGES / image).is_file()


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def _kfold_reference(scores, same, folds, valid):
    """Slow LFW protocol: loops over folds, candidate thresholds and pairs."""
    n = len(scores)
    accuracies, thresholds = [], []
    for fold in sorted(set(folds.tolist())):
        train = [i for i in range(n) if folds[i] != fold and valid[i]]
        distinct = sorted({float(scores[i]) for i in train})
        candidates = ([-math.inf] + [(a + b) / 2 for a, b in zip(distinct, distinct[1:])]
                      + [math.inf])
        best_correct, best_threshold = -1, None
        for threshold in candidates:
            correct = sum(1 for i in train if (scores[i] > threshold) == same[i])
            if correct > best_correct:
                best_correct, best_threshold = correct, threshold
        test = [i for i in range(n) if folds[i] == fold]
        right = sum(1 for i in test if valid[i] and (scores[i] > best_threshold) == same[i])
        accuracies.append(right / len(test))
        thresholds.append(best_threshold)
    return np.array(accuracies), np.array(thresholds)


def test_kfold_accuracy_separable_is_perfect():
    rng = np.random.default_rng(0)
    same = np.tile(np.repeat([True, False], 300), 10)
    folds = np.repeat(np.arange(10), 600)
    scores = np.where(same, rng.uniform(0.5, 1.0, same.size), rng.uniform(-1.0, 0.4, same.size))
    result = v.kfold_accuracy(scores, same, folds)
    assert result["mean"] == 1.0 and result["std"] == 0.0
    assert result["num_missing"] == 0 and result["num_pairs"] == 6000
    assert ((result["thresholds"] > 0.4) & (result["thresholds"] < 0.5)).all()
    np.testing.assert_array_equal(result["folds"], np.arange(10))


def test_kfold_accuracy_random_scores_is_chance():
    rng = np.random.default_rng(1)
    same = np.tile(np.repeat([True, False], 300), 10)
    folds = np.repeat(np.arange(10), 600)
    result = v.kfold_accuracy(rng.normal(size=same.size), same, folds)
    assert abs(result["mean"] - 0.5) < 0.04
    assert result["fold_accuracies"].shape == (10,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kfold_accuracy_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 240
    same = rng.random(n) < 0.5
    scores = rng.integers(0, 12, n) / 10 + 0.3 * same          # many ties
    folds = rng.integers(0, 4, n)
    valid = rng.random(n) > 0.1
    scores[~valid] = np.where(rng.random((~valid).sum()) < 0.5, np.nan, scores[~valid])
    result = v.kfold_accuracy(scores, same, folds, valid=valid)
    accuracies, thresholds = _kfold_reference(scores, same, folds, valid)
    np.testing.assert_allclose(result["fold_accuracies"], accuracies)
    np.testing.assert_allclose(result["thresholds"], thresholds)
    assert result["mean"] == pytest.approx(accuracies.mean())
    assert result["std"] == pytest.approx(accuracies.std())
    assert result["sem"] == pytest.approx(accuracies.std(ddof=1) / 2)
    assert result["num_missing"] == int((~valid).sum())


def test_kfold_accuracy_missing_pairs_count_as_wrong():
    same = np.tile(np.repeat([True, False], 50), 4)
    folds = np.repeat(np.arange(4), 100)
    scores = np.where(same, 0.9, 0.1)
    valid = np.ones(same.size, dtype=bool)
    valid[[0, 1, 60]] = False          # two same pairs and one different pair of fold 0
    scores[[0, 60]] = np.nan
    result = v.kfold_accuracy(scores, same, folds, valid=valid)
    np.testing.assert_allclose(result["fold_accuracies"], [0.97, 1.0, 1.0, 1.0])
    assert result["num_missing"] == 3
    with pytest.raises(ValueError, match="non-finite"):
        v.kfold_accuracy(scores, same, folds)
    with pytest.raises(ValueError, match="at least 2 folds"):
        v.kfold_accuracy(scores, same, np.zeros_like(folds), valid=valid)
    with pytest.raises(ValueError, match=r"same must be \[400\]"):
        v.kfold_accuracy(scores, same[:10], folds, valid=valid)


def test_val_at_far_single_known_answer():
    negatives = np.arange(1000) / 1000                     # 0.000 .. 0.999
    positives = np.array([0.5] * 50 + [0.9985] * 30 + [1.5] * 20)
    scores = np.concatenate([negatives, positives])
    same = np.concatenate([np.zeros(1000, bool), np.ones(100, bool)])
    result = v.val_at_far(scores, same, far_target=1e-3)
    # One false accept allowed: threshold = second-highest negative 0.998, 0.999 is accepted.
    assert result["thresholds"].tolist() == [0.998]
    assert result["val"] == pytest.approx(0.5) and result["far"] == pytest.approx(0.001)
    assert result["val_std"] == 0.0
    strict = v.val_at_far(scores, same, far_target=0.0)
    assert strict["far"] == 0.0 and strict["val"] == pytest.approx(0.2)
    loose = v.val_at_far(scores, same, far_target=1.0)
    assert loose["val"] == 1.0 and loose["far"] == 1.0


def test_val_at_far_folds_known_answer():
    steps = np.arange(1000) / 1000
    neg0, neg1 = steps, steps + 0.0105                     # fold 1 negatives shifted up
    pos0 = np.array([0.2] * 40 + [1.05] * 60)
    pos1 = np.array([0.5] * 30 + [0.999] * 70)
    scores = np.concatenate([neg0, pos0, neg1, pos1])
    same = np.concatenate([np.zeros(1000, bool), np.ones(100, bool)] * 2)
    folds = np.repeat([0, 1], 1100)
    result = v.val_at_far(scores, same, far_target=1e-3, folds=folds)
    # Fold 0 uses fold 1's negatives: threshold 0.998 + 0.0105 = 1.0085 -> VAL 0.6, FAR 0.
    # Fold 1 uses fold 0's negatives: threshold 0.998 -> VAL 0.7, FAR 12/1000 (0.9985 .. 1.0095).
    np.testing.assert_allclose(result["thresholds"], [1.0085, 0.998])
    np.testing.assert_allclose(result["fold_val"], [0.6, 0.7])
    np.testing.assert_allclose(result["fold_far"], [0.0, 0.012])
    assert result["val"] == pytest.approx(0.65) and result["val_std"] == pytest.approx(0.05)
    assert result["far"] == pytest.approx(0.006)
    # A missing same pair of fold 1 is a rejection.
    valid = np.ones(scores.size, bool)
    valid[-1] = False
    missing = v.val_at_far(scores, same, far_target=1e-3, folds=folds, valid=valid)
    np.testing.assert_allclose(missing["fold_val"], [0.6, 0.69])
    assert missing["num_missing"] == 1


def _auc_mann_whitney(scores, same):
    positives, negatives = scores[same], scores[~same]
    total = 0.0
    for p in positives:
        for q in negatives:
            total += 1.0 if p > q else 0.5 if p == q else 0.0
    return total / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_matches_mann_whitney_with_ties(seed):
    rng = np.random.default_rng(seed)
    same = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + same, 1)     # rounded: many ties
    assert v.roc_auc(scores, same) == pytest.approx(_auc_mann_whitney(scores, same), abs=1e-12)


def test_roc_curve_shape_and_ties():
    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.3, 0.1])
    same = np.array([True, True, False, True, False, False])
    fpr, tpr, thresholds = v.roc_curve(scores, same)
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.8, 0.3, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    assert v.roc_auc(np.zeros(10), np.arange(10) % 2 == 0) == 0.5
    with pytest.raises(ValueError, match="0 different"):
        v.roc_curve(scores, np.ones(6, bool))


def test_cosine_scores():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20, 8)).astype(np.float32)
    b = rng.normal(size=(20, 8)).astype(np.float32)
    b[3] = 0
    scores = v.cosine_scores(a, b)
    assert scores.shape == (20,) and scores.dtype == np.float64
    for i in range(20):
        if i == 3:
            assert np.isnan(scores[i])
        else:
            x, y = a[i].astype(np.float64), b[i].astype(np.float64)
            assert scores[i] == pytest.approx(x @ y / np.sqrt((x @ x) * (y @ y)))
    assert v.cosine_scores(a[:1], 2 * a[:1])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(20, 8\) and \(20, 7\)"):
        v.cosine_scores(a, b[:, :7])


def test_plot_roc_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    same = rng.random(200) < 0.5
    curves = {"good": v.roc_curve(rng.normal(size=200) + 2 * same, same),
              "chance": v.roc_curve(rng.normal(size=200), same)[:2]}
    path = plots.plot_roc(curves, tmp_path / "sub" / "roc.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log_path = plots.plot_roc(curves, tmp_path / "roc_log.png", log_fpr=True)
    assert log_path.stat().st_size > 1000
