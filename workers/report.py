"""Self-contained HTML run reports (``<output>/report.html``): one page per prepare or evaluate run.

A page holds everything inline: CSS in a ``<style>`` block, charts and face crops as base64 PNG
``data:`` URIs, no script and no external link, so it opens from S3, a mail attachment or a laptop
alike. Charts are drawn with matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), never
``pyplot``, so nothing global changes in the process that calls this.

A report must never fail the job it describes: each section is drawn on its own, a section that
fails shows its error instead, and :func:`write_prepare_report` / :func:`write_evaluate_report` log
and return None when even the page cannot be written. The work is bounded: the prepare page reads
the shard summary rows already in memory, at most :data:`_MAX_SAMPLE_SHARDS` faces files for the
sample crops, and the run record; nothing scans the whole dataset.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

import schemas as S
from workers import plots, storage

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
NUM_SAMPLES = 16
_MAX_SAMPLE_SHARDS = 4
_SAMPLE_COLUMNS = (S.URI, S.IDENTITY, S.SCORE, S.LANDMARKS, S.CROP, S.RUN_ID)

ERROR_DESCRIPTIONS = {
    S.ERR_EMPTY: "the file has 0 bytes",
    S.ERR_READ: "the file could not be read (missing, permissions, network)",
    S.ERR_NOT_IMAGE: "the bytes are not a known image format",
    S.ERR_TRUNCATED: "the image data ends early",
    S.ERR_TOO_LARGE: "more pixels than the decode limit",
    S.ERR_TOO_SMALL: "smaller than the decode minimum",
    S.ERR_DECODE: "the decoder failed",
    S.ERR_PROCESS: "detection / alignment / embedding failed on this image",
}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
 color:#1d2330;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e8;
 padding-bottom:4px} .muted{color:#6b7385} .note{background:#fff7e0;border:1px solid #f0d890;padding:8px 12px;
 border-radius:6px} .fail{background:#fdecec;border:1px solid #f1b5b5;padding:8px 12px;border-radius:6px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{border:1px solid #dde1e8;border-radius:8px;padding:8px 14px;min-width:120px;background:#fafbfc}
.card .v{font-size:21px;font-weight:600} .card .k{color:#6b7385;font-size:12px}
table{border-collapse:collapse;margin:6px 0} td,th{border-bottom:1px solid #e6e9ef;padding:4px 12px 4px 0;
 text-align:left;vertical-align:top} th{font-weight:600} td.n{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px} .charts img{border:1px solid #e6e9ef;border-radius:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(168px,1fr));gap:10px}
.grid figure{margin:0;text-align:center;font-size:12px}
.face{position:relative} .face img{display:block;width:100%;border-radius:4px}
.face svg{position:absolute;left:0;top:0;width:100%;height:100%}
circle.t{fill:none;stroke:#4cd04c;stroke-width:.7} circle.l{fill:#e8322d}
.grid figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
code{font-size:12px;background:#f1f3f6;padding:1px 4px;border-radius:3px}
"""


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------

def write_prepare_report(output: str, summary: dict, rows: list[dict],
                         storage_options: dict | None = None) -> str | None:
    """Write ``<output>/report.html`` for a prepare run; never raises.

    Args:
        output: dataset root (local path or ``s3://``).
        summary: the run summary (``workers.pipeline._summarise``).
        rows: per-shard summary rows of this run (``workers.actors.write_shard``): shard, images,
            faces, ok, no_face, error, reasons (JSON str), face_sizes float32[F], face_scores
            float32[F], written_at (unix seconds), pid.
        storage_options: fsspec options.

    Returns:
        The URI written, or None if the page could not be written (the reason is logged).
    """
    uri = storage.join(output, REPORT_FILE)
    try:
        page = build_prepare_report(output, summary, rows, storage_options)
        storage.put_atomic(uri, page.encode("utf-8"), storage_options)
        return uri
    except Exception as exc:  # noqa: BLE001 - a report never fails the run it describes
        log.warning("could not write the prepare report %s: %s: %s", uri, type(exc).__name__, exc)
        return None


