"""report.html of an audit: counts per finding and, for each, its worst examples as thumbnails.

A label suspect is shown beside the most typical faces of its identity and of the identity it looks
like; a duplicate pair side by side; a split identity as faces of its two groups' ends; the lowest-quality
faces with their parts. The thumbnails are the stored aligned crops (already JPEG), inlined as data URIs,
so the page is one self-contained file. Every face links to its uri.
"""
from __future__ import annotations

import base64
import html

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import schemas as S
from workers import dataset, storage

A = S.audit
TYPICAL = 3     # faces shown of an identity beside a suspect


def _crops(root: str, image_ids: list[str], storage_options: dict | None) -> dict[tuple[str, int], bytes]:
    """Stored crops of the named images' faces: (image_id, face_index) -> JPEG bytes."""
    if not image_ids:
        return {}
    got = dataset.read_table(root, S.FACES, storage_options, columns=[S.IMAGE_ID, S.FACE_INDEX, S.CROP],
                             filter=pc.field(S.IMAGE_ID).isin(sorted(set(image_ids))))
    return {(i, int(f)): c for i, f, c in zip(got.column(S.IMAGE_ID).to_pylist(),
                                              got.column(S.FACE_INDEX).to_pylist(), got.column(S.CROP).to_pylist())}


def _face(crops: dict, image_id: str, face_index: int, uri: str, caption: str) -> str:
    data = crops.get((image_id, int(face_index)))
    img = (f'<img src="data:image/jpeg;base64,{base64.b64encode(data).decode()}" width="96" height="96">'
           if data else '<div class="missing">no crop</div>')
    return (f'<figure><a href="{html.escape(uri)}">{img}</a><figcaption>{html.escape(caption)}'
            f'</figcaption></figure>')


def _worst(table: pa.Table, n: int, ascending: bool = False) -> list[dict]:
    flagged = table.filter(table.column(A.FLAGGED))
    order = "ascending" if ascending else "descending"
    return flagged.sort_by([(A.SCORE_, order)]).slice(0, n).to_pylist()


