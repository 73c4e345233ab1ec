"""The evaluate run's HTML page: accuracy, VAL at FAR and AUC cards, the ROC figure, folds and details."""
from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from workers import report_html as H


def build_evaluate_report(result: Mapping, roc_png: bytes | None) -> str:
    """The evaluate report page as an HTML string.

    Args:
        result: the evaluate run's metrics. Recognised keys (all optional; other scalar, short list
            or small dict values are listed under "details"):

            * ``accuracy``: the dict of ``verification.kfold_accuracy`` (mean, std, sem,
              fold_accuracies, thresholds, num_pairs, num_missing) or a float, with
              ``accuracy_std`` beside it;
            * ``val_at_far``: the dict of ``verification.val_at_far`` (val, val_std, far, far_std,
              far_target), or a list of them for several targets;
            * ``auc``: float;
            * ``run_id``, ``embedder``, ``dataset``, ``protocol``, ``pairs``, ``num_pairs``,
              ``num_missing``, ``wall_time_s``.
        roc_png: PNG bytes of the ROC figure, or None.

    Returns:
        A complete HTML document.
    """
    result = dict(result or {})
    title = f"facemill evaluate {result.get('run_id', '')}".strip()
    parts = [H.section(lambda: _evaluate_header(result))]
    parts.append("<h2>ROC</h2>" + (H.section(lambda: H.img(roc_png, "ROC curve")) if roc_png
                                    else H.paragraph("No ROC figure was made.", "muted")))
    parts.append(H.section(lambda: _fold_table(result)))
    parts.append(H.section(lambda: _details_table(result)))
    parts.append(H.paragraph(f"Written {H.now()}.", "muted"))
    return H.page(title, "".join(parts))


_EVAL_KNOWN = {"accuracy", "accuracy_std", "val_at_far", "auc", "run_id"}


def _evaluate_header(result: dict) -> str:
    acc = result.get("accuracy")
    if isinstance(acc, Mapping):
        mean, std, sem = acc.get("mean"), acc.get("std"), acc.get("sem")
    else:
        mean, std, sem = acc, result.get("accuracy_std"), None
    cards = []
    if mean is not None:
        value = f"{100 * float(mean):.2f}%" + (f" ± {100 * float(std):.2f}" if std is not None else "")
        cards.append(("verification accuracy" + (f" (sem {100 * float(sem):.2f})" if sem is not None else ""),
                      value))
    vals = result.get("val_at_far")
    for v in ([vals] if isinstance(vals, Mapping) else list(vals or [])):
        if not isinstance(v, Mapping) or v.get("val") is None:
            continue
        text = f"{100 * float(v['val']):.2f}%"
        if v.get("val_std") is not None:
            text += f" ± {100 * float(v['val_std']):.2f}"
        far = v.get("far")
        label = f"VAL @ FAR={H.fmt_float(v.get('far_target'), None)}"
        if far is not None:
            label += f" (measured FAR {float(far):.2e})"
        cards.append((label, text))
    if result.get("auc") is not None:
        cards.append(("ROC AUC", f"{float(result['auc']):.4f}"))
    if not cards:
        cards.append(("result", "no metrics"))
    return H.header("facemill evaluate", result.get("run_id", ""), cards)


def _fold_table(result: dict) -> str:
    acc = result.get("accuracy")
    if not isinstance(acc, Mapping) or acc.get("fold_accuracies") is None:
        return ""
    accs = np.asarray(acc["fold_accuracies"], np.float64).reshape(-1)
    folds = np.asarray(acc.get("folds", np.arange(accs.size))).reshape(-1)
    thr = np.asarray(acc.get("thresholds", np.full(accs.size, np.nan)), np.float64).reshape(-1)
    body = "".join(f"<tr><td class=n>{int(f)}</td><td class=n>{100 * a:.2f}%</td><td class=n>{t:.4f}</td></tr>"
                   for f, a, t in zip(folds, accs, thr))
    return ("<h2>Folds</h2><table><tr><th>fold</th><th>accuracy</th><th>threshold</th></tr>"
            f"{body}</table>")


def _details_table(result: dict) -> str:
    items = []
    for key, value in result.items():
        if key in _EVAL_KNOWN:
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, (list, tuple)) and len(value) > 20:
            value = f"[{len(value)} values]"
        if isinstance(value, Mapping):
            value = json.dumps(value, default=str)[:500]
        if isinstance(value, float):
            value = f"{value:.6g}"
        items.append((key, value))
    acc = result.get("accuracy")
    if isinstance(acc, Mapping):
        items += [(f"accuracy.{k}", acc[k]) for k in ("num_pairs", "num_missing") if k in acc]
    if not items:
        return ""
    rows = "".join(f"<tr><th>{H.escape(k)}</th><td>{H.escape(v)}</td></tr>" for k, v in items)
    return f"<h2>Details</h2><table>{rows}</table>"
