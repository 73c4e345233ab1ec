"""Self-contained HTML run reports (``<output>/report.html``): one page per prepare or evaluate run.

A page holds everything inline: CSS in a ``<style>`` block, charts and face crops as base64 PNG
``data:`` URIs, no script and no external link, so it opens from S3, a mail attachment or a laptop
alike. Charts come from :mod:`workers.plots` (matplotlib's object API, never ``pyplot``), HTML pieces
from :mod:`workers.report_html`, what the prepare page reads from :mod:`workers.report_data`, the
evaluate page from :mod:`workers.report_evaluate`.

A report must never fail the job it describes: each section is drawn on its own, a section that
fails shows its error instead, and :func:`write_prepare_report` / :func:`write_evaluate_report` log
and return None when even the page cannot be written. The prepare page reads the run's summary
(parsed once into :class:`workers.runs.PrepareSummary`), the shard summary rows already in memory,
a few faces for the sample crops, and the run record.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

import schemas as S
from workers import plots, storage
from workers import report_html as H
from workers.report_data import NUM_SAMPLES, concat_rows, reason_counts, run_align, sample_faces, throughput_series
from workers.report_evaluate import build_evaluate_report
from workers.runs import PrepareSummary

__all__ = ["REPORT_FILE", "NUM_SAMPLES", "ERROR_DESCRIPTIONS", "write_prepare_report", "write_evaluate_report",
           "build_prepare_report", "build_evaluate_report", "throughput_series"]

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"

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


def _write(uri: str, what: str, build, storage_options: dict | None) -> str | None:
    try:
        storage.put_atomic(uri, build().encode("utf-8"), storage_options)
        return uri
    except Exception as exc:  # noqa: BLE001 - a report never fails the run it describes
        log.warning("could not write the %s report %s: %s: %s", what, uri, type(exc).__name__, exc)
        return None


def write_prepare_report(output: str, summary: dict, rows: list[dict],
                         storage_options: dict | None = None) -> str | None:
    """Write ``<output>/report.html`` for a prepare run; never raises.

    Args:
        output: dataset root (local path or ``s3://``).
        summary: the run summary (the keys of :class:`workers.runs.PrepareSummary`).
        rows: per-shard summary rows of this run (``workers.actors.write_shard``): shard, images,
            faces, ok, no_face, error, reasons (JSON str), face_sizes float32[F], face_scores
            float32[F], written_at (unix seconds), pid.
        storage_options: fsspec options.

    Returns:
        The URI written, or None if the page could not be written (the reason is logged).
    """
    return _write(storage.join(output, REPORT_FILE), "prepare",
                  lambda: build_prepare_report(output, summary, rows, storage_options), storage_options)


def write_evaluate_report(output: str, result: dict, roc_png: bytes | None,
                          storage_options: dict | None = None, filename: str = REPORT_FILE) -> str | None:
    """Write ``<output>/<filename>`` for an evaluate run; never raises.

    Args:
        output: the evaluate run's output folder (local path or ``s3://``).
        result: see :func:`workers.report_evaluate.build_evaluate_report`.
        roc_png: the ROC figure as PNG bytes (e.g. from ``verification.plot_roc``), or None.
        storage_options: fsspec options.
        filename: page name under ``output`` (pass another name if ``output`` is a dataset root whose
            prepare report must be kept).

    Returns:
        The URI written, or None if the page could not be written (the reason is logged).
    """
    return _write(storage.join(output, filename), "evaluate", lambda: build_evaluate_report(result, roc_png),
                  storage_options)


def build_prepare_report(output: str, summary: Mapping, rows: Sequence[Mapping],
                         storage_options: dict | None = None) -> str:
    """The prepare report page as an HTML string (sections that fail show their error; a summary that
    lacks a key fails the sections that read it, with the key named).

    Args:
        output, summary, rows, storage_options: as :func:`write_prepare_report`.

    Returns:
        A complete HTML document.
    """
    raw = dict(summary or {})
    rows = list(rows or [])
    try:
        parsed: PrepareSummary | ValueError = PrepareSummary.from_dict(raw)
    except ValueError as exc:
        parsed = exc

    def need() -> PrepareSummary:
        if isinstance(parsed, ValueError):
            raise parsed
        return parsed

    title = f"facemill prepare {raw.get('run_id', '')}".strip()
    parts = [H.section(lambda: _prepare_header(need()))]
    if not rows:
        parts.append(H.section(lambda: H.paragraph(
            f"Nothing was processed in this run: {H.fmt_int(need().images_listed)} images listed, "
            f"{H.fmt_int(need().images_already_done)} already done.", "note")))
    else:
        parts.append("<h2>Errors by reason</h2>" + H.section(lambda: _errors_table(need, rows)))
        parts.append("<h2>Throughput and faces</h2><div class=charts>"
                     + H.section(lambda: H.img(_throughput_png(rows, need().images_per_s),
                                               "images per second over time"))
                     + H.section(lambda: H.img(_hist_png(concat_rows(rows, "face_sizes"), "face size (px)",
                                                         "face size: sqrt of box area, original pixels"),
                                               "face size histogram"))
                     + H.section(lambda: H.img(_hist_png(concat_rows(rows, "face_scores"), "detection score",
                                                         "detection score (O-Net probability)", log_y=True,
                                                         fmt=".4f"),
                                               "detection score histogram"))
                     + "</div>")
        parts.append("<h2>Sample aligned crops</h2>"
                     + H.section(lambda: _samples_html(output, rows, storage_options)))
    parts.append(H.paragraph(f"Written {H.now()} to <code>{H.escape(storage.join(output, REPORT_FILE))}</code>.",
                             "muted"))
    return H.page(title, "".join(parts))


def _prepare_header(s: PrepareSummary) -> str:
    cards = [
        ("images in", H.fmt_int(s.images_in)), ("with faces", H.fmt_int(s.images_with_faces)),
        ("no face", H.fmt_int(s.images_no_face)), ("errors", H.fmt_int(s.images_error)),
        ("faces", H.fmt_int(s.faces)), ("wall time", H.fmt_seconds(s.wall_time_s)),
        ("images / s", H.fmt_float(s.images_per_s, 1)),
    ]
    details = [
        ("run id", s.run_id), ("input", s.input), ("output", s.output),
        ("embedder", s.embedder), ("schema version", s.schema_version),
        ("images listed", H.fmt_int(s.images_listed)),
        ("already done (skipped)", H.fmt_int(s.images_already_done)),
        ("shards written", H.fmt_int(s.shards)),
        ("records table version", s.table_version),
        ("median face size", H.fmt_float(s.median_face_size_px, 1, " px")),
        ("non-image files skipped", H.fmt_int(s.skipped_non_image_files)),
        ("files skipped, by reason", ", ".join(f"{k} {v}" for k, v in s.skipped_by_reason.items()) or None),
    ]
    if s.skipped_examples:
        details.append(("skipped, e.g.", ", ".join(map(str, s.skipped_examples))))
    table = "".join(f"<tr><th>{H.escape(k)}</th><td>{H.escape(v)}</td></tr>"
                    for k, v in details if v not in (None, ""))
    return H.header("facemill prepare", s.run_id, cards) + f"<table>{table}</table>"


def _errors_table(need, rows: list) -> str:
    reasons = reason_counts(rows)
    if not reasons:
        return H.paragraph("No image failed.", "muted")
    images = max(int(need().images_in), 1)
    body = "".join(
        f"<tr><td><code>{H.escape(reason)}</code></td><td class=n>{count:,}</td>"
        f"<td class=n>{100 * count / images:.2f}%</td><td>{H.escape(ERROR_DESCRIPTIONS.get(reason, ''))}</td></tr>"
        for reason, count in reasons.most_common())
    return ("<table><tr><th>reason</th><th>images</th><th>of images in</th><th>meaning</th></tr>"
            f"{body}</table><p class=muted>Per-image details: the <code>{S.ERROR}</code> and "
            f"<code>{S.ERROR_DETAIL}</code> columns of the <code>{S.IMAGES}</code> table.</p>")


def _throughput_png(rows: list, overall: float | None) -> bytes | str:
    edges, rate = throughput_series(rows)
    if edges.size == 0:
        return "One commit time only: no rate over time to draw."
    return plots.plot_throughput(edges, rate, overall)


def _hist_png(values: np.ndarray, xlabel: str, title: str, log_y: bool = False, fmt: str = ".1f") -> bytes | str:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return "No faces in this run."
    return plots.plot_face_histogram(values, xlabel, title, log_y, fmt)


def _samples_html(output: str, rows: list, storage_options: dict | None) -> str:
    from workers.faces.align import crop_landmarks, landmark_fit_errors
    from workers.records import decode_crops

    table = sample_faces(output, rows, storage_options)
    if table is None or table.num_rows == 0:
        return H.paragraph("No faces in this run.", "muted")
    crops = decode_crops(table.column(S.CROP))
    landmarks = table.column(S.LANDMARKS).combine_chunks().flatten().to_numpy().reshape(-1, 5, 2)
    run_ids = table.column(S.RUN_ID).to_pylist()
    align = run_align(output, run_ids[0] if run_ids else None, crops.shape[1], storage_options)
    points = align.points().numpy().astype(np.float64)
    mapped, _ = crop_landmarks(landmarks, points)
    errors = landmark_fit_errors(mapped, points)                                   # [F, 5] px
    scores = table.column(S.SCORE).to_numpy()
    identities = table.column(S.IDENTITY).to_pylist()
    uris = table.column(S.URI).to_pylist()
    figures = []
    for i in range(crops.shape[0]):  # a dozen small pictures: one PNG each
        name = identities[i] or uris[i].rsplit("/", 1)[-1]
        figures.append(
            f"<figure>{_crop_with_marks(crops[i], mapped[i], points, f'face {i}', uris[i])}"
            f"<figcaption>{H.escape(name)}</figcaption><figcaption class=muted>score {scores[i]:.3f} · "
            f"fit {errors[i].mean():.1f} px</figcaption></figure>")
    legend = (f"{len(figures)} faces from the first committed shard(s) of this run, as stored "
              f"({crops.shape[1]} px). Red dots: the detected landmarks carried into the crop by the "
              "similarity fit that made it; green rings: the template points "
              f"(margin {align.margin:g}). 'fit': mean distance between the two, crop pixels. "
              f"Median over these faces: {np.median(errors):.2f} px.")
    return H.paragraph(legend, "muted") + "<div class=grid>" + "".join(figures) + "</div>"


def _crop_with_marks(crop: np.ndarray, mapped: np.ndarray, points: np.ndarray, alt: str, title: str) -> str:
    """The stored crop as a PNG with an SVG overlay of template rings and landmark dots.

    The overlay's viewBox puts pixel centres at integer coordinates (the image spans -0.5 .. S - 0.5),
    so marks sit at their exact sub-pixel places at any display size, and the crop stays as stored.
    """
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(crop[:, :, ::-1]))
    if not ok:
        raise RuntimeError("PNG encoding of a sample crop failed")
    h, w = crop.shape[:2]
    rings = "".join(f"<circle class=t cx='{x:.2f}' cy='{y:.2f}' r='2.6'/>" for x, y in points)
    dots = "".join(f"<circle class=l cx='{x:.2f}' cy='{y:.2f}' r='1.3'/>" for x, y in mapped)
    return (f"<div class=face><img alt='{H.escape(alt)}' title='{H.escape(title)}' src='{H.data_uri(buf.tobytes())}'>"
            f"<svg viewBox='-0.5 -0.5 {w} {h}' aria-hidden=true>{rings}{dots}</svg></div>")
