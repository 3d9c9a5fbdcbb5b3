"""Source folders of labelled photos: detect the kind of a folder and read it into image records.

Two kinds, both read into the same `ImageRecord`s (`imat.data_tools.kaggle`) that `imat data prepare`,
`check` and `stats` consume:

- **kaggle**: Kaggle iMaterialist 2020 layout, `train.csv` (one row per mask), `label_descriptions.json`,
  `train/<ImageId>.jpg`; read by `imat.data_tools.kaggle.read_kaggle`.
- **image-level**: `labels.csv` with the header `ImageId,ClassIds` (ClassIds: iMaterialist category ids
  0..45, space-separated, may be empty) and `images/<ImageId>.jpg`. No masks and no attributes, so
  records have no mask rows, all-zero attributes and no size (read from the image when it is decoded).
  A photo with no ClassIds is kept as an unlabelled record (for self-supervision), not dropped.

Bad rows are reported and skipped through the Kaggle reader's own mechanism (`Problem`,
`ProblemCollector`): each names `labels.csv:LINE` and a reason whose first word is its kind.
"""

from __future__ import annotations

import csv
import logging
import pathlib
from dataclasses import dataclass
from typing import ClassVar

from imat.data_tools.kaggle import (
    ImageRecord, KaggleDataset, Problem, ProblemCollector, SourceDataset, _existing_files, check_image_id,
    read_kaggle,
)
from imat.data_tools.labels import LabelSpace
from imat.errors import DataError

logger = logging.getLogger(__name__)

KAGGLE = "kaggle"
IMAGE_LEVEL = "image-level"
KINDS = (KAGGLE, IMAGE_LEVEL)
KAGGLE_CSV = "train.csv"
IMAGE_LEVEL_CSV = "labels.csv"
IMAGE_LEVEL_COLUMNS = ("ImageId", "ClassIds")
IMAGE_LEVEL_IMAGES = "images"


@dataclass
class ImageLevelDataset(SourceDataset):
    """A read image-level folder (labels.csv with one row per photo)."""

    kind: ClassVar[str] = IMAGE_LEVEL
    csv_name: ClassVar[str] = IMAGE_LEVEL_CSV
    has_masks: ClassVar[bool] = False

    def _headline(self) -> str:
        unlabelled = len(self.unlabelled)
        note = f"; {unlabelled} without labels (kept out of train/validation, for self-supervision)" \
            if unlabelled else ""
        return (f"{self.root}: {len(self.records)} images read (of {self.num_images_seen} images, "
                f"{self.num_rows_read} rows in {IMAGE_LEVEL_CSV}){note}")

    def _dropped(self) -> str:
        return f"dropped {self.num_rows_read - len(self.records)} rows"


def detect_kind(root) -> str:
    """"kaggle" (train.csv present) or "image-level" (labels.csv present); DataError otherwise."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a dataset folder: a Kaggle-layout one ({KAGGLE_CSV}, "
                        f"label_descriptions.json, train/) or an image-level one ({IMAGE_LEVEL_CSV}, images/)")
    if (root / KAGGLE_CSV).is_file():
        return KAGGLE
    if (root / IMAGE_LEVEL_CSV).is_file():
        return IMAGE_LEVEL
    raise DataError(f"{root}: neither {KAGGLE_CSV} nor {IMAGE_LEVEL_CSV} found; a source folder is either "
                    f"Kaggle-layout ({KAGGLE_CSV}: ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds; "
                    f"label_descriptions.json; train/<ImageId>.jpg) or image-level ({IMAGE_LEVEL_CSV}: "
                    f"ImageId,ClassIds; {IMAGE_LEVEL_IMAGES}/<ImageId>.jpg)")


def read_source(root, *, strict: bool = False, check_images: bool = True,
                validate_rle: bool = True) -> SourceDataset:
    """Read a source folder of either kind (see detect_kind)."""
    kind = detect_kind(root)
    if kind == KAGGLE:
        return read_kaggle(root, strict=strict, check_images=check_images, validate_rle=validate_rle)
    return read_image_level(root, strict=strict, check_images=check_images)


def image_folder(ds: SourceDataset) -> pathlib.Path:
    """The folder holding a source's <ImageId>.jpg files."""
    return ds.root / (IMAGE_LEVEL_IMAGES if ds.kind == IMAGE_LEVEL else "train")


def _parse_class_ids(text: str, labels: LabelSpace) -> tuple[int, ...]:
    ids = set()
    for tok in text.split():
        try:
            cid = int(tok)
        except ValueError:
            raise DataError(f"non-integer ClassId: {tok[:30]!r}; ClassIds are category ids separated "
                            "by spaces") from None
        if not labels.has_category(cid):
            raise DataError(f"unknown ClassId: {cid} is not an iMaterialist category id "
                            f"({min(labels.category_ids)}..{max(labels.category_ids)})")
        ids.add(cid)
    return tuple(sorted(ids))