def write_evaluate_report(output: str, result: dict, roc_png: bytes | None,
                          storage_options: dict | None = None, filename: str = REPORT_FILE) -> str | None:
    """Write ``<output>/<filename>`` for an evaluate run; never raises.

    Args:
        output: the evaluate run's output folder (local path or ``s3://``).
        result: see :func:`build_evaluate_report`.
        roc_png: the ROC figure as PNG bytes (e.g. from ``verification.plot_roc``), or None.
        storage_options: fsspec options.
        filename: page name under ``output`` (pass another name if ``output`` is a dataset root whose
            prepare report must be kept).

    Returns:
        The URI written, or None if the page could not be written (the reason is logged).
    """
    uri = storage.join(output, filename)
    try:
        page = build_evaluate_report(result, roc_png)
        storage.put_atomic(uri, page.encode("utf-8"), storage_options)
        return uri
    except Exception as exc:  # noqa: BLE001 - a report never fails the run it describes
        log.warning("could not write the evaluate report %s: %s: %s", uri, type(exc).__name__, exc)
        return None


# --------------------------------------------------------------------------------------------------
# Prepare page
# --------------------------------------------------------------------------------------------------

def build_prepare_report(output: str, summary: dict, rows: Sequence[Mapping],
                         storage_options: dict | None = None) -> str:
    """The prepare report page as an HTML string (sections that fail show their error).

    Args:
        output, summary, rows, storage_options: as :func:`write_prepare_report`.

    Returns:
        A complete HTML document.
    """
    summary = dict(summary or {})
    rows = list(rows or [])
    title = f"facemill prepare {summary.get('run_id', '')}".strip()
    parts = [_section(lambda: _prepare_header(summary, rows))]
    if not rows:
        parts.append(_p(
            "Nothing was processed in this run: "
            f"{_fmt_int(summary.get('images_listed'))} images listed, "
            f"{_fmt_int(summary.get('images_already_done'))} already done.", "note"))
    else:
        parts.append("<h2>Errors by reason</h2>" + _section(lambda: _errors_table(summary, rows)))
        parts.append("<h2>Throughput and faces</h2><div class=charts>"
                     + _section(lambda: _img(_throughput_png(rows, summary.get("images_per_s")),
                                             "images per second over time"))
                     + _section(lambda: _img(_hist_png(_concat(rows, "face_sizes"), "face size (px)",
                                                       "face size: sqrt of box area, original pixels"),
                                             "face size histogram"))
                     + _section(lambda: _img(_hist_png(_concat(rows, "face_scores"), "detection score",
                                                       "detection score (O-Net probability)", log_y=True,
                                                       fmt=".4f"),
                                             "detection score histogram"))
                     + "</div>")
        parts.append("<h2>Sample aligned crops</h2>"
                     + _section(lambda: _samples_html(output, rows, storage_options)))
    parts.append(_p(f"Written {_now()} to <code>{_e(storage.join(output, REPORT_FILE))}</code>.", "muted"))
    return _page(title, "".join(parts))


def _prepare_header(summary: dict, rows: list) -> str:
    images = summary.get("images_in", sum(int(r.get("images", 0)) for r in rows))
    cards = [
        ("images in", _fmt_int(images)),
        ("with faces", _fmt_int(summary.get("images_with_faces", sum(int(r.get("ok", 0)) for r in rows)))),
        ("no face", _fmt_int(summary.get("images_no_face", sum(int(r.get("no_face", 0)) for r in rows)))),
        ("errors", _fmt_int(summary.get("images_error", sum(int(r.get("error", 0)) for r in rows)))),
        ("faces", _fmt_int(summary.get("faces", sum(int(r.get("faces", 0)) for r in rows)))),
        ("wall time", _fmt_seconds(summary.get("wall_time_s"))),
        ("images / s", _fmt_float(summary.get("images_per_s"), 1)),
    ]
    card_html = "".join(f"<div class=card><div class=v>{_e(v)}</div><div class=k>{_e(k)}</div></div>"
                        for k, v in cards)
    details = [
        ("run id", summary.get("run_id")), ("input", summary.get("input")), ("output", summary.get("output")),
        ("embedder", summary.get("embedder")), ("schema version", summary.get("schema_version")),
        ("images listed", _fmt_int(summary.get("images_listed"))),
        ("already done (skipped)", _fmt_int(summary.get("images_already_done"))),
        ("shards written", _fmt_int(summary.get("shards", len(rows)))),
        ("records table version", summary.get("table_version")),
        ("median face size", _fmt_float(summary.get("median_face_size_px"), 1, " px")),
        ("non-image files skipped", _fmt_int(summary.get("skipped_non_image_files"))),
        ("files skipped, by reason", ", ".join(f"{k} {v}" for k, v in (summary.get("skipped_by_reason") or {}).items())
         or None),
    ]
    examples = summary.get("skipped_examples") or []
    if examples:
        details.append(("skipped, e.g.", ", ".join(map(str, examples))))
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in details if v not in (None, ""))
    return (f"<h1>{_e('facemill prepare')}</h1><div class=muted>{_e(summary.get('run_id', ''))}</div>"
            f"<div class=cards>{card_html}</div><table>{table}</table>")


