"""Garment instances from a Kaggle-layout folder's masks, and the padded crops training and serving both see.

One instance per mask row of train.csv: its category, attributes, parent photo, its 0-based
position ``k`` among that photo's rows (in train.csv order; the instance id is ``<ImageId>:<k>``),
the bounding box of the decoded mask and the mask's area. Garment-part categories (the
label space's supercategories "garment parts", "closures", "decorations": sleeve, zipper, bow ...)
are left out unless asked for; masks smaller than a fraction of the photo are skipped and counted.

Boxes are ``(x0, y0, x1, y1)`` in pixels of the photo as displayed (after EXIF orientation, the
orientation masks are drawn in), x1/y1 exclusive (PIL's crop convention). A crop is the box plus
context padding (a fraction of the box's width/height on every side), clamped at the photo's borders.

`decode_crop` is the one crop decoder: `imat data prepare --garments` and the engine call it with
the same (photo, box, size, mode, padding), so a garment model sees identical pixels in training
and in search. Its JPEG draft scale depends only on the crop (never on the photo's other garments),
and `decode_crops` decodes a photo once per distinct draft scale among its garments (usually once).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from imat.constants import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE_MODE
from imat.data_tools import images as _images
from imat.data_tools.kaggle import KaggleDataset, _parse_rle
from imat.data_tools.labels import LabelSpace
from imat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Supercategories of label_descriptions.json whose categories are parts of a garment, not garments.
PART_SUPERCATEGORIES = ("garment parts", "closures", "decorations")
DEFAULT_PADDING = 0.1              # context around the box: 10% of its width/height on each side
DEFAULT_MIN_AREA_FRACTION = 0.001  # masks below 0.1% of the photo are noise, not a garment to search for

Box = tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class GarmentOptions:
    """Which mask rows become garments, and how they are cropped (recorded in the prepared manifest)."""

    padding: float = DEFAULT_PADDING
    min_area_fraction: float = DEFAULT_MIN_AREA_FRACTION
    keep_parts: bool = False

    def __post_init__(self):
        if not (isinstance(self.padding, (int, float)) and 0.0 <= float(self.padding) <= 2.0):
            raise ConfigError(f"--crop-padding {self.padding!r}: give a fraction of the box side in [0, 2], e.g. 0.1")
        if not (isinstance(self.min_area_fraction, (int, float)) and 0.0 <= float(self.min_area_fraction) < 1.0):
            raise ConfigError(f"--min-mask-area {self.min_area_fraction!r}: give a fraction of the photo in [0, 1)")

    def to_manifest(self) -> dict:
        return {"garment_padding": float(self.padding), "garment_min_area_fraction": float(self.min_area_fraction),
                "garment_keep_parts": bool(self.keep_parts)}


@dataclasses.dataclass(frozen=True)
class Garment:
    """One mask row of train.csv as a garment instance."""

    image_id: str
    k: int                           # 0-based position among the photo's rows in train.csv
    path: pathlib.Path
    height: int                      # the photo's size (train.csv)
    width: int
    category_id: int
    attribute_ids: tuple[int, ...]
    box: Box                         # (x0, y0, x1, y1), x1/y1 exclusive
    area: int                        # mask pixels
    line: int                        # line of train.csv

    @property
    def id(self) -> str:
        return garment_id(self.image_id, self.k)


def garment_id(image_id: str, k: int) -> str:
    return f"{image_id}:{int(k)}"


@dataclasses.dataclass
class GarmentSet:
    """The garments of a Kaggle folder, with what was left out and why."""

    garments: list[Garment]
    labels: LabelSpace
    skipped_small: int = 0
    skipped_parts: int = 0
    skipped_empty: int = 0

    def counts(self) -> dict:
        return {"garments": len(self.garments), "skipped_small_masks": self.skipped_small,
                "skipped_part_masks": self.skipped_parts, "skipped_empty_masks": self.skipped_empty}

    def summary(self) -> str:
        return (f"{len(self.garments)} garments from {len({g.image_id for g in self.garments})} photos; "
                f"skipped {self.skipped_parts} garment-part masks, {self.skipped_small} masks below the area "
                f"threshold, {self.skipped_empty} empty masks")


def part_category_ids(labels: LabelSpace) -> frozenset[int]:
    """Category ids the label space marks as garment parts (by supercategory)."""
    return frozenset(c for c, s in zip(labels.category_ids, labels.category_supercategories)
                     if s.strip().lower() in PART_SUPERCATEGORIES)


# ---- boxes ------------------------------------------------------------------------------------

def rle_box(rle: str, height: int, width: int) -> tuple[Box | None, int]:
    """(bounding box, area) of a Kaggle RLE mask without decoding it; (None, 0) for an empty mask.

    Runs go down the columns (column-major), so a run of start s and length l covers columns
    s // H .. (s + l - 1) // H; a run crossing into another column covers every row of the box's
    height range it touches, i.e. rows 0 .. H-1 when it spans two columns or more.
    """
    starts, lengths = _parse_rle(rle, height, width)
    if starts.size == 0:
        return None, 0
    h = int(height)
    ends = starts + lengths - 1                      # last pixel of each run, inclusive
    col0, col1 = starts // h, ends // h
    multi = col1 > col0
    row_min = np.where(multi, 0, starts % h)
    row_max = np.where(multi, h - 1, ends % h)
    box = (int(col0.min()), int(row_min.min()), int(col1.max()) + 1, int(row_max.max()) + 1)
    return box, int(lengths.sum())


def padded_box(box: Sequence[int], width: int, height: int, padding: float = DEFAULT_PADDING) -> Box:
    """The box grown by `padding` x its width/height on each side, clamped to the photo (integers)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    px, py = padding * (x1 - x0), padding * (y1 - y0)
    return (max(0, math.floor(x0 - px)), max(0, math.floor(y0 - py)),
            min(int(width), math.ceil(x1 + px)), min(int(height), math.ceil(y1 + py)))


