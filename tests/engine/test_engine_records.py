"""records: file names in JSON records, readable and lossless (names that are not UTF-8)."""

from __future__ import annotations

import json
import os

from imat.engine.records import display_name, jsonl_text, path_fields, path_of


def test_utf8_names_are_stored_as_they_are():
    assert path_fields("/data/é/小.jpg") == {"path": "/data/é/小.jpg"}
    assert path_of({"path": "a.jpg"}) == "a.jpg"  # records written before the bytes field existed
    assert path_of({"path": None}) is None


def test_non_utf8_names_round_trip_through_json():
    raw = b"/data/caf\xe9/\xff\xfe.jpg"
    name = os.fsdecode(raw)
    fields = path_fields(name, "query")
    assert fields["query"] == "/data/caf\\xe9/\\xff\\xfe.jpg" == display_name(name)
    assert path_fields(raw, "query") == fields  # bytes paths too
    back = json.loads(jsonl_text([fields]).encode("utf-8").decode("utf-8"))
    assert os.fsencode(path_of(back, "query")) == raw


def test_a_tampered_bytes_field_falls_back_to_the_readable_name():
    assert path_of({"path": "x.jpg", "path_bytes_b64": "not base64!"}) == "x.jpg"


def test_jsonl_never_fails_on_a_stray_surrogate():
    text = jsonl_text([{"id": "a", "categories": ["bad\udce9"]}, {"id": "é"}])
    text.encode("utf-8")  # strict
    first, second = (json.loads(x) for x in text.splitlines())
    assert first["categories"] == ["bad\udce9"] and second == {"id": "é"}
