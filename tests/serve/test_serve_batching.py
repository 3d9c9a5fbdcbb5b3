"""Request batching: concurrent requests share model calls, results equal one-by-one Engine.search;
a full queue answers 503 with Retry-After."""

from __future__ import annotations

import concurrent.futures
import re
import threading
import time

import httpx
import pytest

from conftest import photo_bytes


def _model_calls(client) -> int:
    text = client.get("/metrics").text
    return int(float(re.search(r"^imat_model_calls_total (\S+)$", text, re.M).group(1)))


def _concurrent_searches(url, photos, k=4):
    barrier = threading.Barrier(len(photos))

    def one(p):
        with httpx.Client(base_url=url, timeout=30) as c:
            barrier.wait(timeout=10)
            r = c.post("/v1/search", files=[("image", (p.name, photo_bytes(p), "image/jpeg"))], data={"k": str(k)})
            assert r.status_code == 200, r.text
            return r.json()["queries"][0]

    with concurrent.futures.ThreadPoolExecutor(len(photos)) as pool:
        return list(pool.map(one, photos))


def test_concurrent_requests_share_model_calls_and_equal_one_by_one_search(serve_env, index_copy, start_server):
    from imat.engine import Engine

    photos = serve_env["queries"]  # 6 requests of one image each
    s = start_server(index_copy, max_batch=32, max_wait_ms=300)
    got = _concurrent_searches(s.url, photos)
    calls = _model_calls(s.client)
    assert calls < len(photos), f"{calls} model calls for {len(photos)} concurrent requests: nothing was batched"
    text = s.client.get("/metrics").text
    merged = re.search(r'^imat_batch_requests_sum (\S+)$', text, re.M)
    assert merged and float(merged.group(1)) == len(photos)

    engine = Engine(serve_env["model"], decode_threads=1, batch_size=1, progress=False)
    gallery = engine.load_index(index_copy)
    for photo, rec in zip(photos, got):
        (want,) = engine.search([photo], k=4, index=gallery)  # one image, one model call
        assert [x["id"] for x in rec["results"]] == [x["id"] for x in want["results"]]
        assert [x["score"] for x in rec["results"]] == pytest.approx([x["score"] for x in want["results"]], abs=1e-5)


def test_batching_off_runs_each_request_alone(serve_env, index_copy, start_server):
    photos = serve_env["queries"][:4]
    s = start_server(index_copy, batching=False, max_wait_ms=300)
    _concurrent_searches(s.url, photos)
    assert _model_calls(s.client) == len(photos)


def test_a_request_bigger_than_max_batch_is_split(serve_env, index_copy, start_server):
    s = start_server(index_copy, max_batch=2)
    files = [("image", (p.name, photo_bytes(p), "image/jpeg")) for p in serve_env["queries"][:5]]
    r = s.client.post("/v1/search", files=files, data={"k": "3"})
    assert r.status_code == 200 and len(r.json()["queries"]) == 5
    assert _model_calls(s.client) == 3


def test_full_queue_answers_503_with_retry_after(serve_env, index_copy, start_server):
    # queue of 1 image; the first request waits 1.5 s for company, so the second finds the queue full
    s = start_server(index_copy, queue_limit=1, max_wait_ms=1500)
    photo = serve_env["queries"][0]
    files = [("image", (photo.name, photo_bytes(photo), "image/jpeg"))]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: httpx.post(s.url + "/v1/search", files=files, timeout=30))
        deadline = time.monotonic() + 5
        while s.state.batcher.queue_depth == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = s.client.post("/v1/search", files=files)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
        assert first.result().status_code == 200
    assert "imat_rejected_total 1" in s.client.get("/metrics").text
    assert s.client.post("/v1/search", files=files).status_code == 200  # and the server goes on
