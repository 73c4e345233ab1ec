"""Face verification pair protocols: LFW pairs files, identity splits and held-out pairs.

Pure numpy/pandas; no Ray, no torch.

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