def read_image_level(root, *, strict: bool = False, check_images: bool = True) -> ImageLevelDataset:
    """Read root/labels.csv and (when check_images) list root/images/.

    The label space is the packaged iMaterialist 2020 one (an image-level folder has no
    label_descriptions.json). Bad rows become Problems and are skipped; strict=True raises at the first.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the image-level folder ({IMAGE_LEVEL_CSV}, images/)")
    csv_path = root / IMAGE_LEVEL_CSV
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found; an image-level folder needs {IMAGE_LEVEL_CSV} "
                        f"({','.join(IMAGE_LEVEL_COLUMNS)}) and {IMAGE_LEVEL_IMAGES}/<ImageId>.jpg")
    labels = LabelSpace.default()
    file = str(csv_path)
    problems = ProblemCollector(strict)
    rows: dict[str, tuple[int, tuple[int, ...]]] = {}   # image id -> (line, categories), in file order
    seen: set[str] = set()
    num_rows = 0
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{csv_path}: empty file; expected the header {','.join(IMAGE_LEVEL_COLUMNS)}")
            header = [h.strip() for h in header]
            missing = [c for c in IMAGE_LEVEL_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{csv_path}:1: header {','.join(header)[:200]!r} lacks column(s) "
                                f"{', '.join(missing)}; expected {','.join(IMAGE_LEVEL_COLUMNS)}")
            col = {name: header.index(name) for name in IMAGE_LEVEL_COLUMNS}
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                    continue  # blank line
                num_rows += 1
                image_id = None
                try:
                    if len(row) != len(header):
                        raise DataError(f"wrong column count: {len(row)} columns, expected {len(header)}")
                    image_id = row[col["ImageId"]].strip()
                    if not image_id:
                        raise DataError("empty ImageId: every row names the photo it labels")
                    check_image_id(image_id)
                    if image_id in rows:
                        raise DataError(f"duplicate ImageId: {image_id} is already labelled at line "
                                        f"{rows[image_id][0]}; give each photo one row")
                    seen.add(image_id)
                    categories = _parse_class_ids(row[col["ClassIds"]], labels)
                except DataError as e:
                    problems.add(Problem(file, line, image_id, str(e)))
                    continue
                rows[image_id] = (line, categories)
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a CSV "
                        f"with the header {','.join(IMAGE_LEVEL_COLUMNS)}") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}: malformed CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read ({e.strerror or e}); check the file and its permissions") from None

    image_dir = root / IMAGE_LEVEL_IMAGES
    existing = _existing_files(image_dir) if check_images else None
    records = []
    for image_id, (line, categories) in rows.items():
        path = image_dir / f"{image_id}.jpg"
        if existing is not None and path.name not in existing:
            problems.add(Problem(file, line, image_id, f"missing image file: {path} not found; row dropped"))
            continue
        records.append(ImageRecord(image_id=image_id, path=path, height=None, width=None, masks=(),
                                   categories=categories, attributes=()))
    problems.finish()
    ds = ImageLevelDataset(root=root, labels=labels, records=records, problems=problems.problems,
                           num_rows_read=num_rows, num_images_seen=len(seen))
    logger.info("%s", ds.summary().splitlines()[0])
    for rec in ds.unlabelled[:20]:
        logger.info("%s: photo %s has no labels; it goes to the unlabelled split only", file, rec.image_id)
    return ds


# ---- merging several sources -----------------------------------------------------------------------

@dataclass
class MergedSources:
    """Several read sources as one: labelled and unlabelled records, all problems, counts per source."""

    labels: LabelSpace
    labels_file: pathlib.Path       # where the label space came from (for messages)
    labelled: list[ImageRecord]
    unlabelled: list[ImageRecord]
    problems: list[Problem]
    counts: list[dict]              # per source: path, kind, images, labelled, unlabelled, rows_read, problems


def _labels_file(ds: SourceDataset) -> pathlib.Path:
    return ds.root / "label_descriptions.json" if ds.kind == KAGGLE else ds.root / IMAGE_LEVEL_CSV


def merge_sources(datasets) -> MergedSources:
    """Merge read sources; DataError when an ImageId is in two sources (naming both) or the label
    spaces differ, or when no source has a labelled image."""
    datasets = list(datasets)
    if not datasets:
        raise DataError("no source folder given; give at least one dataset folder")
    first = datasets[0]
    owner: dict[str, SourceDataset] = {}
    labelled, unlabelled, problems, counts = [], [], [], []
    for ds in datasets:
        if ds.labels != first.labels:
            raise DataError(f"{_labels_file(ds)}: its label space differs from that of {_labels_file(first)}; "
                            "sources merged into one dataset must use the same categories and attributes "
                            "(the iMaterialist 2020 label_descriptions.json)")
        for rec in ds.records:
            other = owner.get(rec.image_id)
            if other is not None:
                raise DataError(f"duplicate ImageId {rec.image_id!r}: in {other.root / other.csv_name} and in "
                                f"{ds.root / ds.csv_name}; ImageIds must be unique across sources (rename the "
                                "photo and its rows in one of them, or leave one source out)")
            owner[rec.image_id] = ds
            (labelled if rec.categories else unlabelled).append(rec)
        problems.extend(ds.problems)
        n_unlabelled = len(ds.unlabelled)
        counts.append({"path": str(ds.root), "kind": ds.kind, "images": len(ds.records),
                       "labelled": len(ds.records) - n_unlabelled, "unlabelled": n_unlabelled,
                       "rows_read": ds.num_rows_read, "problems": len(ds.problems)})
    if not labelled:
        where = ", ".join(str(ds.root / ds.csv_name) for ds in datasets)
        raise DataError(f"{where}: no usable labelled image (see the problems logged above); "
                        "train/validation need at least one photo with a category")
    return MergedSources(labels=first.labels, labels_file=_labels_file(first), labelled=labelled,
                         unlabelled=unlabelled, problems=problems, counts=counts)


__all__ = ["IMAGE_LEVEL", "KAGGLE", "KINDS", "ImageLevelDataset", "KaggleDataset", "MergedSources", "detect_kind",
           "image_folder", "merge_sources", "read_image_level", "read_source"]
