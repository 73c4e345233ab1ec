"""Face verification: pair protocols (LFW and held-out), k-fold accuracy, VAL@FAR and ROC.

Pure numpy/pandas; no Ray, no torch. Scores are similarities: higher means more likely the same
person (e.g. :func:`cosine_scores`).

A *pairs table* is a ``pandas.DataFrame`` with one row per pair and the columns

* ``fold``: int64, 0-based fold number;
* ``same``: bool, True for a same-person pair;
* ``name1``, ``name2``: identity names (equal for same pairs);
* ``image1``, ``image2``: image keys. From an LFW file they are paths relative to the images folder,
  ``"<name>/<name>_<i:04d>.jpg"``; from :func:`heldout_pairs` they are the keys it was given.

LFW lists each fold's same pairs first, then its different pairs, and every person appears in one
fold only; :func:`heldout_pairs` builds tables with the same layout and properties.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from schemas import tables

# Columns of a pairs table (in-memory only, never written as Arrow, hence not in schemas/).
FOLD = "fold"
SAME = "same"
NAME1 = "name1"
IMAGE1 = "image1"
NAME2 = "name2"
IMAGE2 = "image2"
PAIR_COLUMNS = (FOLD, SAME, NAME1, IMAGE1, NAME2, IMAGE2)


# --------------------------------------------------------------------------------------------------
# Pair protocols
# --------------------------------------------------------------------------------------------------

def lfw_image_path(name: str, number: int) -> str:
    """Relative path of LFW image ``number`` (1-based) of ``name``: ``"<name>/<name>_<number:04d>.jpg"``."""
    return f"{name}/{name}_{number:04d}.jpg"


def read_pairs(path_or_text: str | os.PathLike) -> pd.DataFrame:
    """Read an LFW pairs file (``pairs.txt``, ``pairsDevTrain.txt``, ...) into a pairs table.

    Accepted layouts (whitespace-separated, blank lines ignored):

    * header ``"<folds> <n>"`` (View 2, ``"10 300"``): then for each fold ``n`` same pairs
      ``name i j`` followed by ``n`` different pairs ``name1 i name2 j``;
    * header ``"<n>"`` (View 1): one fold of ``n`` same then ``n`` different pairs;
    * no header: any mix of 3-field (same) and 4-field (different) lines, all in fold 0.

    Image numbers are 1-based.

    Args:
        path_or_text: a path (``os.PathLike``, or a ``str`` without a newline), or the file's text
            (a ``str`` holding at least one newline).

    Returns:
        Pairs table with columns ``fold`` int64, ``same`` bool, ``name1``, ``image1``, ``name2``,
        ``image2`` (see the module docstring), in file order.

    Raises:
        ValueError: a malformed line (wrong field count for its place, a non-positive or non-integer
            image number, a same pair of one image with itself, a different pair naming one person)
            or a header whose counts disagree with the number of pair lines. The message names the
            line number and its text.
        FileNotFoundError: ``path_or_text`` is a path that does not exist.
    """
    if isinstance(path_or_text, os.PathLike) or "\n" not in path_or_text:
        source = str(path_or_text)
        text = Path(path_or_text).read_text()
    else:
        source, text = "<text>", path_or_text

    lines = [(number, line.split()) for number, line in enumerate(text.splitlines(), start=1)]
    lines = [(number, fields) for number, fields in lines if fields]
    if not lines:
        raise ValueError(f"{source}: no pairs found")

    first_number, first = lines[0]
    if len(first) in (1, 2) and all(field.isdigit() for field in first):
        num_folds, per_kind = (1, int(first[0])) if len(first) == 1 else (int(first[0]), int(first[1]))
        body = lines[1:]
        expected = num_folds * 2 * per_kind
        if len(body) != expected:
            raise ValueError(
                f"{source}: header on line {first_number} {' '.join(first)!r} announces {num_folds} "
                f"fold(s) x 2 x {per_kind} = {expected} pairs, found {len(body)} pair lines")
        block = np.arange(len(body)) // max(per_kind, 1)
        folds = (block // 2).tolist()
        kinds = (block % 2 == 0).tolist()
    else:
        body = lines
        folds = [0] * len(body)
        kinds = [len(fields) == 3 for _, fields in body]

    rows = []
    for (number, fields), fold, same in zip(body, folds, kinds):
        want = 3 if same else 4
        if len(fields) != want:
            what = "same pair 'name i j'" if same else "different pair 'name1 i name2 j'"
            raise ValueError(f"{source}: line {number}: expected a {what} (fold {fold}), "
                             f"got {' '.join(fields)!r}")
        if same:
            name1, i, name2, j = fields[0], fields[1], fields[0], fields[2]
        else:
            name1, i, name2, j = fields
        if not (i.isdigit() and j.isdigit() and int(i) > 0 and int(j) > 0):
            raise ValueError(f"{source}: line {number}: image numbers must be positive integers, "
                             f"got {' '.join(fields)!r}")
        if same and int(i) == int(j):
            raise ValueError(f"{source}: line {number}: same pair of an image with itself: "
                             f"{' '.join(fields)!r}")
        if not same and name1 == name2:
            raise ValueError(f"{source}: line {number}: different pair names one person twice: "
                             f"{' '.join(fields)!r}")
        rows.append((fold, same, name1, lfw_image_path(name1, int(i)), name2,
                     lfw_image_path(name2, int(j))))
    return _pairs_frame(rows)


def pair_identities(pairs: pd.DataFrame) -> set[str]:
    """All identity names in a pairs table (``name1`` and ``name2``), e.g. to exclude from training."""
    _require_columns(pairs, (NAME1, NAME2))
    return set(pairs[NAME1].tolist()) | set(pairs[NAME2].tolist())


def lookup_pairs(pairs: pd.DataFrame, keys: Sequence[str] | np.ndarray | pd.Series,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find each pair's two images among ``keys`` (e.g. the rows of an embedding matrix).

    Args:
        pairs: pairs table.
        keys: str[M], unique image keys in the convention of ``image1``/``image2``.

    Returns:
        ``(index1, index2, valid)``: int64[N] row numbers into ``keys`` (-1 where absent) and
        bool[N], True where both images were found. Pass ``valid`` to the metrics so that pairs
        with a missing image count as wrong.

    Raises:
        ValueError: ``keys`` holds a duplicate (named in the message).
    """
    _require_columns(pairs, (IMAGE1, IMAGE2))
    index = pd.Index(np.asarray(keys, dtype=object))
    if not index.is_unique:
        raise ValueError(f"keys must be unique, {index[index.duplicated()][0]!r} appears twice")
    index1 = index.get_indexer(pairs[IMAGE1].to_numpy(dtype=object)).astype(np.int64)
    index2 = index.get_indexer(pairs[IMAGE2].to_numpy(dtype=object)).astype(np.int64)
    return index1, index2, (index1 >= 0) & (index2 >= 0)


