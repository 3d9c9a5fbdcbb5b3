"""A self-contained HTML gallery of search results: each query beside its top-k neighbours.

Thumbnails (~128 px, JPEG quality 70, base64-embedded) are made with the same
decoder as everything else (letterbox mode), so the file opens anywhere without
the images beside it (files are found by `records.path_of`, lossless for names that are
not UTF-8; captions show the readable names); at ~4-6 KB per thumbnail a 100-query x 10 report stays a
few MB. Every piece of text is HTML-escaped; the file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import pathlib
from typing import Sequence

from imat.engine.records import path_of
from imat.fileio import atomic_write_text

logger = logging.getLogger(__name__)

THUMB_SIZE = 128
JPEG_QUALITY = 70

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
.q{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em;margin-bottom:1.2em}
.row{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
figure{margin:0;width:136px;font-size:11px;text-align:center;word-break:break-all}
figure img,.noimg{width:128px;height:128px;object-fit:contain;background:#eee;display:block;margin:auto}
.noimg{line-height:128px;color:#999}
.query figure img{outline:3px solid #3572b0}
.err{color:#b00020;font-weight:bold}
.labels{font-size:12px;color:#555;margin:.3em 0}
"""


def thumbnail_data_uri(path: str | None, size: int = THUMB_SIZE, cache: dict | None = None) -> str | None:
    """data: URI of a JPEG thumbnail of `path`, or None when it cannot be read."""
    if not path:
        return None
    if cache is not None and path in cache:
        return cache[path]
    from PIL import Image

    from imat.data_tools.images import decode_image

    uri = None
    try:
        array = decode_image(path, size, "letterbox")
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="JPEG", quality=JPEG_QUALITY)
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception as e:  # noqa: BLE001 - a missing thumbnail must not stop the report
        logger.debug("no thumbnail for %s: %s", path, e)
    if cache is not None:
        cache[path] = uri
    return uri


def _figure(uri: str | None, caption: str) -> str:
    img = f'<img src="{uri}" alt="">' if uri else '<div class="noimg">no image</div>'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


def render_html(records: Sequence[dict], *, title: str = "imat search results", thumbs: bool = True) -> str:
    cache: dict = {}
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1><p>{len(records)} queries</p>",
    ]
    for n, rec in enumerate(records, 1):
        query = str(rec.get("query", ""))  # the readable name; path_of gives the file itself
        parts.append(f'<div class="q"><h3>#{n}: {esc(query)}</h3>')
        if rec.get("error"):
            parts.append(f'<p class="err">error: {esc(str(rec["error"]))}</p></div>')
            continue
        labels = ", ".join(
            f"{esc(str(p['name']))} {float(p['score']):.2f} ({esc(str(p['source']))})"
            for p in rec.get("predicted_categories", [])
        )
        if labels:
            parts.append(f'<div class="labels">predicted: {labels}</div>')
        parts.append('<div class="row"><div class="query">')
        q_uri = thumbnail_data_uri(path_of(rec, "query"), cache=cache) if thumbs else None
        parts.append(_figure(q_uri, "query") + "</div>")
        for r in rec.get("results", []):
            uri = thumbnail_data_uri(path_of(r), cache=cache) if thumbs else None
            caption = f"#{int(r['rank'])} {esc(str(r['id']))}<br>score {float(r['score']):.3f}"
            parts.append(_figure(uri, caption))
        parts.append("</div></div>")
    parts.append("</body></html>\n")
    return "".join(parts)


def write_html_report(records: Sequence[dict], out_path, *, title: str = "imat search results",
                      thumbs: bool = True) -> pathlib.Path:
    """Render and atomically write the report; returns its path."""
    out_path = pathlib.Path(out_path)
    text = render_html(records, title=title, thumbs=thumbs)
    atomic_write_text(out_path, text)
    logger.info("wrote HTML report %s (%d queries, %.1f KB)", out_path, len(records), len(text) / 1024)
    return out_path
