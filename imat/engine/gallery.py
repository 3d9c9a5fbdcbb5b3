"""What to index or search: the images of a plain folder or of a Kaggle-layout folder.

A Kaggle folder (train.csv present) brings image ids and category labels, so the
index stores them and search can vote labels from neighbours; a plain folder
brings only paths. Non-image files are listed so callers can say what was skipped.
"""

from __future__ import annotations

import dataclasses
import pathlib

from imat.errors import DataError


@dataclasses.dataclass
class FolderItems:
    items: list[pathlib.Path]
    ids: list[str] | None = None  # image ids (Kaggle) or None (file stems are used)
    labels: list[list[str]] | None = None  # category names per image (Kaggle) or None
    skipped: list[str] = dataclasses.field(default_factory=list)  # non-image file names
    problems: str | None = None  # the Kaggle reader's summary when it dropped rows or images

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def plain_folder_items(folder) -> FolderItems:
    """Image files of a plain folder (sorted); other files are listed in `skipped`."""
    from imat.data_tools.kaggle import list_images

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass a folder of images (or a Kaggle folder with train.csv)")
    images = list_images(folder)
    names = {p.name for p in images}
    skipped = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in names)
    if not images:
        raise DataError(f"{folder}: no image files found (looked for .jpg, .jpeg, .png, .webp, ...)")
    return FolderItems(items=images, skipped=skipped)


def kaggle_folder_items(root) -> FolderItems:
    """Labelled images of a Kaggle-layout folder (bad rows are reported by the reader and skipped)."""
    from imat.data_tools.kaggle import read_kaggle

    ds = read_kaggle(root)
    if not ds.records:
        raise DataError(f"{root}: the Kaggle folder has no usable images; see `imat data check {root}`")
    name_of = dict(zip(ds.labels.category_ids, ds.labels.category_names))
    return FolderItems(
        items=[rec.path for rec in ds.records],
        ids=[rec.image_id for rec in ds.records],
        labels=[[name_of[c] for c in rec.categories] for rec in ds.records],
        problems=ds.summary() if ds.problems else None,
    )


def folder_items(path) -> FolderItems:
    """Kaggle folder when `path/train.csv` exists, else a plain image folder."""
    path = pathlib.Path(path)
    if (path / "train.csv").is_file():
        return kaggle_folder_items(path)
    return plain_folder_items(path)
