"""The index folder on disk: atomic writes, refusing non-index folders, load errors naming the file and field,
checksums, recovery of interrupted swaps (the on-disk states reproduced, and a real SIGKILL), two writers."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from imat.engine import index_dir
from imat.engine.gallery_index import load_index
from imat.errors import IndexFileError

from index_vectors import small_gallery


def edit_sidecar(folder, change):
    path = folder / "index.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def edit_item_line(folder, line_no, text):
    path = folder / "items.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[line_no - 1] = text if isinstance(text, bytes) else text.encode()
    path.write_bytes(b"\n".join(lines))


@pytest.fixture()
def cli_logging():
    """The CLI points the root logger at this test's captured stderr; put the old handlers back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def leftovers(parent, keep="idx"):
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


def test_interrupted_write_leaves_the_old_index_usable(tmp_path, monkeypatch):
    import faiss

    g, _ = small_gallery(10)
    g.save(tmp_path / "idx")
    bigger, _ = small_gallery(20, seed=1)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(OSError, match="simulated"):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    old = load_index(tmp_path / "idx")
    assert old.count == 10 and old.items[0]["id"] == "i0-0"
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # the temp folder was cleaned up


def test_interrupted_swap_is_recoverable(tmp_path, monkeypatch):
    # Failing the rename of the new folder into place puts the old one back.
    g, _ = small_gallery(10)
    g.save(tmp_path / "idx")
    bigger, _ = small_gallery(20, seed=1)
    real_rename = index_dir.os.rename

    def flaky(src, dst):
        if ".new-" in str(src):  # the second rename of the swap: the old index is already aside
            raise OSError("power cut (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(index_dir.os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    assert load_index(tmp_path / "idx").count == 10
    assert leftovers(tmp_path) == []


def test_refuses_to_overwrite_a_folder_that_is_not_an_index(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    g, _ = small_gallery(5)
    with pytest.raises(IndexFileError, match="is not an imat index"):
        g.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.jpg").exists()


def test_load_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(IndexFileError, match="nothere: index folder not found"):
        load_index(tmp_path / "nothere")
    g, _ = small_gallery(5)
    g.save(tmp_path / "idx")
    (tmp_path / "idx" / "items.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(IndexFileError, match="counts disagree"):
        load_index(tmp_path / "idx")
    g.save(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text("{not json")
    with pytest.raises(IndexFileError, match=r"index.json: unreadable sidecar"):
        load_index(tmp_path / "idx")
    g.save(tmp_path / "idx2")
    (tmp_path / "idx2" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexFileError, match=r"index.faiss: 7 bytes, but index.json recorded"):
        load_index(tmp_path / "idx2")
    edit_sidecar(tmp_path / "idx2", lambda meta: meta.pop("files"))  # as written before checksums
    with pytest.raises(IndexFileError, match=r"index.faiss: not a readable FAISS index"):
        load_index(tmp_path / "idx2")
    (tmp_path / "idx2" / "index.faiss").unlink()
    with pytest.raises(IndexFileError, match=r"index.faiss: missing"):
        load_index(tmp_path / "idx2")


# ---------------------------------------------------------------- a tampered or hand-edited folder


@pytest.mark.parametrize("field,value,match", [
    ("search_params", {"efSearch": "abc"}, r"field 'search_params.efSearch' is 'abc', expected a positive integer"),
    ("search_params", "fast", r"field 'search_params' is a string"),
    ("index_type", "Bogus7", r"field 'index_type' is 'Bogus7', not a FAISS index type"),
    ("index_type", 5, r"field 'index_type' is an integer"),
    # types FAISS would allocate huge empty structures for: refused before FAISS sees them
    ("index_type", "IVF999999999999,Flat", r"field 'index_type' is 'IVF999999999999,Flat': 999999999999 inverted"),
    ("index_type", "IVF1,PQ4x30", r"field 'index_type' is 'IVF1,PQ4x30': 30-bit PQ codes"),
    ("count", "30", r"field 'count' is '30', expected a non-negative integer"),
    ("dim", 16.0, r"field 'dim' is 16.0, expected a positive integer"),
    ("dim", True, r"field 'dim' is True"),
    ("model_fingerprint", None, r"field 'model_fingerprint' is null"),
    ("skipped", "none", r"field 'skipped' is a string"),
    ("files", {"index.faiss": {"sha256": "abc", "bytes": 1}}, r"field 'files.index.faiss'"),
    ("files", {"notes.txt": {}}, r"field 'files.notes.txt' names no file"),
    ("format_version", "1", r"format_version '1' is not supported"),
])
def test_tampered_sidecar_names_the_file_and_field(tmp_path, field, value, match):
    g, _ = small_gallery(6)
    g.save(tmp_path / "idx")
    edit_sidecar(tmp_path / "idx", lambda meta: meta.__setitem__(field, value))
    with pytest.raises(IndexFileError, match=r"idx/index.json: .*" + match):
        load_index(tmp_path / "idx")


@pytest.mark.parametrize("text,match", [
    ('{"id": "a", "categories": 5}', r"items.jsonl:2: field 'categories' is 5, expected a list"),
    ('{"id": "a", "categories": ["shoe", 3]}', r"items.jsonl:2: field 'categories'"),
    ("[1, 2]", r"items.jsonl:2: is a list, expected an object"),
    ('"just text"', r"items.jsonl:2: is a string, expected an object"),
    ("{not json", r"items.jsonl:2: not valid JSON"),
    ('{"path": "/x.jpg"}', r"items.jsonl:2: field 'id' is missing"),
    ('{"id": 7}', r"items.jsonl:2: field 'id' is an integer \(7\)"),
    ('{"id": "a", "path": 3}', r"items.jsonl:2: field 'path' is an integer"),
    (b'{"id": "caf\xe9"}', r"items.jsonl:2: not UTF-8"),
])
def test_tampered_items_name_the_file_line_and_field(tmp_path, text, match):
    g, _ = small_gallery(6)
    g.save(tmp_path / "idx")
    edit_item_line(tmp_path / "idx", 2, text)
    with pytest.raises(IndexFileError, match=match):
        load_index(tmp_path / "idx")


def test_count_mismatch_names_the_three_counts(tmp_path):
    g, _ = small_gallery(6)
    g.save(tmp_path / "idx")
    edit_sidecar(tmp_path / "idx", lambda meta: meta.__setitem__("count", 7))
    with pytest.raises(IndexFileError, match=r"counts disagree \(index.faiss 6 rows, index.json 'count' 7, "
                                             r"items.jsonl 6 items\)"):
        load_index(tmp_path / "idx")


def test_cli_reports_a_tampered_index_in_one_line(tmp_path, tiny_model, photo_dir, capsys, cli_logging):
    from imat.cli.main import main

    out = tmp_path / "idx"
    assert main(["index", "--model", str(tiny_model), "--images", str(photo_dir), "--out", str(out)]) == 0
    edit_sidecar(out, lambda meta: meta.__setitem__("search_params", {"efSearch": "abc"}))
    capsys.readouterr()
    rc = main(["search", "--model", str(tiny_model), "--index", str(out), "--out", str(tmp_path / "r.jsonl"),
               str(sorted(photo_dir.iterdir())[0])])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]  # after the INFO log lines
    assert last.startswith("imat: error: ") and "index.json: field 'search_params.efSearch' is 'abc'" in last


# ---------------------------------------------------------------- checksums


def test_sidecar_records_the_checksums_of_the_files(tmp_path):
    import hashlib

    g, _ = small_gallery(6)
    g.save(tmp_path / "idx")
    files = json.loads((tmp_path / "idx" / "index.json").read_text())["files"]
    for name in ("index.faiss", "items.jsonl"):
        data = (tmp_path / "idx" / name).read_bytes()
        assert files[name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def test_a_flipped_byte_inside_the_vectors_is_refused(tmp_path):
    g, x = small_gallery(40)
    g.save(tmp_path / "idx")
    path = tmp_path / "idx" / "index.faiss"
    data = bytearray(path.read_bytes())
    data[-4 * 16 * 20 + 3] ^= 0x40  # an exponent bit of a float in the stored vectors: FAISS still reads the file
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match=r"idx/index.faiss: sha256 .* differs from .* recorded in index.json"):
        load_index(tmp_path / "idx")
    # Without the check it loads and ranks differently: what the checksum is there to catch.
    edit_sidecar(tmp_path / "idx", lambda meta: meta.pop("files"))
    scores, _ = load_index(tmp_path / "idx").search(x, 40)
    assert not np.allclose(scores, g.search(x, 40)[0])


def test_an_edited_items_file_is_refused(tmp_path):
    g, _ = small_gallery(6)
    g.save(tmp_path / "idx")
    line = (tmp_path / "idx" / "items.jsonl").read_text().splitlines()[2]
    edit_item_line(tmp_path / "idx", 3, line.replace('"i0-2"', '"i0-X"'))  # same length, still valid
    with pytest.raises(IndexFileError, match=r"idx/items.jsonl: sha256 .* recorded in index.json"):
        load_index(tmp_path / "idx")


def test_a_folder_written_before_checksums_still_loads(tmp_path, caplog):
    g, x = small_gallery(6)
    g.save(tmp_path / "idx")
    edit_sidecar(tmp_path / "idx", lambda meta: meta.pop("files"))
    with caplog.at_level(logging.DEBUG, logger="imat.engine.index_dir"):
        loaded = load_index(tmp_path / "idx")
    assert loaded.count == 6 and "files" not in loaded.meta
    assert any("files not verified" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(loaded.search(x, 3)[1], g.search(x, 3)[1])
    loaded.save(tmp_path / "idx")  # the next write adds them
    assert set(json.loads((tmp_path / "idx" / "index.json").read_text())["files"]) == {"index.faiss", "items.jsonl"}


# ---------------------------------------------------------------- interrupted swaps and concurrent writers


def _two_versions(tmp_path):
    """idx holds 10 rows; `newer` (a complete folder elsewhere) holds 20."""
    g, _ = small_gallery(10)
    g.save(tmp_path / "idx")
    bigger, _ = small_gallery(20, seed=1)
    bigger.save(tmp_path / "newer")
    return tmp_path / "idx", tmp_path / "newer"


def test_load_finishes_a_swap_interrupted_between_its_renames(tmp_path, caplog):
    idx, newer = _two_versions(tmp_path)
    # The on-disk state of a writer killed between `idx -> .idx.old-*` and `.idx.new-* -> idx`:
    os.rename(idx, tmp_path / ".idx.old-99999-aaaa")
    os.rename(newer, tmp_path / ".idx.new-99999-bbbb")
    with caplog.at_level(logging.WARNING, logger="imat.fileio"):
        assert load_index(idx).count == 20
    assert any("finished an interrupted swap" in r.getMessage() for r in caplog.records)
    assert leftovers(tmp_path) == []


def test_load_restores_the_old_index_when_the_new_one_is_incomplete(tmp_path, caplog):
    idx, newer = _two_versions(tmp_path)
    os.rename(idx, tmp_path / ".idx.old-99999-aaaa")
    os.rename(newer, tmp_path / ".idx.tmp-99999-bbbb")  # still being written when it died: not complete
    with caplog.at_level(logging.WARNING, logger="imat.fileio"):
        assert load_index(idx).count == 10
    assert any("restored" in r.getMessage() for r in caplog.records)
    assert leftovers(tmp_path) == []


def test_the_next_write_repairs_an_interrupted_swap(tmp_path):
    idx, newer = _two_versions(tmp_path)
    os.rename(idx, tmp_path / ".idx.old-99999-aaaa")  # an older imat's leftover name pattern, too
    os.rename(newer, tmp_path / ".idx.tmp-99999-bbbb")
    third, _ = small_gallery(5, seed=2)
    third.save(idx)
    assert load_index(idx).count == 5 and leftovers(tmp_path) == []


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from index_vectors import small_gallery
    bigger, _ = small_gallery(20, seed=1)
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):  # the old index is aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    bigger.save({target!r})
""")


def test_a_writer_killed_between_the_renames_is_recovered(tmp_path):
    g, _ = small_gallery(10)
    g.save(tmp_path / "idx")
    code = _KILLED_WRITER.format(tests=os.path.dirname(__file__), target=str(tmp_path / "idx"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not (tmp_path / "idx").exists()  # the crash window, for real
    assert any(n.startswith(".idx.old-") for n in leftovers(tmp_path))
    assert load_index(tmp_path / "idx").count == 20  # its swap is finished by the next load
    assert leftovers(tmp_path) == []


_HOLDER = textwrap.dedent("""
    import sys, time
    from imat.errors import IndexFileError
    from imat.fileio import dir_lock
    with dir_lock({target!r}, error=IndexFileError):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def test_a_second_writer_gets_a_clear_error_and_leaves_nothing(tmp_path):
    g, _ = small_gallery(10)
    g.save(tmp_path / "idx")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(target=str(tmp_path / "idx"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        bigger, _ = small_gallery(20, seed=1)
        with pytest.raises(IndexFileError, match=rf"another imat process is writing {tmp_path / 'idx'} "
                                                 rf"\(pid {holder.pid}\); wait for it or choose another --out"):
            bigger.save(tmp_path / "idx")
        assert leftovers(tmp_path) == [".idx.lock"]  # the holder's; no temporary of the loser
        assert load_index(tmp_path / "idx").count == 10  # readers are not blocked
    finally:
        holder.communicate("\n", timeout=60)
    assert leftovers(tmp_path) == []
    bigger.save(tmp_path / "idx")  # the lock is free again
    assert load_index(tmp_path / "idx").count == 20


def test_cli_second_writer_is_one_error_line(tmp_path, tiny_model, photo_dir, capsys, cli_logging):
    from imat.cli.main import main
    from imat.fileio import dir_lock

    out = tmp_path / "idx"
    with dir_lock(out, error=IndexFileError):  # another writer of the same --out, mid-write
        rc = main(["index", "--model", str(tiny_model), "--images", str(photo_dir), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "Traceback" not in "\n".join(err)
    assert err[-1] == (f"imat: error: another imat process is writing {out} (pid {os.getpid()}); "
                       "wait for it or choose another --out")
    assert leftovers(tmp_path) == []
