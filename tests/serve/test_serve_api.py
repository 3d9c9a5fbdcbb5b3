"""Every endpoint of `imat serve` and its error cases, against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from conftest import photo_bytes


def _files(*paths_or_bytes, field="image"):
    out = []
    for i, p in enumerate(paths_or_bytes):
        data = p if isinstance(p, bytes) else photo_bytes(p)
        out.append((field, (f"q{i}.jpg", data, "image/jpeg")))
    return out


def _error(r, status):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["status"] == status and body["error"]["message"]
    return body["error"]["message"]


def test_search_records_equal_engine_search(serve_env, index_copy, start_server):
    from imat.engine import Engine

    s = start_server(index_copy)
    queries = serve_env["queries"][:3]
    r = s.client.post("/v1/search", files=_files(*queries), data={"k": "5"})
    assert r.status_code == 200, r.text
    got = r.json()["queries"]
    engine = Engine(serve_env["model"], decode_threads=1, batch_size=8, progress=False)
    want = engine.search(queries, k=5, index=index_copy)
    assert [q["query"] for q in got] == ["q0.jpg", "q1.jpg", "q2.jpg"]
    for g, w in zip(got, want):
        assert set(g) == set(w) == {"query", "results", "predicted_categories"}
        assert [x["id"] for x in g["results"]] == [x["id"] for x in w["results"]]
        assert [x["score"] for x in g["results"]] == pytest.approx([x["score"] for x in w["results"]], abs=1e-5)
        assert [p["name"] for p in g["predicted_categories"]] == [p["name"] for p in w["predicted_categories"]]


def test_search_with_category_filter(serve_env, index_copy, start_server):
    from imat.engine import Engine

    s = start_server(index_copy)
    items = [json.loads(x) for x in (index_copy / "items.jsonl").read_text().splitlines()]
    name = items[0]["categories"][0]
    having = {it["id"] for it in items if name in it["categories"]}
    r = s.client.post("/v1/search", files=_files(serve_env["queries"][0]), data={"k": "50", "category": [name]})
    assert r.status_code == 200, r.text
    (rec,) = r.json()["queries"]
    assert {x["id"] for x in rec["results"]} == having
    engine = Engine(serve_env["model"], decode_threads=1, progress=False)
    (want,) = engine.search(serve_env["queries"][:1], k=50, index=index_copy, categories=[name])
    assert [x["id"] for x in rec["results"]] == [x["id"] for x in want["results"]]
    # two categories, all of them: a subset of either
    other = next(c for it in items for c in it["categories"] if c != name)
    r = s.client.post("/v1/search", files=_files(serve_env["queries"][0]),
                      data={"k": "50", "category": [name, other], "match": "all"})
    both = {it["id"] for it in items if name in it["categories"] and other in it["categories"]}
    assert {x["id"] for x in r.json()["queries"][0]["results"]} == both


def test_bad_requests_get_json_4xx_and_the_server_goes_on(serve_env, index_copy, start_server):
    s = start_server(index_copy, max_upload_bytes=200_000, max_images=4)
    good = photo_bytes(serve_env["queries"][0])
    c = s.client
    assert "not an image" in _error(c.post("/v1/search", files=_files(b"plain text, not a picture")), 400)
    photo = io.BytesIO()
    Image.effect_noise((200, 200), 60).convert("RGB").save(photo, format="JPEG", quality=90)
    cut = photo.getvalue()[: len(photo.getvalue()) * 2 // 3]
    assert "truncated" in _error(c.post("/v1/search", files=_files(cut)), 400)
    assert "empty" in _error(c.post("/v1/search", files=_files(b"")), 400)
    assert "'image'" in _error(c.post("/v1/search", data={"k": "3"}), 400)
    for k in ("0", "5000", "-1"):
        assert "'k'" in _error(c.post("/v1/search", files=_files(good), data={"k": k}), 400)
    assert "'k'" in _error(c.post("/v1/search", files=_files(good), data={"k": "ten"}), 400)
    assert "'match'" in _error(c.post("/v1/search", files=_files(good), data={"match": "most"}), 400)
    assert "at most 4" in _error(c.post("/v1/search", files=_files(*[good] * 5)), 400)
    big = io.BytesIO()
    Image.effect_noise((400, 400), 80).convert("RGB").save(big, format="PNG")
    assert "upload limit" in _error(c.post("/v1/search", files=_files(big.getvalue())), 413)
    assert "'id'" in _error(c.post("/v1/items", files=_files(good), data={"id": "  "}), 400)
    assert "'image'" in _error(c.post("/v1/items", files=_files(b"nope"), data={"id": "x"}), 400)
    _error(c.get("/v1/items/no-such-id"), 404)
    _error(c.get("/v1/items/no-such-id/thumbnail"), 404)
    _error(c.delete("/v1/items/no-such-id"), 404)
    _error(c.get("/no/such/route"), 404)
    _error(c.put("/v1/search"), 405)
    # one bad image among good ones: an error record, not a failed request
    r = c.post("/v1/search", files=_files(good, b"junk"), data={"k": "2"})
    assert r.status_code == 200
    ok, bad = r.json()["queries"]
    assert len(ok["results"]) == 2 and "error" in bad and bad["results"] == []
    assert c.get("/healthz").json() == {"status": "ok"}


def test_decompression_bomb_is_refused(serve_env, index_copy, start_server):
    s = start_server(index_copy)
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG")  # 81 Mpixel (limit 64), ~80 kB compressed
    msg = _error(s.client.post("/v1/search", files=_files(bomb.getvalue())), 400)
    assert "bomb" in msg or "too many pixels" in msg


def test_items_add_get_thumbnail_replace_delete(serve_env, index_copy, start_server):
    s = start_server(index_copy)
    c = s.client
    photo = serve_env["queries"][4]
    r = c.post("/v1/items", files=_files(photo), data={"id": "mine-1", "categories": "shoe, bag, wallet"})
    assert r.status_code == 201, r.text
    assert r.json() == {"item": {"id": "mine-1", "path": None, "categories": ["shoe", "bag, wallet"],
                                 "thumbnail": "/v1/items/mine-1/thumbnail"}, "replaced": False}
    assert c.get("/v1/items/mine-1").json()["item"]["categories"] == ["shoe", "bag, wallet"]
    thumb = c.get("/v1/items/mine-1/thumbnail")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size == (160, 160)
    # items of the index folder are thumbnailed from their own files
    first = json.loads((index_copy / "items.jsonl").read_text().splitlines()[0])["id"]
    assert c.get(f"/v1/items/{first}/thumbnail").status_code == 200
    # the added item is found by its own image, and by the category filter
    r = c.post("/v1/search", files=_files(photo), data={"k": "1", "category": "bag, wallet"})
    assert r.json()["queries"][0]["results"][0]["id"] == "mine-1"
    r = c.post("/v1/items", files=_files(serve_env["queries"][5]), data={"id": "mine-1", "categories": "hat"})
    assert r.status_code == 201 and r.json()["replaced"] is True
    assert c.get("/v1/items/mine-1").json()["item"]["categories"] == ["hat"]
    assert c.get("/v1/info").json()["index"]["items"] == 25
    assert c.delete("/v1/items/mine-1").json() == {"deleted": "mine-1"}
    _error(c.get("/v1/items/mine-1"), 404)
    _error(c.get("/v1/items/mine-1/thumbnail"), 404)
    r = c.post("/v1/search", files=_files(photo), data={"k": "50"})
    assert "mine-1" not in {x["id"] for x in r.json()["queries"][0]["results"]}
    assert c.delete(f"/v1/items/{first}").status_code == 200
    assert c.get("/v1/info").json()["index"]["items"] == 23


def test_api_key_protects_writes_and_optionally_reads(serve_env, index_copy, start_server, tmp_path):
    key = "k3y-" + "x" * 30
    (tmp_path / "key").write_text(key + "\n")
    s = start_server(index_copy, api_key_file=tmp_path / "key")
    c = s.client
    photo = serve_env["queries"][0]
    assert "API key" in _error(c.post("/v1/items", files=_files(photo), data={"id": "a"}), 401)
    _error(c.post("/v1/items", files=_files(photo), data={"id": "a"}, headers={"Authorization": "Bearer wrong"}), 401)
    _error(c.delete("/v1/items/a"), 401)
    assert c.post("/v1/items", files=_files(photo), data={"id": "a"},
                  headers={"Authorization": f"Bearer {key}"}).status_code == 201
    assert c.delete("/v1/items/a", headers={"X-API-Key": key}).status_code == 200
    assert c.post("/v1/search", files=_files(photo)).status_code == 200  # reads open by default
    s.close()

    s = start_server(index_copy, api_key_file=tmp_path / "key", protect_reads=True)
    c = s.client
    _error(c.post("/v1/search", files=_files(photo)), 401)
    _error(c.get("/v1/info"), 401)
    _error(c.get("/metrics"), 401)
    assert c.post("/v1/search", files=_files(photo), headers={"X-API-Key": key}).status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    assert c.get("/").status_code == 200  # the page holds no data


def test_short_api_key_and_protect_reads_without_key_are_config_errors(serve_env, index_copy, tmp_path):
    from imat.errors import ConfigError
    from imat.serve import ServeConfig

    (tmp_path / "key").write_text("short\n")
    with pytest.raises(ConfigError, match="16 characters"):
        ServeConfig(model=serve_env["model"], index=index_copy, api_key_file=tmp_path / "key").read_api_key()
    with pytest.raises(ConfigError, match="--protect-reads"):
        ServeConfig(model=serve_env["model"], index=index_copy, protect_reads=True)
    with pytest.raises(ConfigError, match="--max-batch"):
        ServeConfig(model=serve_env["model"], index=index_copy, max_batch=0)


def test_probes_metrics_and_openapi(serve_env, index_copy, start_server):
    s = start_server(index_copy)
    c = s.client
    assert c.get("/readyz").json() == {"status": "ready", "items": 24}
    c.post("/v1/search", files=_files(serve_env["queries"][0]))
    text = c.get("/metrics").text
    for needle in ('imat_requests_total{method="POST",route="/v1/search",status="200"} 1',
                   "imat_request_duration_seconds_bucket", "imat_model_calls_total 1",
                   "imat_batch_images_bucket", "imat_queue_images 0", "imat_index_items 24",
                   "imat_journal_pending 0"):
        assert needle in text, needle
    spec = c.get("/openapi.json").json()
    assert {"/v1/search", "/v1/items", "/v1/items/{item_id}", "/v1/items/{item_id}/thumbnail", "/healthz",
            "/readyz", "/metrics"} <= set(spec["paths"])
    assert c.get("/docs").status_code == 200
    page = c.get("/")
    assert page.status_code == 200 and "imat search" in page.text


def test_model_index_mismatch_is_refused_at_start(serve_env, index_copy, tmp_path, tiny_onnx):
    from imat.errors import IndexFileError
    from imat.serve import ServeConfig, create_app

    other = tiny_onnx.build_tiny_model(tmp_path / "other.onnx", seed=7)
    with pytest.raises(IndexFileError, match="different model"):
        create_app(ServeConfig(model=other, index=index_copy))
