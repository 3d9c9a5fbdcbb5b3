"""Batch search over a gallery index and the result records (one JSON object per query).

Record (the contract):

    {"query": path_or_id, "query_bytes_b64"?,
     "results": [{"rank": 1.., "id", "path", "path_bytes_b64"?, "score"}],
     "predicted_categories": [{"name", "score", "source": "neighbours" | "model"}],
     "error"?: "why this query could not be searched"}

A file name that is not valid UTF-8 is written readably with a lossless `*_bytes_b64` field
beside it (`imat.engine.records`); read a path back with `records.path_of(record, key)`.
Garments (`imat.data_tools.garments`): a garment query's record also has "path" and "box"
(its `query` is the garment id `<ImageId>:<k>` or `path[x0,y0,x1,y1]`), and results from a
garment index carry their "box" and "category".

Predicted categories: the similarity-weighted vote of the neighbours' category
sets (`evaluate.neighbour_votes`, in [0,1]) when the index is labelled, plus the
model's own sigmoid probabilities when it has a classifier head. Categories
scoring below `min_score` (default 0.2) are left out to keep records short; the
decision threshold used by evaluation is 0.5.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np

from imat.engine.records import BYTES_SUFFIX, is_garment_crop, path_fields
from imat.engine.evaluate import neighbour_votes
from imat.engine.index import GalleryIndex

logger = logging.getLogger(__name__)

PREDICTION_MIN_SCORE = 0.2
GARMENT_ITEM_FIELDS = ("box", "category")   # carried from a garment index's items into each result


def label_space(index: GalleryIndex, category_names: Sequence[str]) -> list[str]:
    """The model's category names, plus any name the index items use that the model does not know."""
    names = list(category_names)
    known = set(names)
    for item in index.items:
        for name in item.get("categories", ()):
            if name not in known:
                known.add(name)
                names.append(name)
    return names


def item_label_matrix(index: GalleryIndex, names: Sequence[str]) -> np.ndarray | None:
    """bool[N,C] of the index items' categories; None when the index has no labels."""
    if not index.labelled:
        return None
    col = {name: j for j, name in enumerate(names)}
    out = np.zeros((index.count, len(names)), dtype=bool)
    for r, item in enumerate(index.items):
        for name in item["categories"]:
            out[r, col[name]] = True
    return out


def _predictions(scores: np.ndarray, names: Sequence[str], source: str, min_score: float) -> list[dict]:
    order = np.argsort(-scores, kind="stable")
    return [
        {"name": names[j], "score": round(float(scores[j]), 6), "source": source}
        for j in order
        if scores[j] >= min_score and scores[j] > 0
    ]


def search_records(
    index: GalleryIndex,
    queries: Sequence[Any],
    embeddings: np.ndarray,
    ok_indices: np.ndarray,
    errors: Sequence,
    k: int,
    *,
    category_names: Sequence[str] = (),
    probabilities: np.ndarray | None = None,
    min_score: float = PREDICTION_MIN_SCORE,
    categories: Sequence[str] | None = None,
    match: str = "any",
) -> list[dict]:
    """One record per query, in query order; queries that failed to embed get an `error` record.

    categories / match: only items having any / all of these category names (GalleryIndex.search).
    """
    scores, ids = index.search(embeddings, k, categories=categories, match=match)
    names = label_space(index, category_names)
    labels = item_label_matrix(index, names)
    votes = neighbour_votes(ids, scores, labels) if labels is not None and len(ids) else None
    records: list[dict | None] = [None] * len(queries)
    for row, q in enumerate(ok_indices):
        q = int(q)
        results = [
            {
                "rank": rank + 1,
                "id": index.items[int(i)]["id"],
                **_item_path(index.items[int(i)]),
                "score": round(float(s), 6),
                # garment indexes: where the garment is in its photo, and what it is
                **{f: index.items[int(i)][f] for f in GARMENT_ITEM_FIELDS if f in index.items[int(i)]},
            }
            for rank, (i, s) in enumerate(zip(ids[row], scores[row]))
            if i >= 0
        ]
        predicted: list[dict] = []
        if votes is not None:
            predicted += _predictions(votes[row], names, "neighbours", min_score)
        if probabilities is not None:
            predicted += _predictions(probabilities[row], list(category_names), "model", min_score)
        records[q] = {**query_fields(queries[q], q), "results": results, "predicted_categories": predicted}
        records[q].update(garment_query_fields(queries[q]))
    for err in errors:
        records[err.index] = {
            **query_fields(queries[err.index], err.index),
            "results": [],
            "predicted_categories": [],
            "error": err.message,
        }
        records[err.index].update(garment_query_fields(queries[err.index]))
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:  # every query is either embedded or an error; anything else is a bug
        raise RuntimeError(f"queries {missing[:5]} have neither a result nor an error")
    return records  # type: ignore[return-value]


def query_fields(query: Any, index: int) -> dict[str, str]:
    """{"query": its path (readable), "query_bytes_b64"?: exact bytes} or {"query": "query-<i>"} for an array."""
    if is_garment_crop(query):
        return {"query": query.label()}
    if isinstance(query, (str, bytes, os.PathLike)):
        return path_fields(query, "query")
    return {"query": f"query-{index}"}


def _item_path(item: dict) -> dict:
    """An index item's path fields as stored (readable `path`, plus the exact bytes when it has them)."""
    fields = {"path": item.get("path")}
    if "path" + BYTES_SUFFIX in item:
        fields["path" + BYTES_SUFFIX] = item["path" + BYTES_SUFFIX]
    return fields


def garment_query_fields(query: Any) -> dict:
    """A garment query's photo and box (its record's `query` is the garment id or path[box])."""
    if is_garment_crop(query):
        return {"path": str(query.path), "box": list(query.box)}
    return {}


def query_name(query: Any, index: int) -> str:
    if is_garment_crop(query):
        return query.label()
    if isinstance(query, np.ndarray):
        return f"query-{index}"
    return str(query)
