"""HTML pieces of the run reports: the page, its CSS, sections that fail alone, cards, inline PNGs, numbers."""
from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

CSS = """
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


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes | str | None, alt: str) -> str:
    """An inline PNG, or the message a drawing function returned instead of one."""
    if isinstance(png, str):
        return paragraph(png, "muted")
    if not png:
        return paragraph(f"No {alt}.", "muted")
    return f"<img alt='{escape(alt)}' src='{data_uri(png)}'>"


def section(render: Callable[[], str]) -> str:
    """Render one section; a failure becomes a visible note instead of an exception."""
    try:
        return render()
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the page
        log.warning("report section failed: %s: %s", type(exc).__name__, exc)
        return paragraph(escape(f"This section could not be drawn: {type(exc).__name__}: {exc}"), "fail")


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def header(title: str, run_id: str, cards: Sequence[tuple[str, str]]) -> str:
    """The page's title, its run id and a row of (label, value) cards."""
    card_html = "".join(f"<div class=card><div class=v>{escape(v)}</div><div class=k>{escape(k)}</div></div>"
                        for k, v in cards)
    return f"<h1>{escape(title)}</h1><div class=muted>{escape(run_id)}</div><div class=cards>{card_html}</div>"


def paragraph(text: str, cls: str = "") -> str:
    """A paragraph of text that is already HTML (callers escape what they interpolate)."""
    return f"<p class={cls}>{text}</p>" if cls else f"<p>{text}</p>"


def escape(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_int(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def fmt_float(value, digits: int | None, unit: str = "") -> str:
    if value is None:
        return "–"
    return (f"{float(value):.{digits}f}" if digits is not None else f"{float(value):g}") + unit


def fmt_seconds(value) -> str:
    if value is None:
        return "–"
    s = float(value)
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {s % 60:.0f} s"


def now() -> str:
    return _dt.datetime.fromtimestamp(time.time(), _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
