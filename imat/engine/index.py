"""Compatibility re-export: the index code lives in index_choice, faiss_build, gallery_index and index_dir.

Kept because `from imat.engine.index import GalleryIndex` is used outside the index modules;
new code imports from the module that has the job.
"""

from imat.engine.gallery_index import GalleryIndex, build_gallery_index, load_index
from imat.engine.index_choice import choose_index_type

__all__ = ["GalleryIndex", "build_gallery_index", "choose_index_type", "load_index"]