def _typical(labels: pa.Table, identity: str, n: int) -> list[dict]:
    mine = labels.filter(pc.equal(labels.column(S.IDENTITY), identity))
    return mine.sort_by([(A.OWN_COSINE, "descending")]).slice(0, n).to_pylist()


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def build_report(summary: dict, tables: dict[str, pa.Table], crops_of, examples: int) -> str:
    """The page's HTML. ``crops_of(image_ids) -> {(image_id, face_index): jpeg}`` reads thumbnails."""
    sections, wanted = [], {}
    labels = tables.get(A.AUDIT_LABELS)
    plan = []
    if labels is not None:
        for row in _worst(labels, examples):
            own = _typical(labels, row[S.IDENTITY], TYPICAL + 1)
            own = [r for r in own if r[S.IMAGE_ID] != row[S.IMAGE_ID]][:TYPICAL]
            other = _typical(labels, row[A.OTHER_IDENTITY], TYPICAL) if row[A.OTHER_IDENTITY] else []
            plan.append(("label", row, own, other))
    dups = tables.get(A.AUDIT_DUPLICATES)
    dup_rows = _worst(dups, examples) if dups is not None else []
    quality = tables.get(A.AUDIT_QUALITY)
    low = quality.sort_by([(A.SCORE_, "ascending")]).slice(0, examples).to_pylist() if quality is not None else []
    for _, row, own, other in plan:
        for r in (row, *own, *other):
            wanted[r[S.IMAGE_ID]] = True
    for r in dup_rows:
        wanted[r[S.IMAGE_ID + "_a"]] = wanted[r[S.IMAGE_ID + "_b"]] = True
    for r in low:
        wanted[r[S.IMAGE_ID]] = True
    crops = crops_of(list(wanted))

    counts = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in summary["flagged"].items())
    kinds = "".join(f"<tr><td>duplicates: {html.escape(k)}</td><td>{v}</td></tr>"
                    for k, v in summary.get("duplicates_by_kind", {}).items())
    sections.append(f"<h2>Findings</h2><table><tr><th>table</th><th>flagged</th></tr>{counts}{kinds}</table>")
    if plan:
        rows = []
        for _, row, own, other in plan:
            cells = [_face(crops, row[S.IMAGE_ID], row[S.FACE_INDEX], row[S.URI],
                           f"{row[S.IDENTITY]} / {_name(row[S.URI])}: own {row[A.OWN_COSINE]:.2f}, "
                           f"{row[A.OTHER_IDENTITY]} {row[A.OTHER_COSINE]:.2f}")]
            cells.append('<span class="sep">typical ' + html.escape(row[S.IDENTITY]) + "</span>")
            cells += [_face(crops, r[S.IMAGE_ID], r[S.FACE_INDEX], r[S.URI], _name(r[S.URI])) for r in own]
            cells.append('<span class="sep">typical ' + html.escape(str(row[A.OTHER_IDENTITY])) + "</span>")
            cells += [_face(crops, r[S.IMAGE_ID], r[S.FACE_INDEX], r[S.URI], _name(r[S.URI])) for r in other]
            rows.append(f'<div class="row">{"".join(cells)}</div>')
        sections.append("<h2>Label suspects (worst first)</h2>" + "".join(rows))
    if dup_rows:
        rows = [f'<div class="row">'
                + _face(crops, r[S.IMAGE_ID + "_a"], r[S.FACE_INDEX + "_a"], r[S.URI + "_a"],
                        f"{r[S.IDENTITY + '_a']} / {_name(r[S.URI + '_a'])}")
                + _face(crops, r[S.IMAGE_ID + "_b"], r[S.FACE_INDEX + "_b"], r[S.URI + "_b"],
                        f"{r[S.IDENTITY + '_b']} / {_name(r[S.URI + '_b'])}")
                + f'<span class="sep">{html.escape(r[A.KIND])}: cosine {r[A.COSINE]:.3f}, '
                  f'pixels {r[A.PIXEL_SIMILARITY]:.3f}</span></div>' for r in dup_rows]
        sections.append("<h2>Near-duplicates (most certain first)</h2>" + "".join(rows))
    idents = tables.get(A.AUDIT_IDENTITIES)
    if idents is not None:
        split = _worst(idents, examples)
        if split:
            items = "".join(f"<tr><td>{html.escape(r[S.IDENTITY])}</td><td>{r[A.FACES_]}</td>"
                            f"<td>{r[A.GROUP_SIZES]}</td><td>{r[A.SPLIT_COSINE]:.2f}</td></tr>" for r in split)
            sections.append("<h2>Identities that look like two people</h2><table><tr><th>identity</th>"
                            f"<th>faces</th><th>groups</th><th>cosine of the groups</th></tr>{items}</table>")
    if low:
        parts = [f"q_{p}" for p in ("size", "detection", "sharpness", "pose")]
        cells = [_face(crops, r[S.IMAGE_ID], r[S.FACE_INDEX], r[S.URI],
                       f"{r[A.SCORE_]:.2f} (" + ", ".join(f"{p[2:]} {r[p]:.2f}" for p in parts) + ")")
                 for r in low]
        sections.append(f'<h2>Lowest quality</h2><div class="row">{"".join(cells)}</div>')
    style = ("body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:4px;width:110px;"
             "vertical-align:top}figcaption{font-size:10px;word-wrap:break-word}.row{margin:8px 0;"
             "border-bottom:1px solid #ddd}.sep{display:inline-block;width:90px;font-size:11px;color:#555;"
             "vertical-align:top;margin-top:40px}td,th{padding:2px 10px;text-align:left}")
    head = (f"<h1>facemill audit</h1><p>{html.escape(summary['root'])}: {summary['faces']} faces, "
            f"{summary['identities']} identities; run {html.escape(summary['run_id'])}</p>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>facemill audit</title><style>{style}" \
           f"</style></head><body>{head}{''.join(sections)}</body></html>"


def write_report(cfg, summary: dict, tables: dict[str, pa.Table], storage_options: dict | None) -> str:
    """Write ``<output>/report.html``; returns its URI."""
    from workers.audit.store import REPORT

    page = build_report(summary, tables, lambda ids: _crops(cfg.root, ids, storage_options), cfg.report_examples)
    uri = storage.join(cfg.output, REPORT)
    storage.put_atomic(uri, page.encode(), storage_options)
    return uri