def split_identities(identities: Iterable[str], heldout_fraction: float, seed: int = 0,
                     ) -> tuple[list[str], list[str]]:
    """Split identities into disjoint train and held-out sets, deterministically.

    The result depends only on the set of names (not their order or repeats), the fraction and the
    seed.

    Args:
        identities: identity names; duplicates are ignored.
        heldout_fraction: in [0, 1]; ``round(heldout_fraction * n)`` names are held out.
        seed: seed of the permutation.

    Returns:
        ``(train, heldout)``: sorted lists of names, disjoint, together all given names.

    Raises:
        ValueError: ``heldout_fraction`` outside [0, 1].
    """
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    names = np.array(sorted(set(identities)), dtype=object)
    num_heldout = int(np.floor(heldout_fraction * len(names) + 0.5))
    is_heldout = np.zeros(len(names), dtype=bool)
    is_heldout[np.random.default_rng(seed).permutation(len(names))[:num_heldout]] = True
    return names[~is_heldout].tolist(), names[is_heldout].tolist()


def heldout_pairs(identity_to_images: Mapping[str, Sequence[str]] | pd.DataFrame,
                  identities: Iterable[str], n_folds: int = 10, pairs_per_fold: int = 300,
                  seed: int = 0, *, identity_column: str = tables.IDENTITY,
                  key_column: str = tables.IMAGE_ID) -> pd.DataFrame:
    """Build an LFW-like verification protocol over held-out identities.

    Like LFW View 2: every identity belongs to one fold only (so thresholds chosen on the other folds
    never saw its faces), and each fold holds ``pairs_per_fold / 2`` same pairs followed by as many
    different pairs, without repeated pairs. Identities with two or more images are spread evenly
    over the folds first, then single-image identities (usable in different pairs only).

    Pairs are spread as evenly as possible: same pairs go to distinct identities of the fold (a
    second pair per identity only when there are too few identities), different pairs to distinct
    pairs of identities, each time with uniformly drawn images. The result depends only on the
    images per identity (not on their order), ``identities`` as a set, the sizes and ``seed``.

    Args:
        identity_to_images: ``{identity: [image key, ...]}``, or a DataFrame with columns
            ``identity_column`` and ``key_column`` (rows with nulls are ignored).
        identities: held-out identity names; each must have at least one image.
        n_folds: number of folds.
        pairs_per_fold: even; half same, half different pairs per fold.
        seed: seed of every random choice.
        identity_column: identity column of a DataFrame ``identity_to_images``.
        key_column: image key column of a DataFrame ``identity_to_images``.

    Returns:
        Pairs table (``fold``, ``same``, ``name1``, ``image1``, ``name2``, ``image2``) of
        ``n_folds * pairs_per_fold`` rows ordered by fold, then same before different pairs, then
        names and keys. Same pairs have ``image1 < image2``, different pairs ``name1 < name2``.

    Raises:
        ValueError: bad sizes, an identity without images, or a fold whose identities cannot supply
            the pairs asked for (the message gives the fold and the counts).
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    if pairs_per_fold < 2 or pairs_per_fold % 2:
        raise ValueError(f"pairs_per_fold must be even and >= 2, got {pairs_per_fold}")
    images = _images_by_identity(identity_to_images, identity_column, key_column)
    names = sorted(set(identities))
    missing = [name for name in names if not images.get(name)]
    if missing:
        raise ValueError(f"{len(missing)} held-out identities have no images, e.g. {missing[:5]}")

    rng = np.random.default_rng(seed)
    counts = np.array([len(images[name]) for name in names], dtype=np.int64)
    names_arr = np.array(names, dtype=object)
    multi = rng.permutation(np.flatnonzero(counts >= 2))
    single = rng.permutation(np.flatnonzero(counts < 2))
    order = np.concatenate([multi, single])
    fold_of = np.empty(len(names), dtype=np.int64)
    fold_of[order] = np.arange(len(order)) % n_folds

    half = pairs_per_fold // 2
    rows = []
    for fold in range(n_folds):
        members = np.flatnonzero(fold_of == fold)   # sorted, so names in ascending order
        fold_names, fold_counts = names_arr[members], counts[members]
        rows += _same_pairs(rng, fold, fold_names, fold_counts, images, half)
        rows += _different_pairs(rng, fold, fold_names, fold_counts, images, half)
    return _pairs_frame(rows)


def _same_pairs(rng: np.random.Generator, fold: int, names: np.ndarray, counts: np.ndarray,
                images: dict[str, list[str]], num: int) -> list[tuple]:
    eligible = np.flatnonzero(counts >= 2)
    capacity = counts[eligible] * (counts[eligible] - 1) // 2
    if capacity.sum() < num:
        raise ValueError(
            f"fold {fold}: {num} same pairs needed but its {len(eligible)} identities with >= 2 "
            f"images allow only {int(capacity.sum())}; use fewer folds or pairs, or more identities")
    units, per_unit = _allocate(rng, len(eligible), lambda u: capacity[u], num)
    rows = []
    for unit, k in zip(units.tolist(), per_unit.tolist()):
        name = names[eligible[unit]]
        keys = images[name]
        a, b = _unrank_pairs(rng.choice(int(capacity[unit]), size=k, replace=False), len(keys))
        rows += [(fold, True, name, keys[i], name, keys[j]) for i, j in zip(a.tolist(), b.tolist())]
    return sorted(rows)


def _different_pairs(rng: np.random.Generator, fold: int, names: np.ndarray, counts: np.ndarray,
                     images: dict[str, list[str]], num: int) -> list[tuple]:
    k = len(names)
    possible = (int(counts.sum()) ** 2 - int((counts ** 2).sum())) // 2
    if possible < num:
        raise ValueError(f"fold {fold}: {num} different pairs needed but its {k} identities "
                         f"allow only {possible}; use fewer folds or pairs, or more identities")

    def capacity(units: np.ndarray) -> np.ndarray:
        first, second = _unrank_pairs(units, k)
        return counts[first] * counts[second]

    units, per_unit = _allocate(rng, k * (k - 1) // 2, capacity, num)
    first, second = _unrank_pairs(units, k)
    rows = []
    for u, v, m in zip(first.tolist(), second.tolist(), per_unit.tolist()):
        keys_u, keys_v = images[names[u]], images[names[v]]
        picks = rng.choice(len(keys_u) * len(keys_v), size=m, replace=False)
        rows += [(fold, False, names[u], keys_u[p // len(keys_v)], names[v], keys_v[p % len(keys_v)])
                 for p in picks.tolist()]
    return sorted(rows)


def _allocate(rng: np.random.Generator, num_units: int, capacity, num: int,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Spread ``num`` draws over ``num_units`` units as evenly as their capacities allow.

    Every unit has capacity >= 1. Returns (unit indices int64[U'], draws per unit int64[U']).
    ``capacity(int64[K]) -> int64[K]`` is only called on all units when ``num > num_units``.
    """
    if num <= num_units:
        return np.sort(rng.choice(num_units, size=num, replace=False)), np.ones(num, np.int64)
    cap = np.asarray(capacity(np.arange(num_units, dtype=np.int64)), dtype=np.int64)
    order = rng.permutation(num_units)
    taken = np.zeros(num_units, dtype=np.int64)
    remaining = num
    while remaining > 0:   # one round gives each unit with room one more draw
        open_units = order[taken[order] < cap[order]][:remaining]
        taken[open_units] += 1
        remaining -= len(open_units)
    used = np.flatnonzero(taken)
    return used, taken[used]


