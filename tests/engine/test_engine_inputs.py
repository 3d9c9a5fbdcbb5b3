"""Engine inputs: the model's resize mode, names that are not UTF-8, and files that are not regular files."""

from __future__ import annotations

import base64
import json
import os
import threading

import numpy as np
import pytest

from imat.data_tools.images import decode_image
from imat.engine import Engine
from imat.engine.records import path_of
from imat.engine.report import write_html_report
from imat.errors import ConfigError

LATIN1_NAME = b"caf\xe9.jpg"  # Latin-1 bytes: not valid UTF-8


@pytest.fixture()
def letterbox_model(tmp_path, make_model):
    return make_model(tmp_path / "letterbox.onnx", metadata={"resize_mode": "letterbox"})


def test_the_model_resize_mode_decides_the_pixels(letterbox_model, photos_factory, tmp_path):
    # 48x40 photos: letterbox pads, stretch does not, so the two give different embeddings.
    paths = photos_factory(tmp_path / "p", 3)
    engine = Engine(letterbox_model, decode_threads=1, batch_size=2, progress=False)
    assert engine.metadata.resize_mode == "letterbox"
    got = engine.embed(paths)
    letterboxed = engine.embed([decode_image(p, 32, "letterbox") for p in paths])
    stretched = engine.embed([decode_image(p, 32, "stretch") for p in paths])
    np.testing.assert_array_equal(got, letterboxed)
    assert not np.allclose(got, stretched, atol=1e-3)


def test_a_different_resize_mode_is_refused(letterbox_model, photos_factory, tmp_path):
    paths = photos_factory(tmp_path / "p", 2)
    with pytest.raises(ConfigError, match=r"resize mode 'stretch' differs from the model's resize_mode 'letterbox'"
                                          r" \(.*letterbox.onnx\)"):
        Engine(letterbox_model, resize_mode="stretch", progress=False)
    engine = Engine(letterbox_model, resize_mode="letterbox", decode_threads=1, progress=False)  # same: fine
    with pytest.raises(ConfigError, match="'center_crop' differs from the model's resize_mode 'letterbox'"):
        engine.build_index(paths, tmp_path / "idx", resize_mode="center_crop")
    assert not (tmp_path / "idx").exists()
    assert engine.build_index(paths, tmp_path / "idx", resize_mode=None).meta["resize_mode"] == "letterbox"
    with pytest.raises(ConfigError, match="resize mode 'squash' is not one of"):
        Engine(letterbox_model, resize_mode="squash", progress=False)


@pytest.fixture()
def latin1_folder(tmp_path, photos_factory):
    folder = tmp_path / "latin"
    photos_factory(folder, 3)
    src = os.path.join(os.fsencode(folder), b"img_000.jpg")
    target = os.path.join(os.fsencode(folder), LATIN1_NAME)
    os.rename(src, target)
    return folder, os.fsdecode(target)


def test_non_utf8_names_are_indexed_searched_and_reported(engine, latin1_folder, tmp_path):
    from imat.engine.gallery import plain_folder_items

    folder, latin = latin1_folder
    items = plain_folder_items(folder).items
    assert latin in [str(p) for p in items]
    gallery = engine.build_index(items, tmp_path / "idx")
    lines = (tmp_path / "idx" / "items.jsonl").read_bytes().decode("utf-8").splitlines()  # strict UTF-8
    rec = next(json.loads(x) for x in lines if "path_bytes_b64" in json.loads(x))
    assert rec["path"].endswith("caf\\xe9.jpg") and rec["id"] == "caf\\xe9"  # readable, escaped
    assert base64.b64decode(rec["path_bytes_b64"]) == os.fsencode(latin)  # lossless
    assert sum("path_bytes_b64" in json.loads(x) for x in lines) == 1  # only where needed

    loaded = engine.load_index(tmp_path / "idx")
    assert sorted(path_of(it) for it in loaded.items) == sorted(path_of(it) for it in gallery.items)
    records = engine.search([latin], k=3, index=loaded)
    (record,) = records
    assert "error" not in record and record["query"].endswith("caf\\xe9.jpg")
    assert path_of(record, "query") == latin
    top = record["results"][0]
    assert path_of(top) == latin and os.path.isfile(path_of(top)) and top["score"] > 0.999
    json.dumps(records, ensure_ascii=False).encode("utf-8")  # no lone surrogates anywhere
    html = write_html_report(records, tmp_path / "r.html").read_text(encoding="utf-8")
    assert html.count("data:image/jpeg;base64,") == 1 + len(record["results"])  # thumbnails found via lossless path


def test_fifo_query_is_an_error_record_not_a_hang(engine, photo_dir, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    gallery = engine.build_index(sorted(photo_dir.glob("*.jpg"))[:4], tmp_path / "idx")
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(r=engine.search([fifo], k=2, index=gallery)), daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # unblock the reader so the test process can exit, then fail
        fd = os.open(fifo, os.O_WRONLY)
        os.close(fd)
        pytest.fail("searching a FIFO hung")
    (record,) = box["r"]
    assert record["query"] == str(fifo) and "not a regular file" in record["error"] and "FIFO" in record["error"]