def _errors_table(summary: dict, rows: list) -> str:
    reasons = Counter()
    for r in rows:
        raw = r.get("reasons") or "{}"
        reasons.update(json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw))
    if not reasons and summary.get("errors_by_reason"):
        reasons.update(summary["errors_by_reason"])
    if not reasons:
        return _p("No image failed.", "muted")
    images = max(int(summary.get("images_in") or sum(int(r.get("images", 0)) for r in rows)), 1)
    body = "".join(
        f"<tr><td><code>{_e(reason)}</code></td><td class=n>{count:,}</td>"
        f"<td class=n>{100 * count / images:.2f}%</td><td>{_e(ERROR_DESCRIPTIONS.get(reason, ''))}</td></tr>"
        for reason, count in reasons.most_common())
    return ("<table><tr><th>reason</th><th>images</th><th>of images in</th><th>meaning</th></tr>"
            f"{body}</table><p class=muted>Per-image details: the <code>{S.ERROR}</code> and "
            f"<code>{S.ERROR_DETAIL}</code> columns of the <code>{S.IMAGES}</code> table.</p>")


def _concat(rows: list, key: str) -> np.ndarray:
    parts = [np.asarray(r[key], dtype=np.float32).reshape(-1) for r in rows if r.get(key) is not None]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def throughput_series(rows: Sequence[Mapping], max_bins: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Images per second over time from the shards' commit times.

    The images of a shard are spread evenly over the gap between the previous commit and its own
    (``written_at``), which makes the cumulative count piecewise linear; the span from the first to
    the last commit is cut into at most ``max_bins`` equal bins (at most one per commit) and a bin's
    rate is that count's increase over its width. The first shard's images are left out: the work
    before the first commit has no start time to divide by.

    Returns:
        (edges, rate): float64[K + 1] bin edges in seconds since the first commit and float64[K]
        images/s; both empty with fewer than two distinct commit times.
    """
    times = np.array([float(r.get("written_at", 0.0)) for r in rows], np.float64)
    images = np.array([float(r.get("images", 0)) for r in rows], np.float64)
    if times.size < 2 or np.ptp(times) <= 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(times, kind="stable")
    t = times[order] - times[order[0]]
    done = np.concatenate([[0.0], np.cumsum(images[order][1:])])        # images finished by t[i]
    edges = np.linspace(0.0, t[-1], min(times.size - 1, max_bins) + 1)
    return edges, np.diff(np.interp(edges, t, done)) / np.diff(edges)


def _throughput_png(rows: list, overall: float | None) -> bytes | str:
    edges, rate = throughput_series(rows)
    if edges.size == 0:
        return "One commit time only: no rate over time to draw."
    fig, ax = _figure()
    ax.stairs(rate, edges, color="#2b6cb0", linewidth=1.6, label="between commits")
    ax.stairs(rate, edges, fill=True, color="#2b6cb0", alpha=0.15)
    ax.set_xlim(edges[0], edges[-1])
    if overall:
        ax.axhline(float(overall), color="#c05621", linestyle="--", linewidth=1,
                   label=f"whole run {float(overall):.1f}/s")
    ax.set_xlabel("seconds since the first shard committed")
    ax.set_ylabel("images / s")
    ax.set_title("throughput")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return plots.png_bytes(fig)


def _hist_png(values: np.ndarray, xlabel: str, title: str, log_y: bool = False, fmt: str = ".1f") -> bytes | str:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "No faces in this run."
    fig, ax = _figure()
    lo, hi = float(values.min()), float(values.max())
    counts, edges = np.histogram(values, bins=40 if hi > lo else 1,
                                 range=(lo, hi) if hi > lo else (lo - 0.5, hi + 0.5))
    ax.stairs(counts, edges, fill=True, color="#2f855a", alpha=0.85)  # one artist, not 40 bars
    if log_y:
        ax.set_yscale("symlog", linthresh=1)
    median = float(np.median(values))
    ax.axvline(median, color="#1d2330", linestyle="--", linewidth=1, label=f"median {median:{fmt}}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("faces")
    ax.set_title(f"{title} (n={values.size:,})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return plots.png_bytes(fig)


# --------------------------------------------------------------------------------------------------
# Sample crops with their landmarks
# --------------------------------------------------------------------------------------------------

def _run_align(output: str, run_id: str | None, crop_side: int, storage_options: dict | None):
    """The AlignConfig the run used (from its run record), sized to the stored crops."""
    from workers.faces.align import AlignConfig

    margin, template = 0.0, AlignConfig().template
    if run_id:
        try:
            fs, path = storage.url_to_fs(storage.join(output, storage.RUNS, f"{run_id}.json"), storage_options)
            align = json.loads(fs.cat_file(path))["config"]["engine"]["align"]
            margin = float(align.get("margin", margin))
            template = tuple(tuple(float(v) for v in p) for p in align.get("template", template))
        except Exception as exc:  # noqa: BLE001 - an older or missing record: the default framing
            log.info("run record of %s unreadable (%s); assuming the default alignment", run_id, exc)
    return AlignConfig(size=crop_side, margin=margin, template=template)


def _sample_faces(output: str, rows: list, storage_options: dict | None, n: int = NUM_SAMPLES):
    """Up to ``n`` faces spread over the first committed shards of the run (a pushed-down shard filter)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from workers import dataset

    shards = [r["shard"] for r in sorted(rows, key=lambda r: float(r.get("written_at", 0.0)))
              if int(r.get("faces", 0)) > 0][:_MAX_SAMPLE_SHARDS]
    if not shards:
        return None
    dataset.require_dataset(output, storage_options)
    table = dataset.read_table(output, S.FACES, storage_options, columns=list(_SAMPLE_COLUMNS),
                               filter=pc.field(S.SHARD).isin(shards))
    if table.num_rows == 0:
        return None
    take = np.unique(np.linspace(0, table.num_rows - 1, min(n, table.num_rows)).round().astype(np.int64))
    return table.take(pa.array(take))


def _samples_html(output: str, rows: list, storage_options: dict | None) -> str:
    import cv2

    from workers.faces.align import crop_landmarks
    from workers.records import decode_crops

    table = _sample_faces(output, rows, storage_options)
    if table is None or table.num_rows == 0:
        return _p("No faces in this run.", "muted")
    crops = decode_crops(table.column(S.CROP))
    landmarks = table.column(S.LANDMARKS).combine_chunks().flatten().to_numpy().reshape(-1, 5, 2)
    run_ids = table.column(S.RUN_ID).to_pylist()
    align = _run_align(output, run_ids[0] if run_ids else None, crops.shape[1], storage_options)
    points = align.points().numpy().astype(np.float64)
    mapped, _ = crop_landmarks(landmarks, points)
    errors = np.linalg.norm(mapped - points[None], axis=2)                       # [F, 5] px
    scores = table.column(S.SCORE).to_numpy()
    identities = table.column(S.IDENTITY).to_pylist()
    uris = table.column(S.URI).to_pylist()
    figures = []
    for i in range(crops.shape[0]):  # a dozen small pictures: one PNG each
        name = identities[i] or uris[i].rsplit("/", 1)[-1]
        figures.append(
            f"<figure>{_crop_with_marks(cv2, crops[i], mapped[i], points, f'face {i}', uris[i])}"
            f"<figcaption>{_e(name)}</figcaption><figcaption class=muted>score {scores[i]:.3f} · "
            f"fit {errors[i].mean():.1f} px</figcaption></figure>")
    legend = (f"{len(figures)} faces from the first committed shard(s) of this run, as stored "
              f"({crops.shape[1]} px). Red dots: the detected landmarks carried into the crop by the "
              "similarity fit that made it; green rings: the template points "
              f"(margin {align.margin:g}). 'fit': mean distance between the two, crop pixels. "
              f"Median over these faces: {np.median(errors):.2f} px.")
    return _p(legend, "muted") + "<div class=grid>" + "".join(figures) + "</div>"


def _crop_with_marks(cv2, crop: np.ndarray, mapped: np.ndarray, points: np.ndarray, alt: str, title: str) -> str:
    """The stored crop as a PNG with an SVG overlay of template rings and landmark dots.

    The overlay's viewBox puts pixel centres at integer coordinates (the image spans -0.5 .. S - 0.5),
    so marks sit at their exact sub-pixel places at any display size, and the crop stays as stored.
    """
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(crop[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding of a sample crop failed")
    h, w = crop.shape[:2]
    rings = "".join(f"<circle class=t cx='{x:.2f}' cy='{y:.2f}' r='2.6'/>" for x, y in points)
    dots = "".join(f"<circle class=l cx='{x:.2f}' cy='{y:.2f}' r='1.3'/>" for x, y in mapped)
    return (f"<div class=face><img alt='{_e(alt)}' title='{_e(title)}' src='{_data_uri(buf.tobytes())}'>"
            f"<svg viewBox='-0.5 -0.5 {w} {h}' aria-hidden=true>{rings}{dots}</svg></div>")


# --------------------------------------------------------------------------------------------------
# Evaluate page
# --------------------------------------------------------------------------------------------------

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
    parts = [_section(lambda: _evaluate_header(result))]
    parts.append("<h2>ROC</h2>" + (_section(lambda: _img(roc_png, "ROC curve")) if roc_png
                                    else _p("No ROC figure was made.", "muted")))
    parts.append(_section(lambda: _fold_table(result)))
    parts.append(_section(lambda: _details_table(result)))
    parts.append(_p(f"Written {_now()}.", "muted"))
    return _page(title, "".join(parts))


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
        label = f"VAL @ FAR={_fmt_float(v.get('far_target'), None)}"
        if far is not None:
            label += f" (measured FAR {float(far):.2e})"
        cards.append((label, text))
    if result.get("auc") is not None:
        cards.append(("ROC AUC", f"{float(result['auc']):.4f}"))
    if not cards:
        cards.append(("result", "no metrics"))
    card_html = "".join(f"<div class=card><div class=v>{_e(v)}</div><div class=k>{_e(k)}</div></div>"
                        for k, v in cards)
    return (f"<h1>facemill evaluate</h1><div class=muted>{_e(result.get('run_id', ''))}</div>"
            f"<div class=cards>{card_html}</div>")


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
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f"<h2>Details</h2><table>{rows}</table>"


# --------------------------------------------------------------------------------------------------
# HTML and figure helpers
# --------------------------------------------------------------------------------------------------

def _figure():
    fig = plots.new_figure((4.6, 3.2))   # fixed margins: a layout engine would draw twice
    fig.subplots_adjust(left=0.15, right=0.97, bottom=0.15, top=0.9)
    return fig, fig.add_subplot()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes | str | None, alt: str) -> str:
    """An inline PNG, or the message a drawing function returned instead of one."""
    if isinstance(png, str):
        return _p(png, "muted")
    if not png:
        return _p(f"No {alt}.", "muted")
    return f"<img alt='{_e(alt)}' src='{_data_uri(png)}'>"


def _section(render: Callable[[], str]) -> str:
    """Render one section; a failure becomes a visible note instead of an exception."""
    try:
        return render()
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the page
        log.warning("report section failed: %s: %s", type(exc).__name__, exc)
        return _p(_e(f"This section could not be drawn: {type(exc).__name__}: {exc}"), "fail")


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n")


def _p(text: str, cls: str = "") -> str:
    """A paragraph of text that is already HTML (callers escape what they interpolate)."""
    return f"<p class={cls}>{text}</p>" if cls else f"<p>{text}</p>"


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt_int(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def _fmt_float(value, digits: int | None, unit: str = "") -> str:
    if value is None:
        return "–"
    return (f"{float(value):.{digits}f}" if digits is not None else f"{float(value):g}") + unit


def _fmt_seconds(value) -> str:
    if value is None:
        return "–"
    s = float(value)
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {s % 60:.0f} s"


def _now() -> str:
    return _dt.datetime.fromtimestamp(time.time(), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