def _unrank_pairs(index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Map indices into the row-major list of pairs (i, j), 0 <= i < j < n, to i and j (int64[K])."""
    index = np.asarray(index, dtype=np.int64)

    def start(i: np.ndarray) -> np.ndarray:   # index of pair (i, i + 1)
        return i * (2 * n - i - 1) // 2

    i = np.floor(((2 * n - 1) - np.sqrt((2.0 * n - 1) ** 2 - 8.0 * index)) / 2).astype(np.int64)
    i = np.clip(i, 0, max(n - 2, 0))
    i -= start(i) > index          # correct float rounding either way
    i += start(i + 1) <= index
    return i, index - start(i) + i + 1


def _images_by_identity(identity_to_images, identity_column: str, key_column: str,
                        ) -> dict[str, list[str]]:
    if isinstance(identity_to_images, pd.DataFrame):
        _require_columns(identity_to_images, (identity_column, key_column))
        frame = identity_to_images[[identity_column, key_column]].dropna()
        grouped = frame.groupby(identity_column, sort=False)[key_column]
        return {str(name): sorted(set(map(str, keys))) for name, keys in grouped}
    return {str(name): sorted(set(map(str, keys))) for name, keys in identity_to_images.items()}


def _pairs_frame(rows: list[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(PAIR_COLUMNS))
    return frame.astype({FOLD: np.int64, SAME: bool})


def _require_columns(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    absent = [column for column in columns if column not in frame.columns]
    if absent:
        raise ValueError(f"missing columns {absent}, got {list(frame.columns)}")


# --------------------------------------------------------------------------------------------------
# Scores and metrics
# --------------------------------------------------------------------------------------------------

def cosine_scores(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Cosine similarity of paired embeddings, row by row.

    Args:
        emb1: float[N, D].
        emb2: float[N, D].

    Returns:
        float64[N] in [-1, 1]; NaN where a row has zero norm or non-finite values (pass
        ``valid=np.isfinite(scores)`` to the metrics).

    Raises:
        ValueError: the inputs are not two [N, D] arrays of one shape.
    """
    a = np.asarray(emb1, dtype=np.float64)
    b = np.asarray(emb2, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"embeddings must both be [N, D], got {a.shape} and {b.shape}")
    denominator = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.einsum("nd,nd->n", a, b) / denominator
    scores[denominator == 0] = np.nan
    return scores


def kfold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray,
                   valid: np.ndarray | None = None) -> dict:
    """LFW k-fold verification accuracy: threshold chosen on the other folds, applied to each fold.

    A pair is predicted same when ``score > threshold``. For each fold, the candidate thresholds are
    the midpoints between consecutive distinct scores of the valid pairs of the other folds, plus
    -inf (all same) and +inf (all different); the one with the highest accuracy on those pairs is
    kept, the lowest such threshold on ties (as facenet's ``argmax``). Invalid pairs (e.g. a face
    not detected) are left out of the threshold choice and count as wrong in their test fold.

    Args:
        scores: float[N] similarities; may be NaN where ``valid`` is False.
        same: bool[N], True for same-person pairs.
        folds: int[N] fold ids (at least two distinct values).
        valid: bool[N], False for missing pairs; default all valid.

    Returns:
        dict with ``mean`` (float, mean of the fold accuracies), ``std`` (float, population
        standard deviation over folds, ddof=0, the "±" facenet/insightface print), ``sem`` (float,
        sample std ddof=1 / sqrt(K), the standard error the LFW benchmark asks for),
        ``fold_accuracies`` float64[K], ``thresholds`` float64[K],
        ``folds`` int64[K] (sorted fold ids, the order of the arrays), ``num_pairs`` and
        ``num_missing`` (ints).

    Raises:
        ValueError: mismatched shapes, fewer than two folds, a non-finite valid score, or a fold
            whose other folds hold no valid pair.
    """
    scores, same, folds, valid = _check_inputs(scores, same, folds, valid)
    fold_ids = np.unique(folds)
    if len(fold_ids) < 2:
        raise ValueError(f"need at least 2 folds, got fold ids {fold_ids.tolist()}")
    accuracies, thresholds = [], []
    for fold in fold_ids:
        test = folds == fold
        train = ~test & valid
        if not train.any():
            raise ValueError(f"fold {fold}: the other folds hold no valid pair to choose a threshold")
        threshold = _accuracy_threshold(scores[train], same[train])
        predicted = np.where(valid[test], scores[test], -np.inf) > threshold
        correct = valid[test] & (predicted == same[test])
        accuracies.append(correct.mean())
        thresholds.append(threshold)
    accuracies = np.array(accuracies, dtype=np.float64)
    return {
        "mean": float(accuracies.mean()),
        "std": float(accuracies.std()),
        "sem": float(accuracies.std(ddof=1) / np.sqrt(len(accuracies))),
        "fold_accuracies": accuracies,
        "thresholds": np.array(thresholds, dtype=np.float64),
        "folds": fold_ids.astype(np.int64),
        "num_pairs": int(len(scores)),
        "num_missing": int((~valid).sum()),
    }


