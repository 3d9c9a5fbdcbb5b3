"""A self-contained HTML gallery of search results: each query beside its top-k neighbours.

Thumbnails (~128 px, JPEG quality 70, base64-embedded) are made with the same
decoder as everything else (letterbox mode), so the file opens anywhere without
the images beside it (files are found by `records.path_of`, lossless for names that are
not UTF-8; captions show the readable names); at ~4-6 KB per thumbnail a 100-query x 10 report stays a
few MB. Garment queries and results (records with a "box") show the crop, and below it the
photo with the box drawn. Every piece of text is HTML-escaped; the file is written atomically.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import pathlib
from typing import Sequence

import numpy as np

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
figure img.parent{width:64px;height:64px;margin-top:2px}
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


def garment_thumbnails(path: str | None, box, size: int = THUMB_SIZE, cache: dict | None = None,
                       padding: float | None = None) -> tuple[str | None, str | None]:
    """(crop, parent photo with the box drawn) as data: URIs; None where the photo cannot be read."""
    if not path or box is None:
        return None, None
    key = ("garment", path, tuple(box))
    if cache is not None and key in cache:
        return cache[key]
    from PIL import Image, ImageDraw

    from imat.data_tools.garments import DEFAULT_PADDING, decode_crop, photo_size
    from imat.data_tools.images import decode_image

    uris: tuple[str | None, str | None] = (None, None)
    try:
        crop = decode_crop(path, box, size, "letterbox", DEFAULT_PADDING if padding is None else padding)
        width, height = photo_size(path)
        parent = Image.fromarray(decode_image(path, size, "letterbox"))
        scale = min(size / width, size / height)   # letterbox geometry: scaled, then centred
        ox, oy = (size - round(width * scale)) // 2, (size - round(height * scale)) // 2
        x0, y0, x1, y1 = (float(v) for v in box)
        ImageDraw.Draw(parent).rectangle([ox + x0 * scale, oy + y0 * scale, ox + x1 * scale - 1, oy + y1 * scale - 1],
                                         outline=(255, 40, 40), width=2)
        uris = (_jpeg_uri(crop), _jpeg_uri(np.asarray(parent)))
    except Exception as e:  # noqa: BLE001 - a missing thumbnail must not stop the report
        logger.debug("no garment thumbnails for %s %s: %s", path, box, e)
    if cache is not None:
        cache[key] = uris
    return uris


def _jpeg_uri(array) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _garment_figure(path, box, caption: str, cache: dict, thumbs: bool) -> str:
    """A garment: its crop and, below, its photo with the box drawn."""
    crop, parent = garment_thumbnails(path, box, cache=cache) if thumbs else (None, None)
    img = f'<img src="{crop}" alt="">' if crop else '<div class="noimg">no image</div>'
    if parent:
        img += f'<img class="parent" src="{parent}" alt="">'
    return f"<figure>{img}<figcaption>{caption}</figcaption></figure>"


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
        if rec.get("category_filter"):
            parts.append(f'<div class="labels">searched within: {esc(", ".join(map(str, rec["category_filter"])))}'
                         '</div>')
        parts.append('<div class="row"><div class="query">')
        if rec.get("box") is not None:   # a garment query: its crop and its box on the photo
            parts.append(_garment_figure(path_of(rec), rec["box"], "query", cache, thumbs) + "</div>")
        else:
            q_uri = thumbnail_data_uri(path_of(rec, "query"), cache=cache) if thumbs else None
            parts.append(_figure(q_uri, "query") + "</div>")
        for r in rec.get("results", []):
            caption = f"#{int(r['rank'])} {esc(str(r['id']))}<br>score {float(r['score']):.3f}"
            if r.get("box") is not None:
                if r.get("category"):
                    caption += f"<br>{esc(str(r['category']))}"
                parts.append(_garment_figure(path_of(r), r["box"], caption, cache, thumbs))
                continue
            uri = thumbnail_data_uri(path_of(r), cache=cache) if thumbs else None
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
