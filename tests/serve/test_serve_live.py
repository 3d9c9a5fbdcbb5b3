"""The live index over HTTP: deletes, adds and category filters against a float64 brute force over
the same embeddings, and searches that keep answering while the index changes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import photo_bytes


def _search_ids(client, photo, k, categories=()):
    r = client.post("/v1/search", files=[("image", ("q.jpg", photo_bytes(photo), "image/jpeg"))],
                    data={"k": str(k), "category": list(categories)})
    assert r.status_code == 200, r.text
    return [x["id"] for x in r.json()["queries"][0]["results"]]


@pytest.mark.parametrize("index_type", ["Flat", "HNSW32,Flat"])
def test_deletes_adds_and_filters_equal_brute_force(serve_env, tmp_path, start_server, index_type):
    from imat.engine import Engine
    from imat.engine.gallery import folder_items

    engine = Engine(serve_env["model"], decode_threads=1, progress=False)
    found = folder_items(serve_env["gallery"])
    index_dir = tmp_path / "index"
    g = engine.build_index(found.items, index_dir, index_type=index_type, labels=found.labels, ids=found.ids)
    vectors = {it["id"]: v for it, v in zip(g.items, engine.embed(found.items))}
    cats = {it["id"]: set(it["categories"]) for it in g.items}

    s = start_server(index_dir)
    c = s.client
    gone = [it["id"] for it in g.items[::4]]
    for item_id in gone:
        assert c.delete(f"/v1/items/{item_id}").status_code == 200
        vectors.pop(item_id), cats.pop(item_id)
    for i, photo in enumerate(serve_env["queries"][:3]):
        assert c.post("/v1/items", files=[("image", ("p.jpg", photo_bytes(photo), "image/jpeg"))],
                      data={"id": f"new{i}", "categories": "shoe" if i % 2 == 0 else "hat"}).status_code == 201
        vectors[f"new{i}"] = engine.embed([photo])[0]
        cats[f"new{i}"] = {"shoe"} if i % 2 == 0 else {"hat"}

    query = serve_env["queries"][4]
    q = engine.embed([query])[0].astype(np.float64)
    common = max({n for cs in cats.values() for n in cs}, key=lambda n: sum(n in cs for cs in cats.values()))
    for filt in ((), ("shoe",), (common,), ("shoe", "hat")):
        ids = [i for i in vectors if not filt or cats[i] & set(filt)]
        sims = np.array([vectors[i].astype(np.float64) @ q for i in ids])
        want = [ids[j] for j in np.argsort(-sims, kind="stable")]
        got = _search_ids(c, query, 100, filt)
        assert got == want, (index_type, filt)


def test_searches_keep_answering_while_the_index_changes(serve_env, index_copy, start_server):
    s = start_server(index_copy, snapshot_every=3)
    c = s.client
    photos = serve_env["queries"]
    errors: list[str] = []
    stop = threading.Event()

    def writer():
        import httpx

        with httpx.Client(base_url=s.url, timeout=30) as w:
            for i in range(12):
                r = w.post("/v1/items", files=[("image", ("p.jpg", photo_bytes(photos[i % 6]), "image/jpeg"))],
                           data={"id": f"w{i % 2}", "categories": "shoe"})
                if r.status_code != 201:
                    errors.append(r.text)
                if i % 3 == 2:
                    r = w.delete(f"/v1/items/w{i % 2}")
                    if r.status_code != 200:
                        errors.append(r.text)
        stop.set()

    t = threading.Thread(target=writer)
    t.start()
    sizes = set()
    searches = 0
    while (not stop.is_set() or searches < 5) and searches < 200:
        ids = _search_ids(c, photos[searches % 6], 100)
        assert len(ids) == len(set(ids))  # a consistent snapshot: no row twice
        sizes.add(len(ids))
        searches += 1
    t.join(timeout=60)
    assert not errors, errors
    assert sizes <= {24, 25, 26}
    # the last writes: w0 added at i=10, w1 added and deleted at i=11
    assert c.get("/v1/items/w0").status_code == 200 and c.get("/v1/items/w1").status_code == 404
    assert c.get("/readyz").json()["items"] == 25
