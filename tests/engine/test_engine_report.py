"""HTML report: every query present, text escaped, thumbnails embedded, written atomically."""

from __future__ import annotations

from imat.engine.report import write_html_report


def test_report_contains_every_query_and_escapes(photo_dir, tmp_path):
    paths = sorted(photo_dir.glob("*.jpg"))
    records = [
        {"query": str(p), "results": [{"rank": 1, "id": f"<id{i}>", "path": str(paths[0]), "score": 0.5}],
         "predicted_categories": [{"name": "bag, wallet", "score": 0.7, "source": "neighbours"}]}
        for i, p in enumerate(paths[:4])
    ]
    records.append({"query": "/x/<script>.jpg", "results": [], "predicted_categories": [], "error": "bad & broken"})
    out = write_html_report(records, tmp_path / "r.html")
    text = out.read_text()
    for p in paths[:4]:
        assert str(p) in text
    assert "&lt;script&gt;" in text and "<script>" not in text
    assert "&lt;id0&gt;" in text and "bad &amp; broken" in text
    assert text.count("data:image/jpeg;base64,") == 8  # 4 queries + 4 results
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
