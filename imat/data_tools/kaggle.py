"""Read a Kaggle iMaterialist Fashion 2020 folder: train.csv, label_descriptions.json, train/<ImageId>.jpg.

Also Kaggle's run-length encoding of masks ("start length" pairs, 1-indexed, column-major),
vectorised with numpy, and `list_images` for plain folders of images.

Bad rows never stop a non-strict read: each becomes a `Problem` (file, line, image, reason), is
logged and skipped, and `KaggleDataset.summary()` counts them by reason. A reason always starts
with its kind ("bad RLE: ...", "unknown ClassId: ..."), which is what the summary groups by.
`Problem`, `ProblemCollector`, `SourceDataset` and `check_image_id` are the reporting mechanism every
source reader shares (see `imat.data_tools.sources` for the image-level reader).
"""

from __future__ import annotations

import collections
import csv
import logging
import pathlib
import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from imat.data_tools.images import image_extensions, read_image_size
from imat.data_tools.labels import LabelSpace
from imat.errors import DataError, ImageDecodeError

logger = logging.getLogger(__name__)

COLUMNS = ("ImageId", "EncodedPixels", "Height", "Width", "ClassId", "AttributesIds")
REQUIRED_COLUMNS = COLUMNS[:5]  # AttributesIds may be absent (then every row has none)
IMAGE_EXTENSIONS = image_extensions()  # what the installed Pillow opens (imat.data_tools.images)
MAX_LOGGED_PROBLEMS = 20

# EncodedPixels of a large mask can exceed the csv module's default field limit (131072 chars).
# The limit is process-global in the csv module, so raising it is unavoidable; we only ever raise it.
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


# ---- run-length encoding ---------------------------------------------------------------------------

_WHITESPACE = np.array([ord(c) for c in " \t\r\n"], np.uint8)


def _parse_ints(rle: str) -> np.ndarray:
    """Whitespace-separated non-negative integers, parsed without a Python loop per token."""
    buf = np.frombuffer(rle.encode("latin-1", errors="replace"), np.uint8)
    is_digit = (buf >= ord("0")) & (buf <= ord("9"))
    if not (is_digit | np.isin(buf, _WHITESPACE)).all():
        bad = next((t for t in rle.split() if not t.isdigit()), rle.split()[0])
        if bad.startswith("-") and bad[1:].isdigit():
            raise DataError(f"bad RLE: {bad} is negative; starts and lengths are positive integers")
        raise DataError(f"bad RLE: {bad[:20]!r} is not an integer")
    edges = np.flatnonzero(np.diff(is_digit.astype(np.int8), prepend=0, append=0))
    token_lengths = edges[1::2] - edges[0::2]
    if token_lengths.size and token_lengths.max() > 18:  # would overflow int64
        raise DataError("bad RLE: a value has more than 18 digits")
    # Only digits and whitespace are present, so numpy's text parser reads every token.
    values = np.fromstring(rle, dtype=np.int64, sep=" ")
    if values.size != token_lengths.size:  # cannot happen after the checks above; never trust silently
        raise DataError("bad RLE: could not parse every value")
    return values


def _parse_rle(rle: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated (starts, lengths), 0-indexed starts; raises DataError('bad RLE: ...')."""
    values = _parse_ints(rle)
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if values.size % 2:
        raise DataError(f"bad RLE: odd number of values ({values.size}); expected 'start length' pairs")
    starts, lengths = values[0::2] - 1, values[1::2]
    total = int(height) * int(width)
    if starts.min() < 0:
        i = int(np.argmax(starts < 0))
        raise DataError(f"bad RLE: start {starts[i] + 1} (pair {i + 1}) is not positive; starts are 1-indexed")
    if lengths.min() <= 0:
        i = int(np.argmax(lengths <= 0))
        raise DataError(f"bad RLE: run length {lengths[i]} (pair {i + 1}) is not positive")
    ends = starts + lengths
    if len(starts) > 1:
        overlap = starts[1:] < ends[:-1]
        if overlap.any():
            i = int(np.argmax(overlap)) + 1
            raise DataError(f"bad RLE: runs are unsorted or overlap (pair {i + 1} starts at {starts[i] + 1}, "
                            f"before the previous run ends at {ends[i - 1]})")
    if ends[-1] > total:
        raise DataError(f"bad RLE: last run ends at pixel {ends[-1]}, past Height*Width = "
                        f"{height}*{width} = {total}")
    return starts, lengths


def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """Decode Kaggle RLE to a uint8[height, width] mask of {0, 1}; DataError on malformed input."""
    starts, lengths = _parse_rle(rle, height, width)
    total = int(height) * int(width)
    # Alternate gap / run lengths and repeat 0 / 1 by them: one pass, no per-pixel work in Python.
    ends = starts + lengths
    counts = np.empty(2 * len(starts) + 1, np.int64)
    counts[0:-1:2] = starts - np.concatenate(([0], ends[:-1]))  # gap before each run
    counts[1::2] = lengths
    counts[-1] = total - (ends[-1] if len(ends) else 0)
    values = np.zeros(counts.size, np.uint8)
    values[1::2] = 1
    flat = np.repeat(values, counts)
    # Column-major: the flat index runs down each column first.
    return np.ascontiguousarray(flat.reshape(int(width), int(height)).T)


def rle_encode(mask: np.ndarray) -> str:
    """Encode a 2-D mask (nonzero = set) as Kaggle RLE; "" for an empty mask. Inverse of rle_decode."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode needs a 2-D mask, got shape {mask.shape}")
    flat = np.zeros(mask.size + 2, np.int8)
    flat[1:-1] = mask.ravel(order="F") != 0
    # Positions where the value changes: alternately a run start and a run end (1-indexed thanks to the pad).
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    change[1::2] -= change[0::2]
    return " ".join(map(str, change.tolist()))


