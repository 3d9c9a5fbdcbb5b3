"""imat.engine.index is a compatibility re-export: the names it keeps are the ones of the split modules."""

from __future__ import annotations

from imat.engine import gallery_index, index, index_choice


def test_index_re_exports_the_split_modules():
    assert index.GalleryIndex is gallery_index.GalleryIndex
    assert index.load_index is gallery_index.load_index
    assert index.build_gallery_index is gallery_index.build_gallery_index
    assert index.choose_index_type is index_choice.choose_index_type