def _accuracy_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """Lowest candidate threshold (midpoints of distinct scores, +-inf) of best accuracy."""
    unique, inverse = np.unique(scores, return_inverse=True)
    positives = np.bincount(inverse[same], minlength=len(unique))
    negatives = np.bincount(inverse[~same], minlength=len(unique))
    # Candidate c puts the c lowest distinct scores below the threshold (predicted different).
    negatives_below = np.concatenate([[0], np.cumsum(negatives)])
    positives_below = np.concatenate([[0], np.cumsum(positives)])
    correct = negatives_below + (positives.sum() - positives_below)
    candidates = np.concatenate([[-np.inf], (unique[:-1] + unique[1:]) / 2, [np.inf]])
    return float(candidates[int(np.argmax(correct))])


def val_at_far(scores: np.ndarray, same: np.ndarray, far_target: float = 1e-3,
               folds: np.ndarray | None = None, valid: np.ndarray | None = None) -> dict:
    """Validation rate (true accept rate) at a false accept rate, as in FaceNet.

    A pair is accepted when ``score > threshold``. The threshold is the conservative one, without
    interpolation: with ``k = floor(far_target * D)`` for the ``D`` valid different pairs it is
    chosen on, it is their ``(k + 1)``-th highest score, the lowest threshold whose FAR on those
    pairs is <= ``far_target`` (-inf when ``k >= D``). facenet's ``calculate_val`` instead
    interpolates the threshold on a 0.01 grid; on LFW folds (2,700 training different pairs at 1e-3)
    both allow about 2-3 false accepts, and the results differ by that rounding only.

    With ``folds``, each fold's threshold is chosen on the other folds and VAL/FAR measured on the
    fold; without, the threshold is chosen and measured on all pairs. Invalid pairs are left out of
    the threshold choice and count as rejected: a missing same pair lowers VAL, a missing different
    pair is not a false accept.

    Args:
        scores: float[N] similarities; may be NaN where ``valid`` is False.
        same: bool[N], True for same-person pairs.
        far_target: target false accept rate in [0, 1].
        folds: int[N] fold ids, or None for a single evaluation on all pairs.
        valid: bool[N], False for missing pairs; default all valid.

    Returns:
        dict with ``val``, ``val_std``, ``far``, ``far_std`` (floats: means and population
        stds, ddof=0, over folds), ``fold_val``, ``fold_far``, ``thresholds`` (float64[K]),
        ``folds`` (int64[K]; ``[0]`` without folds), ``far_target`` and ``num_missing``.

    Raises:
        ValueError: bad shapes or ``far_target``, a non-finite valid score, a fold without same or
            different pairs, or no valid different pair to choose a threshold on.
    """
    if not 0.0 <= far_target <= 1.0:
        raise ValueError(f"far_target must be in [0, 1], got {far_target}")
    if folds is None:
        folds = np.zeros(np.shape(scores), dtype=np.int64)
        single = True
    else:
        single = False
    scores, same, folds, valid = _check_inputs(scores, same, folds, valid)
    fold_ids = np.unique(folds)
    if not single and len(fold_ids) < 2:
        raise ValueError(f"need at least 2 folds, got fold ids {fold_ids.tolist()}")
    vals, fars, thresholds = [], [], []
    for fold in fold_ids:
        test = folds == fold
        train = valid if single else (~test & valid)
        negatives = scores[train & ~same]
        if negatives.size == 0:
            raise ValueError(f"fold {fold}: no valid different pair to choose a threshold on")
        threshold = _far_threshold(negatives, far_target)
        accepted = valid[test] & (np.where(valid[test], scores[test], -np.inf) > threshold)
        num_same = int(same[test].sum())
        num_different = int((~same[test]).sum())
        if num_same == 0 or num_different == 0:
            raise ValueError(f"fold {fold}: needs same and different pairs, got {num_same} same "
                             f"and {num_different} different")
        vals.append((accepted & same[test]).sum() / num_same)
        fars.append((accepted & ~same[test]).sum() / num_different)
        thresholds.append(threshold)
    vals, fars = np.array(vals, dtype=np.float64), np.array(fars, dtype=np.float64)
    return {
        "val": float(vals.mean()),
        "val_std": float(vals.std()),
        "far": float(fars.mean()),
        "far_std": float(fars.std()),
        "fold_val": vals,
        "fold_far": fars,
        "thresholds": np.array(thresholds, dtype=np.float64),
        "folds": fold_ids.astype(np.int64),
        "far_target": float(far_target),
        "num_missing": int((~valid).sum()),
    }


