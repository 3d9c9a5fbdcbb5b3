"""How a file name travels in the engine's JSON records (items.jsonl, search results JSONL).

On POSIX a file name is bytes; Python gives names that are not valid UTF-8 (e.g. Latin-1
``caf\\xe9.jpg``) as ``str`` with lone surrogates (``os.fsdecode``), which JSON written as
UTF-8 cannot carry. So a record stores, for a path field ``path`` (or ``query``):

- ``"path"``: always, a readable string: the name, with any byte that is not UTF-8 written
  as ``\\xNN`` (``errors="backslashreplace"``); for a valid UTF-8 name this is the name itself;
- ``"path_bytes_b64"``: only when the name is not valid UTF-8: the exact bytes, base64.

Readers use ``path_of(record)``, which prefers the lossless bytes, so such files are found
again; records without the extra field (every index written before) read as before. The
engine builds its item and result records with ``path_fields``, so they are JSON-safe;
``jsonl_text`` is the one JSON Lines serialiser for them (UTF-8, one object a line).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sys
from typing import Any, Iterable, Mapping

BYTES_SUFFIX = "_bytes_b64"


def display_name(name: str) -> str:
    """`name` as valid Unicode: bytes that are not UTF-8 become `\\xNN` (readable, not lossless)."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(name).decode("utf-8", errors="backslashreplace")
    except UnicodeEncodeError:  # not from the file system (os.fsdecode): escape the code points
        return name.encode("utf-8", errors="backslashreplace").decode("utf-8")


def path_fields(path, key: str = "path") -> dict[str, str]:
    """{key: display name} plus {key + "_bytes_b64": the exact bytes} when the name is not UTF-8."""
    name = os.fspath(path)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    shown = display_name(name)
    if shown == name:
        return {key: name}
    try:
        exact = os.fsencode(name)
    except UnicodeEncodeError:  # a surrogate that no file name decodes to: keep the readable form only
        return {key: shown}
    return {key: shown, key + BYTES_SUFFIX: base64.b64encode(exact).decode("ascii")}


def path_of(record: Mapping[str, Any], key: str = "path") -> str | None:
    """The exact path of a record's `key` field (lossless when the record carries the bytes)."""
    encoded = record.get(key + BYTES_SUFFIX)
    if isinstance(encoded, str):
        try:
            return os.fsdecode(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            pass  # a hand-edited field: fall back to the readable name
    value = record.get(key)
    return value if isinstance(value, str) else None


def jsonl_text(records: Iterable[Mapping]) -> str:
    """Records as JSON Lines text (non-ASCII kept readable), safe to write as strict UTF-8.

    A lone surrogate left in some other field (a label read from a non-UTF-8 source) is written
    as a `\\udcXX` JSON escape for that line instead of failing the whole file.
    """
    lines = []
    for record in records:
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            line = json.dumps(record, ensure_ascii=True)
        lines.append(line + "\n")
    return "".join(lines)


def is_garment_crop(item: Any) -> bool:
    """`item` is an `imat.data_tools.garments.GarmentCrop`, without importing that module: a crop can exist
    only once its module is imported, so commands over plain photos never pay for the garment tools."""
    garments = sys.modules.get("imat.data_tools.garments")
    return garments is not None and isinstance(item, garments.GarmentCrop)
