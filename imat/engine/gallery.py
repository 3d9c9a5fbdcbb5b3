"""What to index or search: the images of a plain folder or of a Kaggle-layout folder.

A Kaggle folder (train.csv present) brings image ids and category labels, so the
index stores them and search can vote labels from neighbours; a plain folder
brings only paths. Non-image files, and entries named like images that are not files
(dangling symlinks, loops, folders, FIFOs), are listed so callers can say what was skipped.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import pathlib

from imat.errors import DataError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FolderItems:
    items: list[pathlib.Path]
    ids: list[str] | None = None  # image ids (Kaggle) or None (file stems are used)
    labels: list[list[str]] | None = None  # category names per image (Kaggle) or None
    skipped: list[str] = dataclasses.field(default_factory=list)  # non-image file names
    # entries named like images that are not readable files: "name (why)", e.g. "a.jpg (dangling symlink)"
    not_files: list[str] = dataclasses.field(default_factory=list)
    problems: str | None = None  # the Kaggle reader's summary when it dropped rows or images

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def _not_a_file(path: pathlib.Path) -> str | None:
    """Why `path` (symlinks followed) is not a regular file, or None when it is one."""
    from imat.data_tools.images import file_kind

    try:
        info = path.stat()
    except FileNotFoundError:
        return "dangling symlink" if path.is_symlink() else "vanished while listing"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop"
        return f"unreadable: {e.strerror or e}"
    kind = file_kind(info.st_mode)
    return "a folder" if kind == "folder" else kind


def plain_folder_items(folder) -> FolderItems:
    """Image files of a plain folder (sorted by name), hidden entries ignored.

    Which names are images is asked from Pillow (`images.is_image_name`). Other regular files are
    listed in `skipped`; entries named like images that are not regular files (dangling symlinks,
    symlink loops, folders, FIFOs, devices) in `not_files`, so callers report both.
    """
    from imat.data_tools.images import is_image_name

    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass a folder of images (or a Kaggle folder with train.csv)")
    images, skipped, not_files = [], [], []
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror or e})") from None
    for p in entries:
        if p.name.startswith("."):  # hidden files, macOS '._x.jpg' resource forks
            continue
        why = _not_a_file(p)
        if why is None:
            (images if is_image_name(p.name) else skipped).append(p)
        elif is_image_name(p.name):
            not_files.append(f"{p.name} ({why})")
        # anything else (a subfolder, a socket without an image name) is not a candidate at all
    if not_files:
        logger.info("%s: %d entries named like images are not image files: %s", folder, len(not_files),
                    ", ".join(not_files[:5]))
    if not images:
        raise DataError(f"{folder}: no image files found (looked for .jpg, .jpeg, .png, .webp, ...)")
    return FolderItems(items=images, skipped=[p.name for p in skipped], not_files=not_files)


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