# ---- records -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskRow:
    """One row of train.csv: a mask of one class (and its attributes) in one image."""

    line: int
    class_id: int
    attribute_ids: tuple[int, ...]
    encoded_pixels: str

    def decode(self, height: int, width: int) -> np.ndarray:
        return rle_decode(self.encoded_pixels, height, width)


@dataclass(frozen=True)
class ImageRecord:
    """One image with its labels: what the prepare step consumes, whatever the kind of source.

    Kaggle records carry their valid mask rows and the size train.csv gives; image-level records
    (labels.csv) have no masks, no attributes and height = width = None (read from the image later).
    """

    image_id: str
    path: pathlib.Path
    height: int | None
    width: int | None
    masks: tuple[MaskRow, ...]
    categories: tuple[int, ...]
    attributes: tuple[int, ...]


@dataclass(frozen=True)
class Problem:
    """A row (or image) that was skipped; `reason` starts with its kind, e.g. 'bad RLE: ...'."""

    file: str
    line: int | None
    image_id: str | None
    reason: str

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.reason}"


@dataclass
class SourceDataset:
    """A read source folder: valid image records (in order of first appearance) and the problems met.

    Subclasses name their kind ("kaggle", "image-level") and their CSV; the rest is shared.
    """

    root: pathlib.Path
    labels: LabelSpace
    records: list[ImageRecord]
    problems: list[Problem]
    num_rows_read: int = 0       # data rows in the CSV (excluding the header and blank lines)
    num_images_seen: int = 0     # distinct ImageIds met in the CSV

    kind: ClassVar[str] = ""
    csv_name: ClassVar[str] = ""
    has_masks: ClassVar[bool] = True     # masks and attributes (Kaggle), or image-level labels only

    def category_matrix(self) -> np.ndarray:
        out = np.zeros((len(self.records), self.labels.num_categories), np.float32)
        for i, rec in enumerate(self.records):
            out[i] = self.labels.categories_to_multihot(rec.categories)
        return out

    def attribute_matrix(self) -> np.ndarray:
        out = np.zeros((len(self.records), self.labels.num_attributes), np.float32)
        for i, rec in enumerate(self.records):
            out[i] = self.labels.attributes_to_multihot(rec.attributes)
        return out

    @property
    def num_rows_kept(self) -> int:
        return sum(len(r.masks) for r in self.records)

    @property
    def unlabelled(self) -> list[ImageRecord]:
        """Records without any category (kept out of supervised splits)."""
        return [r for r in self.records if not r.categories]

    def _headline(self) -> str:
        raise NotImplementedError

    def _dropped(self) -> str:
        raise NotImplementedError

    def summary(self) -> str:
        lines = [self._headline()]
        if not self.problems:
            lines.append("no problems found")
            return "\n".join(lines)
        lines.append(f"{self._dropped()}; {len(self.problems)} problems by reason:")
        counts = collections.Counter(p.kind for p in self.problems)
        for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            first = next(p for p in self.problems if p.kind == kind)
            lines.append(f"  {kind}: {n} (first: {first})")
        return "\n".join(lines)


