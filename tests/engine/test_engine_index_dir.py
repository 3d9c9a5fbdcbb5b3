"""The index folder on disk: atomic writes, refusing non-index folders, load errors naming the file."""

from __future__ import annotations

import pytest

from imat.engine import index_dir
from imat.engine.gallery_index import load_index
from imat.errors import IndexFileError

from index_vectors import small_gallery


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
        if ".tmp-" in str(src):
            raise OSError("power cut (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(index_dir.os, "rename", flaky)
    with pytest.raises(OSError, match="simulated"):
        bigger.save(tmp_path / "idx")
    monkeypatch.undo()
    assert load_index(tmp_path / "idx").count == 10


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
    with pytest.raises(IndexFileError, match=r"index.faiss: not a readable FAISS index"):
        load_index(tmp_path / "idx2")
    (tmp_path / "idx2" / "index.faiss").unlink()
    with pytest.raises(IndexFileError, match=r"index.faiss: missing"):
        load_index(tmp_path / "idx2")
