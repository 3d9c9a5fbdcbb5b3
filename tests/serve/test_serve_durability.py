"""Nothing acknowledged is lost: adds and deletes that got a 2xx survive kill -9 of the server
(journal replay), are folded into the index folder by snapshots, and a torn journal tail is dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from conftest import free_port, photo_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _start(serve_env, index_dir, port, log):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "imat.cli.main", "-q", "serve", "--model", str(serve_env["model"]),
           "--index", str(index_dir), "--port", str(port), "--snapshot-every", "1000", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("server not ready within 60 s")


def test_acknowledged_writes_survive_kill_9(serve_env, index_copy, tmp_path):
    original = [json.loads(x)["id"] for x in (index_copy / "items.jsonl").read_text().splitlines()]
    log = open(tmp_path / "server.log", "wb")
    proc, url = _start(serve_env, index_copy, free_port(), log)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i, photo in enumerate(serve_env["queries"][:3]):
                r = c.post("/v1/items", files=[("image", ("p.jpg", photo_bytes(photo), "image/jpeg"))],
                           data={"id": f"added-{i}", "categories": "shoe"})
                assert r.status_code == 201, r.text
            assert c.delete(f"/v1/items/{original[0]}").status_code == 200
            assert c.delete("/v1/items/added-2").status_code == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # nothing was folded yet: the index folder is as it was, the journal holds the 5 writes
    assert len((index_copy / "items.jsonl").read_text().splitlines()) == 24
    journal = (index_copy.parent / "index.serve" / "journal.jsonl").read_text().splitlines()
    assert [json.loads(x)["op"] for x in journal] == ["upsert"] * 3 + ["delete"] * 2

    proc, url = _start(serve_env, index_copy, free_port(), log)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/v1/items/added-0").json()["item"]["categories"] == ["shoe"]
            assert c.get("/v1/items/added-1").status_code == 200
            assert c.get("/v1/items/added-2").status_code == 404
            assert c.get(f"/v1/items/{original[0]}").status_code == 404
            assert c.get("/v1/items/added-0/thumbnail").status_code == 200
            r = c.post("/v1/search", files=[("image", ("q.jpg", photo_bytes(serve_env["queries"][1]), "image/jpeg"))],
                       data={"k": "1"})
            assert r.json()["queries"][0]["results"][0]["id"] == "added-1"
            assert c.get("/readyz").json()["items"] == 24 - 1 + 2
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: the final snapshot folds the journal
        proc.wait(timeout=30)
        log.close()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to exit as signalled
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "server.log").read_text()
    assert "Traceback" not in (tmp_path / "server.log").read_text()
    # the replay was folded into the index folder at start: it loads without the server
    from imat.engine.gallery_index import load_index

    g = load_index(index_copy)
    ids = [it["id"] for it in g.items]
    assert g.count == 25 and "added-0" in ids and "added-1" in ids and original[0] not in ids
    assert g.meta["journal_seq"] == 5
    assert (index_copy.parent / "index.serve" / "journal.jsonl").read_text() == ""


def test_snapshots_fold_the_journal_while_serving(serve_env, index_copy, start_server):
    from imat.engine.gallery_index import load_index

    s = start_server(index_copy, snapshot_every=2)
    c = s.client
    for i in range(4):
        photo = serve_env["queries"][i]
        assert c.post("/v1/items", files=[("image", ("p.jpg", photo_bytes(photo), "image/jpeg"))],
                      data={"id": f"n{i}"}).status_code == 201
    deadline = time.monotonic() + 20
    while s.state.index.journal.pending and time.monotonic() < deadline:  # snapshots run in the background
        time.sleep(0.05)
    assert s.state.index.journal.pending == 0
    g = load_index(index_copy)
    assert g.count == 28 and g.meta["journal_seq"] == 4
    assert "imat_snapshots_total" in c.get("/metrics").text
    # a write after a snapshot still lands (the sidecar the server expects was updated by its own save)
    assert c.delete("/v1/items/n0").status_code == 200
    s.close()
    assert load_index(index_copy).count == 27


def test_second_server_on_the_same_index_is_refused(serve_env, index_copy, start_server):
    from imat.errors import IndexFileError
    from imat.serve import ServeConfig, create_app

    start_server(index_copy)
    with pytest.raises(IndexFileError, match="another imat process"):
        create_app(ServeConfig(model=serve_env["model"], index=index_copy))


def test_journal_torn_tail_is_dropped_and_bad_lines_are_errors(tmp_path):
    from imat.errors import IndexFileError
    from imat.serve.journal import Journal, decode_vector, encode_vector, read_journal

    v = np.arange(4, dtype=np.float32)
    path = tmp_path / "journal.jsonl"
    j = Journal(path)
    j.append({"op": "upsert", "id": "a", "categories": [], "vector": encode_vector(v)})
    j.append({"op": "delete", "id": "a"})
    j.close()
    with open(path, "ab") as f:
        f.write(b'{"seq": 3, "op": "dele')  # the process died mid-line: never acknowledged
    entries = read_journal(path)
    assert [e["seq"] for e in entries] == [1, 2]
    np.testing.assert_array_equal(decode_vector(entries[0]["vector"], 4, "x"), v)
    j = Journal(path, folded_seq=0)
    assert j.append({"op": "delete", "id": "b"}) == 3
    j.close()
    assert [e["seq"] for e in read_journal(path)] == [1, 2, 3]
    # a folded journal continues after the folder's journal_seq
    j = Journal(tmp_path / "empty.jsonl", folded_seq=41)
    assert j.append({"op": "delete", "id": "c"}) == 42
    j.close()
    path.write_text('{"seq": 1, "op": "delete", "id": "a"}\nnot json\n{"seq": 3, "op": "delete", "id": "b"}\n')
    with pytest.raises(IndexFileError, match=r"journal.jsonl:2"):
        read_journal(path)