@dataclass
class KaggleDataset(SourceDataset):
    """A read Kaggle folder (train.csv with one row per mask)."""

    kind: ClassVar[str] = "kaggle"
    csv_name: ClassVar[str] = "train.csv"

    def _headline(self) -> str:
        return (f"{self.root}: {len(self.records)} images and {self.num_rows_kept} mask rows read "
                f"(of {self.num_images_seen} images, {self.num_rows_read} rows in train.csv)")

    def _dropped(self) -> str:
        return (f"dropped {self.num_rows_read - self.num_rows_kept} rows and "
                f"{self.num_images_seen - len(self.records)} images")


# ---- reader ------------------------------------------------------------------------------------------

class ProblemCollector:
    """Collects problems; raises at the first one in strict mode; logs a capped number."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: list[Problem] = []

    def add(self, problem: Problem) -> None:
        if self.strict:
            raise DataError(f"{problem} (strict mode stops at the first problem; "
                            "fix the file or rerun without --strict to skip bad rows)")
        self.problems.append(problem)
        if len(self.problems) <= MAX_LOGGED_PROBLEMS:
            logger.warning("skipped: %s", problem)

    def finish(self) -> None:
        extra = len(self.problems) - MAX_LOGGED_PROBLEMS
        if extra > 0:
            logger.warning("... and %d more problems (not logged; see the summary)", extra)


def _parse_int(text: str, what: str, positive: bool = True) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise DataError(f"non-integer {what}: {text[:30]!r}") from None
    if positive and value <= 0:
        raise DataError(f"non-positive {what}: {value}")
    return value


_SEPARATORS = tuple({"/", "\\", os.sep, os.altsep or "/"})


def check_image_id(image_id: str) -> None:
    """DataError('bad ImageId: ...') unless image_id is a plain file name stem (ids are names, not paths)."""
    if any(sep in image_id for sep in _SEPARATORS) or ".." in image_id or os.path.isabs(image_id):
        raise DataError(f"bad ImageId: {image_id[:60]!r} is a path; an ImageId is a plain name "
                        "(no '/', '\\' or '..'), the image being <ImageId>.jpg in the image folder")
    if "\x00" in image_id or not image_id.isprintable():
        raise DataError(f"bad ImageId: {image_id[:60]!r} has control characters; an ImageId is a plain name")


def _header_size_mismatch(path: pathlib.Path, height: int, width: int) -> str | None:
    """None when the image's header agrees with (height, width), else the size it has.

    Reads the header only (PIL opens lazily, nothing is decoded). A file PIL cannot open is left
    to the decoder, which reports it as a corrupt image where it is decoded.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    if (h, w) == (height, width):
        return None
    try:  # train.csv may give the size as displayed, after the EXIF orientation: accept that too
        dw, dh = read_image_size(path)
    except ImageDecodeError:
        dw, dh = w, h
    if (dh, dw) == (height, width):
        return None
    return f"{h}x{w}" if (dh, dw) == (h, w) else f"{h}x{w} ({dh}x{dw} after EXIF orientation)"


def _read_labels(root: pathlib.Path) -> LabelSpace:
    path = root / "label_descriptions.json"
    if not path.is_file():
        raise DataError(f"{path}: not found; a Kaggle folder needs train.csv, label_descriptions.json and "
                        "train/<ImageId>.jpg (copy label_descriptions.json from the iMaterialist 2020 download)")
    return LabelSpace.from_json(path)


