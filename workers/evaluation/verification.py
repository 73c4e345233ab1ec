"""Face verification metrics: cosine scores, k-fold accuracy, VAL@FAR and ROC, over a pairs table.

Pure numpy; no Ray, no torch. Scores are similarities: higher means more likely the same person (e.g.
:func:`cosine_scores`). The pair protocols (LFW pairs files, identity splits, held-out pairs) live in
:mod:`workers.evaluation.pairs` and are importable from here too.
"""
from __future__ import annotations

import numpy as np

from workers.evaluation.pairs import (FOLD, IMAGE1, IMAGE2, NAME1, NAME2, PAIR_COLUMNS, SAME, heldout_pairs,
                                      lfw_image_path, lookup_pairs, pair_identities, read_pairs, split_identities)

__all__ = ["FOLD", "SAME", "NAME1", "IMAGE1", "NAME2", "IMAGE2", "PAIR_COLUMNS", "lfw_image_path", "read_pairs",
           "pair_identities", "lookup_pairs", "split_identities", "heldout_pairs", "cosine_scores",
           "kfold_accuracy", "val_at_far", "roc_curve", "roc_auc"]


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