def _far_threshold(negatives: np.ndarray, far_target: float) -> float:
    """Lowest threshold t with mean(negatives > t) <= far_target."""
    allowed = int(np.floor(far_target * negatives.size * (1 + 1e-12)))
    if allowed >= negatives.size:
        return float("-inf")
    position = negatives.size - 1 - allowed          # (allowed + 1)-th highest, ascending index
    return float(np.partition(negatives, position)[position])


def roc_curve(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve, one point per distinct score (ties form one step, as in scikit-learn).

    Args:
        scores: float[N] finite similarities.
        same: bool[N], True for same-person pairs; both classes must occur.

    Returns:
        ``(fpr, tpr, thresholds)``, float64[T + 1] each for T distinct scores: the point for
        ``thresholds[t]`` accepts pairs with ``score >= thresholds[t]``. Thresholds decrease from
        +inf (accept none: fpr = tpr = 0) to the lowest score (accept all: fpr = tpr = 1).

    Raises:
        ValueError: bad shapes, non-finite scores, or only one class present.
    """
    scores, same, _, _ = _check_inputs(scores, same, None, None)
    num_positive = int(same.sum())
    num_negative = int(same.size - num_positive)
    if num_positive == 0 or num_negative == 0:
        raise ValueError(f"ROC needs same and different pairs, got {num_positive} same and "
                         f"{num_negative} different")
    order = np.argsort(-scores, kind="stable")
    ordered, labels = scores[order], same[order]
    last_of_tie = np.concatenate([np.flatnonzero(np.diff(ordered)), [ordered.size - 1]])
    true_positives = np.cumsum(labels)[last_of_tie]
    false_positives = last_of_tie + 1 - true_positives
    fpr = np.concatenate([[0.0], false_positives / num_negative])
    tpr = np.concatenate([[0.0], true_positives / num_positive])
    return fpr, tpr, np.concatenate([[np.inf], ordered[last_of_tie]])


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a same pair > score of a different pair), ties 1/2.

    Args:
        scores: float[N] finite similarities.
        same: bool[N]; both classes must occur.

    Returns:
        AUC in [0, 1].
    """
    fpr, tpr, _ = roc_curve(scores, same)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _check_inputs(scores, same, folds, valid):
    """Return float64, bool, int64, bool 1-D arrays of one length N."""
    scores = np.asarray(scores, dtype=np.float64)
    same_in = np.asarray(same)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {scores.shape}")
    n = scores.shape[0]
    if same_in.shape != (n,):
        raise ValueError(f"same must be [{n}] like scores, got shape {same_in.shape}")
    if same_in.dtype != bool:
        if not np.isin(same_in, (0, 1)).all():
            raise ValueError(f"same must be bool or 0/1, got values {np.unique(same_in)[:5].tolist()}")
        same_in = same_in.astype(bool)
    if folds is None:
        folds = np.zeros(n, dtype=np.int64)
    folds = np.asarray(folds)
    if folds.shape != (n,) or not np.issubdtype(folds.dtype, np.integer):
        raise ValueError(f"folds must be int [{n}], got {folds.dtype} of shape {folds.shape}")
    if valid is None:
        valid = np.ones(n, dtype=bool)
    valid = np.asarray(valid)
    if valid.shape != (n,) or valid.dtype != bool:
        raise ValueError(f"valid must be bool [{n}], got {valid.dtype} of shape {valid.shape}")
    bad = valid & ~np.isfinite(scores)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} valid pairs have non-finite scores (first at index "
                         f"{int(np.flatnonzero(bad)[0])}); mark them with valid=np.isfinite(scores)")
    return scores, same_in, folds.astype(np.int64), valid