def read_kaggle(root, *, strict: bool = False, check_images: bool = True,
                validate_rle: bool = True) -> KaggleDataset:
    """Read root/train.csv, root/label_descriptions.json and (when check_images) root/train/*.jpg.

    Bad rows are recorded as Problems and skipped; strict=True raises DataError at the first one.
    validate_rle=False skips RLE checks (faster on the full Kaggle set; masks are then decoded unchecked
    later, where rle_decode still raises on malformed input).
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the Kaggle dataset folder "
                        "(with train.csv, label_descriptions.json, train/)")
    labels = _read_labels(root)
    csv_path = root / "train.csv"
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: not found; a Kaggle folder needs train.csv "
                        "(ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds)")
    file = str(csv_path)
    problems = ProblemCollector(strict)

    rows_by_image: dict[str, list[MaskRow]] = {}
    size_by_image: dict[str, tuple[int, int, int]] = {}  # image -> (height, width, line first seen)
    first_line: dict[str, int] = {}
    num_rows = 0

    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{csv_path}: empty file; expected the header {','.join(COLUMNS)}")
            header = [h.strip() for h in header]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{csv_path}:1: header {','.join(header)[:200]!r} lacks column(s) "
                                f"{', '.join(missing)}; expected {','.join(COLUMNS)}")
            col = {name: header.index(name) for name in COLUMNS if name in header}
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                num_rows += 1
                image_id = row[0].strip() if len(row) == len(header) else None
                try:
                    if [c.strip() for c in row] == header:
                        image_id = None
                        raise DataError("duplicate header line: the header repeats in the middle of the file "
                                        "(files concatenated?)")
                    if len(row) != len(header):
                        raise DataError(f"wrong column count: {len(row)} columns, expected {len(header)}")
                    image_id = row[col["ImageId"]].strip()
                    if not image_id:
                        raise DataError("empty ImageId: every row needs the image it belongs to")
                    check_image_id(image_id)
                    first_line.setdefault(image_id, line)
                    height = _parse_int(row[col["Height"]], "Height")
                    width = _parse_int(row[col["Width"]], "Width")
                    known = size_by_image.get(image_id)
                    if known and known[:2] != (height, width):
                        raise DataError(f"inconsistent Height/Width: {height}x{width} here but "
                                        f"{known[0]}x{known[1]} at line {known[2]} for image {image_id}")
                    class_id = _parse_int(row[col["ClassId"]], "ClassId", positive=False)
                    if not labels.has_category(class_id):
                        raise DataError(f"unknown ClassId: {class_id} is not in label_descriptions.json")
                    attr_text = row[col["AttributesIds"]] if "AttributesIds" in col else ""
                    attrs = []
                    for tok in attr_text.split(","):
                        if tok.strip():
                            a = _parse_int(tok, "attribute id", positive=False)
                            if not labels.has_attribute(a):
                                raise DataError(f"unknown attribute id: {a} is not in label_descriptions.json")
                            attrs.append(a)
                    rle = row[col["EncodedPixels"]].strip()
                    if validate_rle:
                        _parse_rle(rle, height, width)
                except DataError as e:
                    problems.add(Problem(file, line, image_id, str(e)))
                    continue
                size_by_image.setdefault(image_id, (height, width, line))
                rows_by_image.setdefault(image_id, []).append(
                    MaskRow(line=line, class_id=class_id, attribute_ids=tuple(sorted(set(attrs))),
                            encoded_pixels=rle))
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                        "is this really the Kaggle train.csv?") from None
    except csv.Error as e:
        raise DataError(f"{csv_path}: malformed CSV ({e}); is this really the Kaggle train.csv?") from None
    except OSError as e:
        raise DataError(f"{csv_path}: cannot read ({e.strerror or e}); check the file and its permissions") from None

    records = []
    image_dir = root / "train"
    existing = _existing_files(image_dir) if check_images else None
    for image_id, masks in rows_by_image.items():
        path = image_dir / f"{image_id}.jpg"
        if existing is not None and path.name not in existing:
            problems.add(Problem(file, first_line[image_id], image_id,
                                 f"missing image file: {path} not found; its {len(masks)} rows dropped"))
            continue
        height, width, size_line = size_by_image[image_id]
        if existing is not None:
            real = _header_size_mismatch(path, height, width)
            if real is not None:
                problems.add(Problem(file, size_line, image_id,
                                     f"wrong Height/Width: {height}x{width} in train.csv but {path.name} is "
                                     f"{real} (height x width); its {len(masks)} rows dropped (masks would "
                                     "not fit the image)"))
                continue
        records.append(ImageRecord(
            image_id=image_id, path=path, height=height, width=width, masks=tuple(masks),
            categories=tuple(sorted({m.class_id for m in masks})),
            attributes=tuple(sorted({a for m in masks for a in m.attribute_ids})),
        ))
    problems.finish()
    ds = KaggleDataset(root=root, labels=labels, records=records, problems=problems.problems,
                       num_rows_read=num_rows, num_images_seen=len(first_line))
    logger.info("%s", ds.summary().splitlines()[0])
    return ds


def _existing_files(folder: pathlib.Path) -> set[str]:
    """Names in a folder, listed once (one stat per image would be slow on 45k images over NFS)."""
    try:
        return {p.name for p in folder.iterdir()}
    except FileNotFoundError:
        return set()
    except OSError as e:
        raise DataError(f"{folder}: cannot list the image folder ({e.strerror or e})") from None


def list_images(folder) -> list[pathlib.Path]:
    """Image files (by extension, case-insensitive) directly inside a folder, sorted by name."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    images, skipped = [], []
    for p in folder.iterdir():
        if p.name.startswith("."):  # hidden files, macOS '._x.jpg' resource forks
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            images.append(p)
        else:
            skipped.append(p.name)
    if skipped:
        logger.info("%s: ignored %d non-image entries (e.g. %s)", folder, len(skipped), ", ".join(sorted(skipped)[:3]))
    return sorted(images, key=lambda p: p.name)
