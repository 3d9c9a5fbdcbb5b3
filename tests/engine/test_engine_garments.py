"""Garment index, search and evaluation: real ONNX Runtime and FAISS on synthetic masks and real photos."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imat.data_tools import garments as G
from imat.data_tools.kaggle import read_kaggle
from imat.engine.evaluate import evaluate_garment_embeddings
from imat.errors import ConfigError


@pytest.fixture(scope="module")
def garment_index(tmp_path_factory, tiny_model, kaggle_dir):
    from imat.engine import Engine

    engine = Engine(tiny_model, decode_threads=2, batch_size=8, progress=False)
    out = tmp_path_factory.mktemp("gidx") / "idx"
    engine.build_garment_index(kaggle_dir, out)
    return out


def test_garment_index_has_one_row_per_garment_with_box_and_category(engine, garment_index, kaggle_dir):
    gallery = engine.load_index(garment_index)
    gs = G.garments_of(read_kaggle(kaggle_dir))
    assert gallery.count == len(gs.garments) and gallery.meta["garments"] is True
    labels = gs.labels
    name = dict(zip(labels.category_ids, labels.category_names))
    for item, g in zip(gallery.items, gs.garments):
        assert item["id"] == f"{g.image_id}:{g.k}"
        assert item["path"] == str(g.path) and item["box"] == list(g.box)
        assert item["category"] == name[g.category_id] and item["categories"] == [name[g.category_id]]
        assert len(item["attributes"]) == len(g.attribute_ids)


def test_garment_queries_find_themselves_and_results_carry_box_and_category(engine, garment_index, kaggle_dir):
    gallery = engine.load_index(garment_index)
    gs, crops = engine.garment_items(kaggle_dir)
    records = engine.search(crops[:10], k=3, index=gallery)
    for rec, crop in zip(records, crops):
        assert rec["query"] == crop.name and rec["box"] == list(crop.box) and rec["path"] == str(crop.path)
        top = rec["results"][0]
        assert top["score"] == pytest.approx(1.0, abs=1e-5)
        assert gallery.items[[i["id"] for i in gallery.items].index(top["id"])]["box"] == top["box"]
        assert all("box" in r and "category" in r for r in rec["results"])


def test_the_crop_the_engine_embeds_is_the_prepared_example(tmp_path, engine, kaggle_dir):
    from imat.data_tools.prepared import PreparedSplit
    from imat.data_tools.tfds_builder import prepare

    size = engine.metadata.image_size
    data_dir = prepare(kaggle_dir, tmp_path / "prep", image_size=size, workers=1, garments=True)
    split = PreparedSplit.open(data_dir, "train")
    gs = G.garments_of(read_kaggle(kaggle_dir))
    by_id = {g.id: g for g in gs.garments}
    rows = list(range(min(12, split.num_examples)))
    crops = [G.GarmentCrop(path=by_id[split.image_ids[r]].path, box=by_id[split.image_ids[r]].box,
                           padding=split.garment_padding) for r in rows]
    from imat.engine.embedder import _decode

    for r, crop in zip(rows, crops):
        image, _ = _decode(crop, size, engine.metadata.resize_mode)
        np.testing.assert_array_equal(image, split.images([r])[0])
    np.testing.assert_array_equal(engine.embed(crops), engine.embed(list(split.images(rows))))


def _loop_reference(x, cats, groups, k):
    """mAP@k, P@k by explicit loops: rank the garments of other photos by cosine, relevance = same category."""
    aps, precs = [], []
    for q in range(len(x)):
        others = [j for j in range(len(x)) if groups[j] != groups[q]]
        ranked = sorted(others, key=lambda j: (-float(x[q] @ x[j]), j))[:k]
        rel = [cats[j] == cats[q] for j in ranked]
        n_rel = sum(cats[j] == cats[q] for j in others)
        precs.append(sum(rel) / k)
        if n_rel:
            hits, ap = 0, 0.0
            for i, r in enumerate(rel, 1):
                if r:
                    hits += 1
                    ap += hits / i
            aps.append(ap / min(n_rel, k))
    return float(np.mean(aps)), float(np.mean(precs))


def test_garment_metrics_match_a_loop_reference_and_never_count_the_own_photo():
    rng = np.random.default_rng(0)
    n, groups = 60, np.repeat(np.arange(15), 4)
    cats = rng.integers(0, 4, n)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    onehot = np.eye(46, dtype=np.float32)[cats]
    got = evaluate_garment_embeddings(x, onehot, [f"p{g}" for g in groups], 5, baseline_samples=2)
    want_map, want_p = _loop_reference(x, cats, groups, 5)
    assert got["map@5"] == pytest.approx(want_map, abs=1e-9)
    assert got["precision@5"] == pytest.approx(want_p, abs=1e-9)
    # garments of one photo made near-identical (each other's nearest neighbours): still excluded
    x2 = x.copy()
    for g in range(15):
        x2[groups == g] += 5 * x[groups == g][0]
    x2 /= np.linalg.norm(x2, axis=1, keepdims=True)
    same_photo = evaluate_garment_embeddings(x2, onehot, groups, 5, baseline_samples=2)
    assert same_photo["map@5"] == pytest.approx(_loop_reference(x2, cats, groups, 5)[0], abs=1e-9)
    assert 0 < got["baseline"]["map@5"] < 1


def test_attribute_graded_ndcg_prefers_same_attributes():
    onehot = np.eye(46, dtype=np.float32)[[0, 0, 0]]
    attrs = np.zeros((3, 294), np.float32)
    attrs[:, 0] = 1
    attrs[2, 1] = 1          # row 2: same category as row 0, other attributes
    x = np.array([[1, 0], [0.6, 0.8], [0.8, 0.6]], np.float32)   # row 0 ranks row 2 first, row 1 second
    graded = evaluate_garment_embeddings(x, onehot, ["a", "b", "c"], 2, attributes=attrs, baseline_samples=1)
    plain = evaluate_garment_embeddings(x, onehot, ["a", "b", "c"], 2, baseline_samples=1)
    assert plain["ndcg@2"] == pytest.approx(1.0) and graded["ndcg@2"] < 1.0
    assert graded["map@2"] == plain["map@2"] == pytest.approx(1.0)


def test_engine_evaluate_garments(engine, kaggle_dir):
    result = engine.evaluate_garments(kaggle_dir, k=5, baseline_samples=2)
    gs = G.garments_of(read_kaggle(kaggle_dir))
    assert result["count"] == len(gs.garments) and result["photos"] == len({g.image_id for g in gs.garments})
    assert 0 <= result["map@5"] <= 1 and "baseline" in result and result["garment_model"] is False


def test_box_queries_on_real_photos(tmp_path, engine, real_smoke):
    gs, crops = engine.garment_items(real_smoke)
    out = tmp_path / "idx"
    gallery = engine.build_garment_index(real_smoke, out)
    assert gallery.count == len(crops)
    # a box query with a garment's own box finds that garment first (same pixels, same padding)
    for g in gs.garments[:4]:
        box_query = G.GarmentCrop(path=g.path, box=G.check_box(g.box, *G.photo_size(g.path)))
        rec = engine.search([box_query], k=2, index=gallery)[0]
        assert rec["results"][0]["id"] == g.id and rec["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_search_cli_box_and_bad_boxes_on_a_real_photo(tmp_path, tiny_model, real_smoke, capsys):
    from imat.cli.main import main

    idx = tmp_path / "idx"
    assert main(["index", "--model", str(tiny_model), "--images", str(real_smoke), "--out", str(idx),
                 "--garments"]) == 0
    photo = sorted((real_smoke / "train").glob("*.jpg"))[0]
    w, h = G.photo_size(photo)
    out = tmp_path / "r.jsonl"
    html = tmp_path / "r.html"
    assert main(["search", "--model", str(tiny_model), "--index", str(idx), str(photo), "--box",
                 f"10,20,{w // 2},{h // 2}", "--out", str(out), "--html", str(html), "--k", "3"]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["box"] == [10, 20, w // 2, h // 2] and rec["results"]
    assert "category_filter" in rec and "category_filter_source" in rec     # says where it searched
    assert all(r["category"] == rec["category_filter"][0] for r in rec["results"]) if rec["category_filter"] else True
    assert all("box" in r and "category" in r for r in rec["results"])
    page = html.read_text()
    assert page.count('class="parent"') == 1 + len(rec["results"])   # query and results, each drawn on its photo
    any_cat = tmp_path / "any.jsonl"
    assert main(["search", "--model", str(tiny_model), "--index", str(idx), str(photo), "--box",
                 f"10,20,{w // 2},{h // 2}", "--out", str(any_cat), "--k", "3", "--any-category"]) == 0
    assert len(json.loads(any_cat.read_text())["results"]) == 3
    capsys.readouterr()
    for bad, why in ((f"0,0,{w + 1},{h}", "outside the photo"), ("5,5,5,9", "zero area"),
                     ("50,5,10,9", "x1 < x0"), ("1,2,three,4", "not four numbers"), ("1,2,3", "four")):
        rc = main(["search", "--model", str(tiny_model), "--index", str(idx), str(photo), "--box", bad,
                   "--out", str(out)])
        err = capsys.readouterr().err
        assert rc != 0 and "--box" in err and why in err, (bad, err)
        assert "Traceback" not in err


def test_search_cli_batch_garments_uses_garment_ids(tmp_path, tiny_model, kaggle_dir, garment_index):
    from imat.cli.main import main

    out = tmp_path / "r.jsonl"
    assert main(["search", "--model", str(tiny_model), "--index", str(garment_index), "--batch", str(kaggle_dir),
                 "--garments", "--out", str(out), "--k", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    gs = G.garments_of(read_kaggle(kaggle_dir))
    assert [r["query"] for r in records] == [g.id for g in gs.garments]


def test_garment_options_without_garments_are_errors(tmp_path, tiny_model, kaggle_dir):
    from imat.cli.main import main

    assert main(["index", "--model", str(tiny_model), "--images", str(kaggle_dir), "--out", str(tmp_path / "i"),
                 "--keep-parts"]) != 0
    with pytest.raises(ConfigError):
        G.check_box((0, 0, 0, 0), 10, 10)


def test_category_restricted_garment_search_matches_brute_force(engine, garment_index, kaggle_dir):
    gallery = engine.load_index(garment_index)
    vectors = gallery.index.reconstruct_n(0, gallery.count)
    _, crops = engine.garment_items(kaggle_dir)
    queries = crops[:8]
    q = engine.embed(queries)
    cats = [it["category"] for it in gallery.items]
    for name in sorted(set(cats))[:3]:
        records = engine.search(queries, k=4, index=gallery, categories=[name])
        rows = np.flatnonzero(np.array(cats) == name)
        for rec, qv in zip(records, q):
            scores = vectors[rows] @ qv
            want = [gallery.items[int(rows[j])]["id"] for j in np.argsort(-scores, kind="stable")[:4]]
            assert [r["id"] for r in rec["results"]] == want
            assert all(r["category"] == name for r in rec["results"])


def test_garment_queries_search_within_their_predicted_category_and_say_so(engine, garment_index, kaggle_dir):
    gallery = engine.load_index(garment_index)
    _, crops = engine.garment_items(kaggle_dir)
    names = list(engine.metadata.category_names)
    probs = engine.embed_result(crops[:10]).probabilities
    known = set(gallery.category_names())
    records = engine.search_within_predicted(crops[:10], k=3, index=gallery)
    assert [r["query"] for r in records] == [c.name for c in crops[:10]]
    for rec, p in zip(records, probs):
        top = names[int(np.argmax(p))]
        if top in known:
            assert rec["category_filter"] == [top] and rec["category_filter_source"] == "model"
            assert rec["results"] and all(r["category"] == top for r in rec["results"])
        else:
            assert rec["category_filter"] is None and top in rec["category_filter_source"]
            assert len(rec["results"]) == 3


def test_search_within_predicted_without_a_classifier_searches_everything(tmp_path, make_model, kaggle_dir):
    from imat.engine import Engine

    engine = Engine(make_model(tmp_path / "m.onnx", probabilities=False), decode_threads=1, progress=False)
    gallery = engine.build_garment_index(kaggle_dir, tmp_path / "idx")
    _, crops = engine.garment_items(kaggle_dir)
    rec = engine.search_within_predicted(crops[:1], k=3, index=gallery)[0]
    assert rec["category_filter"] is None and "no classifier" in rec["category_filter_source"]
    assert len(rec["results"]) == 3