def check_box(box: Sequence, width: int, height: int, *, option: str = "--box", where: str = "") -> Box:
    """The box as integers, or ConfigError naming `option` when it is malformed, empty or outside the photo."""
    at = f" for {where}" if where else ""
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ConfigError(f"{option} {box!r}{at}: give four numbers x0,y0,x1,y1 (pixels)") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{option} {box!r}{at}: give four finite numbers x0,y0,x1,y1 (pixels)")
    x0, y0, x1, y1 = values
    if x1 < x0 or y1 < y0:
        raise ConfigError(f"{option} {_fmt(values)}{at}: x1 < x0 or y1 < y0; give x0,y0,x1,y1 with the top-left "
                          "corner first")
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ConfigError(f"{option} {_fmt(values)}{at}: zero area; the box must be at least 1 pixel wide and high")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ConfigError(f"{option} {_fmt(values)}{at}: outside the photo ({width}x{height} pixels, width x "
                          f"height); give a box within 0,0,{width},{height}")
    return (int(math.floor(x0)), int(math.floor(y0)), int(math.ceil(x1)), int(math.ceil(y1)))


def parse_box(text: str, *, option: str = "--box") -> tuple[float, float, float, float]:
    """'x0,y0,x1,y1' -> four floats; ConfigError naming the option otherwise (checked against a photo later)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{option} {text!r}: not four numbers; give x0,y0,x1,y1 in pixels, e.g. 10,20,200,400") \
            from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{option} {text!r}: give exactly four finite numbers x0,y0,x1,y1 in pixels")
    return values  # type: ignore[return-value]


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in values)


# ---- instances --------------------------------------------------------------------------------

def garments_of(ds: KaggleDataset, options: GarmentOptions = GarmentOptions()) -> GarmentSet:
    """Garment instances of a read Kaggle folder, in train.csv order; k counts every row of the photo
    that the reader kept (so ids do not change with the part or area options)."""
    parts = part_category_ids(ds.labels)
    out = GarmentSet(garments=[], labels=ds.labels)
    for rec in ds.records:
        if rec.height is None or not rec.masks:
            continue
        min_area = options.min_area_fraction * rec.height * rec.width
        for k, row in enumerate(rec.masks):
            if row.class_id in parts and not options.keep_parts:
                out.skipped_parts += 1
                continue
            box, area = rle_box(row.encoded_pixels, rec.height, rec.width)
            if box is None:
                out.skipped_empty += 1
                continue
            if area < min_area:
                out.skipped_small += 1
                continue
            out.garments.append(Garment(image_id=rec.image_id, k=k, path=rec.path, height=rec.height,
                                        width=rec.width, category_id=row.class_id, attribute_ids=row.attribute_ids,
                                        box=box, area=area, line=row.line))
    logger.info("%s: %s", ds.root, out.summary())
    return out


def read_garments(root, options: GarmentOptions = GarmentOptions(), *, strict: bool = False) -> GarmentSet:
    from imat.data_tools.kaggle import read_kaggle

    ds = read_kaggle(root, strict=strict)
    gs = garments_of(ds, options)
    if not gs.garments:
        raise DataError(f"{root}: no garments found ({gs.summary()}); garments come from the masks of train.csv")
    return gs


# ---- crops ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GarmentCrop:
    """An item to embed: a box of a photo (padded like prepare); `name` is how results call it."""

    path: pathlib.Path
    box: Box
    padding: float = DEFAULT_PADDING
    name: str | None = None

    def label(self) -> str:
        return self.name or f"{self.path}[{_fmt(self.box)}]"


def _draft_request(stored: tuple[int, int], swapped: bool, crop: Box, th: int, tw: int, mode: str) -> tuple[int, int]:
    """The full-photo size (stored orientation) to draft to so the crop still has what the resize needs."""
    sw, sh = stored
    dw, dh = (sh, sw) if swapped else (sw, sh)          # displayed size
    cw, ch = max(1, crop[2] - crop[0]), max(1, crop[3] - crop[1])
    nw, nh = _images._needed_size((cw, ch), th, tw, mode, False)
    fx = min(1.0, nw * _images.DRAFT_MARGIN / cw)
    fy = min(1.0, nh * _images.DRAFT_MARGIN / ch)
    f = max(fx, fy)   # one scale for both axes (JPEG draft scales both by the same factor)
    rw, rh = math.ceil(dw * f), math.ceil(dh * f)
    return (rh, rw) if swapped else (rw, rh)


def decode_crops(source, boxes: Sequence[Sequence[int]], size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
                 mode: str = DEFAULT_RESIZE_MODE, padding: float = DEFAULT_PADDING, *,
                 max_pixels: int = _images.DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """uint8[H, W, 3] crops of one photo (each box padded and clamped, then resized like decode_image).

    Boxes are in displayed full-resolution pixels. The photo is decoded once per distinct JPEG draft
    scale (the scale each crop would get alone), so every crop equals `decode_crop` of its box.
    """
    th, tw = _images._target_hw(size)
    _images._check_mode(mode)
    name, opener = _images._opener(source)
    out: list[np.ndarray | None] = [None] * len(boxes)
    with _images._as_decode_error(name):
        with opener() as fp, Image.open(fp) as probe:
            _images._check_pixels(probe, max_pixels, name)
            stored = probe.size
            orientation = _images._orientation(probe)
            is_jpeg = isinstance(probe, JpegImagePlugin.JpegImageFile)
        swapped = orientation in _images._SWAPS_AXES
        dw, dh = (stored[1], stored[0]) if swapped else stored
        crops = []
        for box in boxes:
            b = check_box(box, dw, dh, option="box", where=name)
            crops.append(padded_box(b, dw, dh, padding))
        groups: dict[tuple[int, int] | None, list[int]] = {}
        for i, crop in enumerate(crops):
            request = _draft_request(stored, swapped, crop, th, tw, mode) if is_jpeg else None
            groups.setdefault(request, []).append(i)
        for request, members in groups.items():
            with opener() as fp, Image.open(fp) as im:
                if request is not None:
                    im.draft("RGB", request)
                im.load()
                if orientation not in (None, 1):
                    im = ImageOps.exif_transpose(im)
                im = _images._to_rgb(im)
                fx, fy = im.size[0] / dw, im.size[1] / dh
                for i in members:
                    x0, y0, x1, y1 = crops[i]
                    scaled = (math.floor(x0 * fx), math.floor(y0 * fy),
                              max(math.floor(x0 * fx) + 1, min(im.size[0], math.ceil(x1 * fx))),
                              max(math.floor(y0 * fy) + 1, min(im.size[1], math.ceil(y1 * fy))))
                    out[i] = _images._finish(im.crop(scaled), th, tw, mode, name)
    return out  # type: ignore[return-value]


def decode_crop(source, box: Sequence[int], size: int | tuple[int, int] = DEFAULT_IMAGE_SIZE,
                mode: str = DEFAULT_RESIZE_MODE, padding: float = DEFAULT_PADDING, **kwargs) -> np.ndarray:
    """One padded crop of a photo, resized; the pixels `imat data prepare --garments` stores for that box."""
    return decode_crops(source, [box], size, mode, padding, **kwargs)[0]


def photo_size(path) -> tuple[int, int]:
    """(width, height) of a photo as displayed; ImageDecodeError when unreadable."""
    return _images.read_image_size(path)


def crops_of(gs: GarmentSet, padding: float | None = None) -> list[GarmentCrop]:
    """The engine's items for a garment set (named by garment id)."""
    pad = DEFAULT_PADDING if padding is None else float(padding)
    return [GarmentCrop(path=g.path, box=g.box, padding=pad, name=g.id) for g in gs.garments]


__all__ = ["Garment", "GarmentCrop", "GarmentOptions", "GarmentSet", "PART_SUPERCATEGORIES", "check_box",
           "crops_of", "decode_crop", "decode_crops", "garment_id", "garments_of", "padded_box", "parse_box",
           "part_category_ids", "photo_size", "read_garments", "rle_box"]
