"""What a request may send: a body size limit (ASGI middleware), item ids and category names,
and decoding uploaded image bytes through the one decoder (imat.data_tools.images, with its
decompression-bomb guard). An upload is only ever bytes in memory: no client-sent name is
opened as a path."""

from __future__ import annotations

import json
import re

import numpy as np

from imat.data_tools.images import decode_image

MAX_ID_CHARS = 256
MAX_CATEGORIES = 64
_BAD_ID = re.compile(r"[\x00-\x1f\x7f]")


class BadRequest(Exception):
    """A request the client must fix: answered 4xx with a JSON error."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


def check_item_id(item_id: str) -> str:
    item_id = (item_id or "").strip()
    if not item_id:
        raise BadRequest("form field 'id' is empty; give the item an id")
    if len(item_id) > MAX_ID_CHARS or _BAD_ID.search(item_id):
        raise BadRequest(f"form field 'id' must be 1..{MAX_ID_CHARS} printable characters")
    return item_id


def parse_categories(texts, known=frozenset()) -> list[str]:
    """Comma-separated category names (one or more form values) -> a list without blanks or repeats.

    Several iMaterialist names contain commas ("bag, wallet"): pieces that together spell a
    `known` name are kept as that one name (longest match first).
    """
    if isinstance(texts, str) or texts is None:
        texts = [texts or ""]
    names: list[str] = []
    for text in texts:
        pieces = [c.strip() for c in text.split(",")]
        i = 0
        while i < len(pieces):
            for j in range(len(pieces), i, -1):
                joined = ", ".join(pieces[i:j])
                if j == i + 1 or joined in known:
                    names.append(joined)
                    i = j
                    break
    names = list(dict.fromkeys(c for c in names if c))
    if len(names) > MAX_CATEGORIES or any(len(c) > MAX_ID_CHARS or _BAD_ID.search(c) for c in names):
        raise BadRequest(f"form field 'categories': at most {MAX_CATEGORIES} names of 1..{MAX_ID_CHARS} printable "
                         "characters, separated by commas")
    return names


def decode_upload(data: bytes, name: str, size: int, mode: str, max_pixels: int) -> np.ndarray:
    """uint8[size,size,3] of an uploaded image; ImageDecodeError (an ImatError) naming the upload."""
    from imat.errors import ImageDecodeError

    try:
        return decode_image(data, size, mode, max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise ImageDecodeError(name, e.reason) from None


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 (by Content-Length at once, else
    when the stream passes the limit) before the app buffers it."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await self._reply(send, 400, "Content-Length is not a number")
            if too_big:
                return await self._reply(send, 413, self._message())
        seen = 0
        state = {"over": False, "started": False, "replied": False}

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    state["over"] = True
                    raise _TooLarge()
            return message

        async def guarded_send(message):
            if state["over"]:
                # Whatever the app answers to the aborted body (a 400 or 500), the client gets the 413.
                if message["type"] == "http.response.start" and not state["started"] and not state["replied"]:
                    state["replied"] = True
                    await self._reply(send, 413, self._message())
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["replied"] and not state["started"]:
            await self._reply(send, 413, self._message())

    def _message(self) -> str:
        return f"request body over the upload limit of {self.max_bytes} bytes (--max-upload-mb)"

    @staticmethod
    async def _reply(send, status: int, message: str) -> None:
        body = json.dumps({"error": {"status": status, "message": message}}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
