"""LabelSpace: the packaged schema, JSON errors, multi-hot both ways."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imat.constants import NUM_ATTRIBUTES, NUM_CATEGORIES
from imat.data_tools.labels import LabelSpace
from imat.errors import DataError


def test_default_matches_constants_and_sparse_ids():
    ls = LabelSpace.default()
    assert ls.num_categories == NUM_CATEGORIES == 46
    assert ls.num_attributes == NUM_ATTRIBUTES == 294
    assert ls.category_ids == tuple(range(46))
    assert ls.category_names[0] == "shirt, blouse"
    assert ls.category_supercategories[0] == "upperbody"
    assert list(ls.attribute_ids) == sorted(ls.attribute_ids)
    assert ls.attribute_ids[0] == 0 and ls.attribute_ids[-1] == 340
    assert ls.attribute_index(340) == 293


def test_default_equals_shared_copy(shared_data):
    assert LabelSpace.from_json(shared_data / "imaterialist2020" / "label_descriptions.json") == LabelSpace.default()


def test_multihot_round_trip():
    ls = LabelSpace.default()
    cats = [0, 7, 45]
    v = ls.categories_to_multihot(cats)
    assert v.dtype == np.float32 and v.shape == (46,) and v.sum() == 3
    assert ls.multihot_to_categories(v) == cats
    attrs = [ls.attribute_ids[5], 340]
    a = ls.attributes_to_multihot(attrs)
    assert a.shape == (294,) and a[293] == 1 and a.sum() == 2
    assert ls.multihot_to_attributes(a) == sorted(attrs)
    assert ls.multihot_to_categories(np.full(46, 0.4), threshold=0.5) == []
    assert len(ls.multihot_to_categories(np.full(46, 0.6))) == 46


def test_unknown_ids_raise():
    ls = LabelSpace.default()
    gap = next(i for i in range(341) if i not in set(ls.attribute_ids))
    with pytest.raises(DataError, match=str(gap)):
        ls.attribute_index(gap)
    with pytest.raises(DataError):
        ls.categories_to_multihot([46])
    with pytest.raises(DataError, match="shape"):
        ls.multihot_to_categories(np.zeros(10))


def test_to_json_dict_round_trip(tmp_path):
    ls = LabelSpace.default()
    p = tmp_path / "label_descriptions.json"
    p.write_text(json.dumps(ls.to_json_dict()))
    assert LabelSpace.from_json(p) == ls
    d = ls.to_json_dict()
    assert len(d["categories"]) == 46 and d["attributes"][-1]["id"] == 340
    assert d["attributes"][0]["supercategory"] == "nickname" and d["categories"][0]["supercategory"] == "upperbody"


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ('{"categories": 3}', "malformed"),
    ('{"categories": [{"name": "x"}], "attributes": []}', "malformed"),
    ('{"categories": [{"id": 0, "name": "a"}, {"id": 0, "name": "b"}], "attributes": []}', "duplicate"),
])
def test_from_json_errors_name_the_file(tmp_path, content, match):
    p = tmp_path / "label_descriptions.json"
    if content is not None:
        p.write_text(content)
    with pytest.raises(DataError, match=match) as e:
        LabelSpace.from_json(p)
    assert str(p) in str(e.value)
