"""A synthetic fashion dataset in the exact Kaggle iMaterialist 2020 layout (for the demo and the tests).

    out/train.csv                  ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds
    out/label_descriptions.json    the real 46 categories / 294 attributes
    out/train/<32-hex ImageId>.jpg

Each image shows one stylised figure wearing an outfit drawn from `CO_OCCURRENCE_TEMPLATES`
(dress + neckline + shoe, top + pants + shoe + bag, ...), with garment parts (sleeve, collar,
lapel, pocket, zipper, ...) placed on their garments and a few accessories and decorations.
Labels are learnable from pixels: every category has its own silhouette, hue and texture
(`category_style`), drawn with mild jitter over a varied background. Masks are the *visible*
pixels of each instance after occlusion by later ones, so the masks of one image are disjoint.

Drawing happens at a working resolution (long side <= WORK_LONG_SIDE) and is upscaled; the
instance-label map is upscaled with nearest neighbour, so masks are exact at the final size.
Output is a pure function of the seed (per-image generators seeded by (seed, index)).
"""

from __future__ import annotations

import colorsys
import csv
import hashlib
import io
import json
import logging
import math
import pathlib
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from imat.fileio import atomic_write_bytes
from imat.data_tools.kaggle import COLUMNS, rle_encode
from imat.data_tools.labels import LabelSpace
from imat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

WORK_LONG_SIDE = 480  # drawing resolution; the CNN sees 64-128 px, so more detail buys nothing
TEXTURES = ("solid", "stripes", "dots", "checks")
MIN_VISIBLE_FRACTION = 2e-5  # instances whose visible area is below this share of the image are dropped
MIN_VISIBLE_PIXELS = 6

# ---- shapes: polygons in a unit box (x right, y down) ---------------------------------------------------


def _ellipse(n: int = 28, start: float = 0.0, stop: float = 2 * math.pi) -> tuple[tuple[float, float], ...]:
    ts = np.linspace(start, stop, n, endpoint=(stop - start) < 2 * math.pi - 1e-9)
    return tuple((0.5 + 0.5 * math.cos(t), 0.5 + 0.5 * math.sin(t)) for t in ts)


def _star(points: int, inner: float) -> tuple[tuple[float, float], ...]:
    out = []
    for k in range(2 * points):
        r = 0.5 if k % 2 == 0 else 0.5 * inner
        t = -math.pi / 2 + k * math.pi / points
        out.append((0.5 + r * math.cos(t), 0.5 + r * math.sin(t)))
    return tuple(out)


def _zigzag(teeth: int) -> tuple[tuple[float, float], ...]:
    pts = [(0.0, 0.0), (1.0, 0.0)]
    for k in range(teeth, -1, -1):
        pts.append((k / teeth, 1.0 if k % 2 == 0 else 0.55))
    return tuple(pts)


SHAPES: dict[str, tuple[tuple[float, float], ...]] = {
    "rect": ((0, 0), (1, 0), (1, 1), (0, 1)),
    "shirt": ((0.12, 0), (0.88, 0), (1, 0.22), (0.95, 1), (0.05, 1), (0, 0.22)),
    "boxy": ((0.04, 0), (0.96, 0), (1, 1), (0, 1)),
    "sweater": ((0.2, 0), (0.8, 0), (1, 0.15), (1, 0.9), (0.9, 1), (0.1, 1), (0, 0.9), (0, 0.15)),
    "open_front": ((0, 0), (0.3, 0), (0.5, 0.75), (0.7, 0), (1, 0), (1, 1), (0, 1)),
    "jacket": ((0, 0.05), (0.32, 0), (0.5, 0.6), (0.68, 0), (1, 0.05), (1, 1), (0.55, 1), (0.5, 0.85),
               (0.45, 1), (0, 1)),
    "vest": ((0, 0), (0.28, 0), (0.5, 0.45), (0.72, 0), (1, 0), (0.92, 1), (0.08, 1)),
    "pants": ((0, 0), (1, 0), (1, 1), (0.58, 1), (0.5, 0.22), (0.42, 1), (0, 1)),
    "shorts": ((0, 0), (1, 0), (1.0, 1), (0.56, 1), (0.5, 0.45), (0.44, 1), (0, 1)),
    "skirt": ((0.22, 0), (0.78, 0), (1, 1), (0, 1)),
    "coat": ((0.12, 0), (0.88, 0), (1, 0.15), (1, 1), (0.56, 1), (0.5, 0.35), (0.44, 1), (0, 1), (0, 0.15)),
    "dress": ((0.3, 0), (0.7, 0), (0.66, 0.38), (1, 1), (0, 1), (0.34, 0.38)),
    "jumpsuit": ((0.08, 0), (0.92, 0), (0.95, 0.42), (1, 1), (0.57, 1), (0.5, 0.5), (0.43, 1), (0, 1),
                 (0.05, 0.42)),
    "triangle": ((0.5, 0), (1, 1), (0, 1)),
    "ellipse": _ellipse(),
    "lens": ((0, 0.1), (0.45, 0.1), (0.5, 0.35), (0.55, 0.1), (1, 0.1), (0.95, 0.9), (0.6, 0.9), (0.5, 0.5),
             (0.4, 0.9), (0.05, 0.9)),
    "hat": ((0, 1), (0.22, 0.62), (0.3, 0), (0.7, 0), (0.78, 0.62), (1, 1)),
    "band": ((0, 1), (0.15, 0.2), (0.5, 0), (0.85, 0.2), (1, 1), (0.85, 0.6), (0.5, 0.45), (0.15, 0.6)),
    "tie": ((0.3, 0), (0.7, 0), (0.6, 0.15), (1, 0.85), (0.5, 1), (0, 0.85), (0.4, 0.15)),
    "mitten": ((0.2, 0), (0.8, 0), (1, 0.5), (0.8, 1), (0.2, 1), (0, 0.6), (0.15, 0.4)),
    "octagon": ((0.3, 0), (0.7, 0), (1, 0.3), (1, 0.7), (0.7, 1), (0.3, 1), (0, 0.7), (0, 0.3)),
    "sock": ((0, 0), (0.6, 0), (0.6, 0.55), (1, 0.6), (1, 1), (0, 1)),
    "shoe": ((0, 0.15), (0.45, 0), (0.55, 0.45), (1, 0.55), (1, 1), (0, 1)),
    "bag": ((0.12, 0.3), (0.3, 0.3), (0.35, 0), (0.65, 0), (0.7, 0.3), (0.88, 0.3), (1, 1), (0, 1)),
    "parallelogram": ((0.3, 0), (1, 0), (0.7, 1), (0, 1)),
    "umbrella": _ellipse(20, math.pi, 2 * math.pi) + ((0.52, 0.5), (0.52, 1), (0.48, 1), (0.48, 0.5)),
    "collar": ((0, 0), (1, 0), (0.85, 1), (0.5, 0.35), (0.15, 1)),
    "lapel": ((0.25, 0), (1, 0), (0.95, 0.25), (0.45, 1), (0, 0.55)),
    "sleeve": ((0.35, 0), (1, 0), (0.75, 1), (0, 1)),
    "pocket": ((0, 0), (1, 0), (1, 0.72), (0.5, 1), (0, 0.72)),
    "neckline": ((0, 0), (1, 0), (0.5, 1)),
    "thin": ((0.3, 0), (0.7, 0), (0.7, 1), (0.3, 1)),
    "star5": _star(5, 0.45),
    "star8": _star(8, 0.6),
    "bow": ((0, 0), (0.5, 0.38), (1, 0), (1, 1), (0.5, 0.62), (0, 1)),
    "zigzag": _zigzag(8),
    "diamond": ((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)),
    "hexagon": ((0.25, 0), (0.75, 0), (1, 0.5), (0.75, 1), (0.25, 1), (0, 0.5)),
    "wave": tuple((k / 10, 0.25 * (k % 2)) for k in range(11)) + tuple((1 - k / 10, 1 - 0.25 * (k % 2))
                                                                        for k in range(11)),
    "cross": ((0.35, 0), (0.65, 0), (0.65, 0.35), (1, 0.35), (1, 0.65), (0.65, 0.65), (0.65, 1), (0.35, 1),
              (0.35, 0.65), (0, 0.65), (0, 0.35), (0.35, 0.35)),
}

# Silhouette per category id (0..45); several share a silhouette but never a colour.
CATEGORY_SHAPES: dict[int, str] = {
    0: "shirt", 1: "boxy", 2: "sweater", 3: "open_front", 4: "jacket", 5: "vest", 6: "pants", 7: "shorts",
    8: "skirt", 9: "coat", 10: "dress", 11: "jumpsuit", 12: "triangle", 13: "lens", 14: "hat", 15: "band",
    16: "tie", 17: "mitten", 18: "octagon", 19: "rect", 20: "rect", 21: "pants", 22: "sock", 23: "shoe",
    24: "bag", 25: "parallelogram", 26: "umbrella", 27: "ellipse", 28: "collar", 29: "lapel", 30: "rect",
    31: "sleeve", 32: "pocket", 33: "neckline", 34: "octagon", 35: "thin", 36: "star5", 37: "ellipse",
    38: "bow", 39: "star8", 40: "zigzag", 41: "wave", 42: "diamond", 43: "wave", 44: "hexagon",
    45: "triangle",
}

GARMENTS = tuple(range(0, 13))
UPPER = (0, 1, 2, 3, 4, 5)
DECORATIONS = tuple(range(36, 46))

# Where each category sits on the figure: (x0, y0, x1, y1) in figure units (0..1 across the figure's
# box; y = 0 top of the head, 1 the soles). Several entries = several instances (left / right).
FIGURE_REGIONS: dict[int, tuple[tuple[float, float, float, float], ...]] = {
    0: ((0.27, 0.14, 0.73, 0.47),), 1: ((0.27, 0.14, 0.73, 0.47),), 2: ((0.26, 0.14, 0.74, 0.48),),
    3: ((0.25, 0.14, 0.75, 0.5),), 4: ((0.25, 0.13, 0.75, 0.49),), 5: ((0.28, 0.14, 0.72, 0.45),),
    6: ((0.3, 0.45, 0.7, 0.92),), 7: ((0.3, 0.45, 0.7, 0.62),), 8: ((0.27, 0.45, 0.73, 0.7),),
    9: ((0.23, 0.13, 0.77, 0.75),), 10: ((0.24, 0.14, 0.76, 0.74),), 11: ((0.27, 0.14, 0.73, 0.92),),
    12: ((0.15, 0.11, 0.85, 0.6),),
    13: ((0.41, 0.045, 0.59, 0.08),), 14: ((0.33, -0.01, 0.67, 0.06),), 15: ((0.39, 0.005, 0.61, 0.04),),
    16: ((0.465, 0.145, 0.535, 0.36),), 17: ((0.07, 0.47, 0.19, 0.55), (0.81, 0.47, 0.93, 0.55)),
    18: ((0.09, 0.44, 0.18, 0.47),), 19: ((0.28, 0.44, 0.72, 0.475),), 20: ((0.31, 0.74, 0.69, 0.86),),
    21: ((0.31, 0.6, 0.69, 0.93),), 22: ((0.31, 0.85, 0.48, 0.93), (0.52, 0.85, 0.69, 0.93)),
    23: ((0.26, 0.915, 0.48, 0.995), (0.52, 0.915, 0.74, 0.995)), 24: ((0.76, 0.42, 0.99, 0.6),),
    25: ((0.36, 0.11, 0.64, 0.3),), 26: ((0.55, 0.0, 1.0, 0.2),), 27: ((0.33, -0.005, 0.67, 0.17),),
    31: ((0.09, 0.15, 0.27, 0.46), (0.73, 0.15, 0.91, 0.46)),
}

# Garment parts: (x0, y0, x1, y1) in units of their parent garment's box.
PART_REGIONS: dict[int, tuple[tuple[float, float, float, float], ...]] = {
    28: ((0.3, 0.0, 0.7, 0.1),), 29: ((0.12, 0.02, 0.34, 0.42), (0.66, 0.02, 0.88, 0.42)),
    30: ((0.0, 0.0, 0.22, 0.05), (0.78, 0.0, 1.0, 0.05)), 32: ((0.12, 0.6, 0.36, 0.8),),
    33: ((0.38, 0.0, 0.62, 0.13),), 34: ((0.42, 0.0, 0.58, 1.0),), 35: ((0.48, 0.05, 0.52, 0.95),),
}
MIRRORED = {17, 22, 23, 29, 31}  # second instance drawn mirrored


@dataclass(frozen=True)
class Template:
    """An outfit: one category from each `slots` entry (all drawn), then optional parts and extras.

    `parts` are garment parts placed on the outermost upper garment; `extras` are accessories.
    `decorations` is the probability of 1-2 decorations on a random garment.
    """

    name: str
    weight: float
    slots: tuple[tuple[int, ...], ...]
    parts: tuple[tuple[int, float], ...] = ()
    extras: tuple[tuple[int, float], ...] = ()
    decorations: float = 0.25

    @property
    def required(self) -> frozenset[int]:
        """Categories present in every image of this template (single-choice slots, probability-1 parts)."""
        req = {s[0] for s in self.slots if len(s) == 1}
        req |= {c for c, p in self.parts + self.extras if p >= 1.0}
        return frozenset(req)

    @property
    def possible(self) -> frozenset[int]:
        out = {c for s in self.slots for c in s} | {c for c, _ in self.parts + self.extras}
        if self.decorations > 0:
            out |= set(DECORATIONS)
        if any(c in (19,) for c in out):
            out.add(34)  # buckle rides on a belt
        return frozenset(out)


CO_OCCURRENCE_TEMPLATES: tuple[Template, ...] = (
    Template("dress", 3.0, ((10,), (23,)), parts=((33, 1.0), (31, 0.6), (28, 0.15)),
             extras=((24, 0.5), (19, 0.3), (13, 0.2), (14, 0.15), (15, 0.15), (18, 0.15), (21, 0.15)),
             decorations=0.4),
    Template("top_pants", 3.0, ((0, 1, 2), (6,), (23,), (24,)),
             parts=((31, 0.8), (33, 0.6), (28, 0.25), (32, 0.2)),
             extras=((19, 0.3), (13, 0.2), (18, 0.2), (14, 0.1), (25, 0.1))),
    Template("jacket_skirt", 2.0, ((4, 3), (1, 0), (8,), (21,), (23,)),
             parts=((31, 0.9), (29, 0.6), (32, 0.5), (35, 0.2)),
             extras=((24, 0.4), (25, 0.2), (15, 0.15), (22, 0.1))),
    Template("coat_pants", 2.0, ((9,), (6,), (23,), (13, 14)),
             parts=((31, 0.9), (32, 0.6), (28, 0.4), (35, 0.3), (27, 0.2), (30, 0.1)),
             extras=((25, 0.3), (17, 0.25), (26, 0.1), (24, 0.3)), decorations=0.1),
    Template("jumpsuit", 1.0, ((11,), (23,)), parts=((31, 0.5), (33, 0.6), (32, 0.3)),
             extras=((19, 0.5), (24, 0.3), (14, 0.2), (18, 0.2))),
    Template("shorts", 1.5, ((1, 5), (7,), (23,)), parts=((31, 0.5), (33, 0.5)),
             extras=((22, 0.5), (14, 0.3), (13, 0.3), (18, 0.3), (24, 0.2), (20, 0.1))),
    Template("suit", 1.0, ((4,), (0,), (6,), (23,), (16,)), parts=((29, 1.0), (31, 0.9), (32, 0.5), (28, 0.3)),
             extras=((18, 0.4), (19, 0.4), (13, 0.2)), decorations=0.05),
    Template("cape", 0.7, ((12,), (0, 2), (6, 8), (23,)), parts=((27, 0.3), (33, 0.3)),
             extras=((14, 0.3), (17, 0.3), (20, 0.2), (26, 0.15))),
)

# Drawing order (back to front): earlier categories are occluded by later ones.
Z_ORDER: tuple[int, ...] = (
    26, 27, 21, 20, 22, 6, 7, 8, 23, 11, 1, 0, 2, 10, 5, 3, 4, 9, 12, 19, 34, 31, 28, 33, 29, 30, 35, 32,
    *DECORATIONS, 16, 25, 24, 17, 18, 14, 15, 13,
)
_Z_RANK = {c: i for i, c in enumerate(Z_ORDER)}

# Plausible attribute ids per category (filtered against the label space at use).
_R = lambda a, b: tuple(range(a, b + 1))  # noqa: E731
ATTRIBUTE_POOLS: dict[int, tuple[int, ...]] = {
    0: _R(0, 15) + _R(134, 138) + _R(146, 147) + (225, 226, 234), 1: _R(0, 16) + _R(134, 138) + _R(146, 147),
    2: (16,) + _R(134, 138) + _R(146, 147) + (229, 234), 3: _R(134, 138) + _R(146, 147) + _R(225, 229),
    4: _R(17, 35) + _R(146, 147) + _R(225, 229), 5: _R(146, 147) + _R(225, 229),
    6: _R(36, 49) + _R(124, 132) + _R(141, 143) + (154, 155, 230), 7: _R(50, 61) + _R(141, 143) + _R(148, 150),
    8: _R(62, 78) + _R(117, 129) + _R(148, 155), 9: _R(79, 94) + _R(150, 155) + _R(225, 229),
    10: _R(95, 113) + _R(114, 138) + _R(139, 145) + _R(148, 155), 11: _R(114, 138) + _R(139, 145) + (154, 155),
    12: (114, 115, 150, 151, 152), 13: (281, 283), 14: (289, 290, 295), 23: (281, 282, 283, 290, 292, 293, 295),
    24: (281, 283, 289, 290, 291, 292, 293, 295), 19: (283, 290, 295), 28: _R(161, 173), 29: _R(174, 178),
    31: _R(204, 216) + _R(156, 160), 32: _R(217, 224), 33: _R(179, 203), 34: (281, 283), 35: (281, 283),
}
# Texture -> its textile-pattern attribute, so pattern attributes are learnable too.
TEXTURE_ATTRIBUTE = {"solid": 317, "stripes": 328, "dots": 323, "checks": 322}


@dataclass(frozen=True)
class CategoryStyle:
    """How a category looks: silhouette, main and secondary colour (RGB), texture and its parameters."""

    category_id: int
    shape: str
    rgb: tuple[int, int, int]
    rgb2: tuple[int, int, int]
    texture: str
    angle: float  # stripe direction, radians
    periods: float  # texture repeats across the shorter side of the instance


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0), 1), min(max(v, 0), 1))
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def category_style(category_id: int) -> CategoryStyle:
    """The deterministic look of a category (pure function of its id)."""
    cid = int(category_id)
    # Irrational hue steps spread the 46 hues; saturation/value cycles separate near-equal hues.
    # Offset, step and texture rule were picked by a small search maximising the smallest colour
    # (+ texture) distance between the frequent categories (garments, shoe, bag, sleeve, ...).
    hue = (0.875 + cid * 0.1458980338) % 1.0
    sat = (0.95, 0.7, 0.85)[cid % 3]
    val = (0.92, 0.72, 0.55)[(cid // 3) % 3]
    texture = TEXTURES[(cid + cid // 4) % 4]
    return CategoryStyle(
        category_id=cid,
        shape=CATEGORY_SHAPES[cid],
        rgb=_hsv(hue, sat, val),
        rgb2=_hsv(hue, sat * 0.9, val * 0.45),
        texture=texture,
        angle=(0.0, math.pi / 2, math.pi / 4, 3 * math.pi / 4)[(cid // 2) % 4],
        periods=(3.0, 4.0, 5.0)[cid % 3],
    )


def image_id_for(seed: int, index: int) -> str:
    """The 32-hex ImageId of image `index` for `seed` (stable, like Kaggle's md5-style ids)."""
    return hashlib.md5(f"imat-synthetic:{seed}:{index}".encode()).hexdigest()


# ---- rendering --------------------------------------------------------------------------------------------

@dataclass
class _Instance:
    category_id: int
    attribute_ids: tuple[int, ...]
    polygon: list[tuple[float, float]]  # working-resolution pixels
    rgb: np.ndarray
    rgb2: np.ndarray
    style: CategoryStyle


def _texture_mask(style: CategoryStyle, h: int, w: int, phase: float) -> np.ndarray:
    """True where the secondary colour goes, in a local h x w box."""
    if style.texture == "solid" or min(h, w) < 6:
        return np.zeros((h, w), bool)
    period = max(3.0, min(h, w) / style.periods)
    yy = np.arange(h, dtype=np.float32)[:, None]  # broadcast: the results below are h x w
    xx = np.arange(w, dtype=np.float32)[None, :]
    if style.texture == "stripes":
        t = xx * math.cos(style.angle) + yy * math.sin(style.angle) + phase * period
        return (np.floor(t / (period / 2)) % 2).astype(bool)
    if style.texture == "dots":
        dx = (xx + phase * period) % period - period / 2
        dy = yy % period - period / 2
        return dx * dx + dy * dy < (0.3 * period) ** 2
    half = period / 2  # checks
    return ((np.floor((xx + phase * period) / half) + np.floor(yy / half)) % 2).astype(bool)


def _box_polygon(shape: str, box: tuple[float, float, float, float], mirror: bool) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    pts = SHAPES[shape]
    return [(x0 + ((1 - px) if mirror else px) * (x1 - x0), y0 + py * (y1 - y0)) for px, py in pts]


def _jitter_box(rng, box, amount: float):
    """Shift and scale a box mildly (relative to its own size and to `amount` of the unit)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    s = rng.uniform(0.92, 1.08)
    cx = (x0 + x1) / 2 + rng.uniform(-amount, amount) * max(w, 0.1)
    cy = (y0 + y1) / 2 + rng.uniform(-amount, amount) * max(h, 0.1)
    w, h = w * s, h * s * rng.uniform(0.95, 1.05)
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _attributes(rng, cid: int, style: CategoryStyle, valid: frozenset[int]) -> tuple[int, ...]:
    pool = [a for a in ATTRIBUTE_POOLS.get(cid, ()) if a in valid]
    chosen: set[int] = set()
    if pool and rng.random() < 0.85:
        k = int(rng.integers(1, 4))
        chosen.update(int(a) for a in rng.choice(pool, size=min(k, len(pool)), replace=False))
    if cid in GARMENTS and rng.random() < 0.7 and TEXTURE_ATTRIBUTE[style.texture] in valid:
        chosen.add(TEXTURE_ATTRIBUTE[style.texture])
    return tuple(sorted(chosen))


def _plan_outfit(rng):
    """Choose a template and the (category, box in figure units, parent) list to draw."""
    weights = np.array([t.weight for t in CO_OCCURRENCE_TEMPLATES])
    template = CO_OCCURRENCE_TEMPLATES[int(rng.choice(len(weights), p=weights / weights.sum()))]
    cats = [int(rng.choice(slot)) if len(slot) > 1 else slot[0] for slot in template.slots]
    cats += [c for c, p in template.extras if rng.random() < p]
    garments = [c for c in cats if c in GARMENTS]
    # Parts go on the outermost upper-body garment (the last drawn one covering the torso).
    torso = [c for c in garments if c in UPPER or c in (9, 10, 11, 12)]
    parent = max(torso, key=lambda c: _Z_RANK[c]) if torso else None
    items = []  # (category, box in figure units, mirror)
    for c in cats:
        for k, box in enumerate(FIGURE_REGIONS[c]):
            items.append((c, box, k == 1 and c in MIRRORED))
    parent_box = FIGURE_REGIONS[parent][0] if parent is not None else None
    for c, p in template.parts:
        if rng.random() >= p or (parent is None and c not in FIGURE_REGIONS):
            continue
        if c in FIGURE_REGIONS:  # sleeves and hoods sit on the figure, beside/behind the garment
            for k, box in enumerate(FIGURE_REGIONS[c]):
                items.append((c, box, k == 1 and c in MIRRORED))
            continue
        for k, rel in enumerate(PART_REGIONS[c]):
            items.append((c, _in_box(parent_box, rel), k == 1 and c in MIRRORED))
    if 19 in cats and rng.random() < 0.5:  # buckle on the belt
        items.append((34, _in_box(FIGURE_REGIONS[19][0], PART_REGIONS[34][0]), False))
    if garments and rng.random() < template.decorations:
        for _ in range(int(rng.integers(1, 3))):
            deco = int(rng.choice(DECORATIONS))
            host = FIGURE_REGIONS[int(rng.choice(garments))][0]
            size = rng.uniform(0.14, 0.22)
            cx, cy = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)
            rel = (cx - size / 2, cy - size / 2 * 0.8, cx + size / 2, cy + size / 2 * 0.8)
            items.append((deco, _in_box(host, rel), bool(rng.random() < 0.5)))
    items.sort(key=lambda it: _Z_RANK[it[0]])  # stable: left before right
    return template, items


def _in_box(outer, rel):
    x0, y0, x1, y1 = outer
    w, h = x1 - x0, y1 - y0
    return x0 + rel[0] * w, y0 + rel[1] * h, x0 + rel[2] * w, y0 + rel[3] * h


def _background(rng, h: int, w: int) -> np.ndarray:
    """A low-saturation two-colour gradient in a random direction, plus noise."""
    c1 = np.array(_hsv(rng.random(), rng.uniform(0, 0.22), rng.uniform(0.35, 0.97)), np.float32)
    c2 = np.array(_hsv(rng.random(), rng.uniform(0, 0.22), rng.uniform(0.35, 0.97)), np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    t = xx / max(w - 1, 1) * math.cos(angle) + yy / max(h - 1, 1) * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c1 + (c2 - c1) * t[..., None]


def _image_size(rng, min_side: int, max_side: int, large: bool, large_side: int) -> tuple[int, int]:
    """(height, width): portrait-dominant like fashion photos; `large` images get long side = large_side."""
    kind = rng.choice(3, p=[0.7, 0.15, 0.15])  # portrait, square-ish, landscape
    aspect = (rng.uniform(1.2, 1.6), rng.uniform(0.9, 1.1), rng.uniform(0.62, 0.83))[kind]  # h / w
    long_side = large_side if large else int(rng.integers(min_side, max_side + 1))
    if aspect >= 1:
        h, w = long_side, long_side / aspect
    else:
        w, h = long_side, long_side * aspect
    low = min_side if not large else 1
    return int(max(round(h), low)), int(max(round(w), low))


def render_image(rng: np.random.Generator, height: int, width: int, valid_attrs: frozenset[int]):
    """Draw one image; returns (PIL RGB image height x width, [(category, attributes, mask bool[H,W])]).

    Masks are the visible pixels of each instance at the final size, in drawing order.
    """
    scale = min(1.0, WORK_LONG_SIDE / max(height, width))
    h, w = max(1, round(height * scale)), max(1, round(width * scale))
    canvas = _background(rng, h, w)
    label = np.zeros((h, w), np.uint8)

    # The figure: about 45-52% as wide as tall, 72-95% of the image height.
    fig_h = h * rng.uniform(0.72, 0.95)
    fig_w = min(fig_h * rng.uniform(0.42, 0.52), w * 0.96)
    fx = rng.uniform(0.02 * w, max(0.02 * w, w - fig_w - 0.02 * w))
    fy = rng.uniform(0.02 * h, max(0.02 * h, h - fig_h - 0.01 * h))

    def to_px(box):
        x0, y0, x1, y1 = box
        return fx + x0 * fig_w, fy + y0 * fig_h, fx + x1 * fig_w, fy + y1 * fig_h

    template, items = _plan_outfit(rng)
    # An unlabelled head in a skin tone gives hats and glasses their context.
    head = Image.new("L", (w, h), 0)
    skin = np.array(_hsv(rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95)), np.float32)

    instances: list[_Instance] = []
    head_drawn = False
    for cid, box, mirror in items:
        if not head_drawn and _Z_RANK[cid] > _Z_RANK[27]:  # after the hood, before everything else
            ImageDraw.Draw(head).ellipse(to_px((0.4, 0.0, 0.6, 0.135)), fill=1)
            canvas[np.asarray(head, bool)] = skin
            head_drawn = True
        style = category_style(cid)
        jb = _jitter_box(rng, box, 0.04 if cid in GARMENTS else 0.08)
        poly = _box_polygon(style.shape, to_px(jb), mirror)
        jitter = rng.uniform(-14, 14, 3)
        instances.append(_Instance(cid, _attributes(rng, cid, style, valid_attrs), poly,
                                   np.clip(np.array(style.rgb) + jitter, 0, 255),
                                   np.clip(np.array(style.rgb2) + jitter, 0, 255), style))
        idx = len(instances)
        if idx > 255:
            raise RuntimeError("more than 255 instances in one image")  # cannot happen with these templates
        _draw(canvas, label, idx, instances[-1], rng)

    canvas += 4.0 * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")
    if (h, w) != (height, width):
        image = image.resize((width, height), Image.BILINEAR)
        rows = np.minimum(((np.arange(height) + 0.5) * (h / height)).astype(np.intp), h - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * (w / width)).astype(np.intp), w - 1)
        label = label.take(rows, axis=0).take(cols, axis=1)

    min_area = max(MIN_VISIBLE_PIXELS, MIN_VISIBLE_FRACTION * height * width)
    out = []
    # Column-major once, so each `label == idx` mask is column-major too and RLE's ravel(order="F") is free.
    label = np.asfortranarray(label)
    counts = np.bincount(label.ravel(order="K"), minlength=len(instances) + 1)
    for idx, inst in enumerate(instances, start=1):
        if counts[idx] >= min_area:
            out.append((inst.category_id, inst.attribute_ids, label == idx))
    return image, out


def _draw(canvas: np.ndarray, label: np.ndarray, idx: int, inst: _Instance, rng) -> None:
    h, w = label.shape
    xs = [p[0] for p in inst.polygon]
    ys = [p[1] for p in inst.polygon]
    x0, x1 = max(0, int(math.floor(min(xs)))), min(w, int(math.ceil(max(xs))) + 1)
    y0, y1 = max(0, int(math.floor(min(ys)))), min(h, int(math.ceil(max(ys))) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    m_img = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(m_img).polygon([(x - x0, y - y0) for x, y in inst.polygon], fill=1)
    m = np.asarray(m_img, bool)
    if not m.any():
        return
    tex = _texture_mask(inst.style, y1 - y0, x1 - x0, float(rng.random()))
    colours = np.where(tex[..., None], inst.rgb2, inst.rgb).astype(np.float32)
    canvas[y0:y1, x0:x1][m] = colours[m]
    label[y0:y1, x0:x1][m] = idx


# ---- writing ----------------------------------------------------------------------------------------------


def write_synthetic(out_dir, num_images: int = 200, *, seed: int = 0, min_side: int = 160,
                    max_side: int = 1200, large_fraction: float = 0.05, large_side: int = 2400,
                    quality: int = 90) -> pathlib.Path:
    """Write a synthetic dataset in the Kaggle iMaterialist 2020 layout to out_dir; returns out_dir.

    round(num_images * large_fraction) images (chosen by the seed) get long side `large_side`, to
    exercise the JPEG draft-mode decoder; the others have long side in [min_side, max_side].
    Same arguments -> byte-identical files.
    """
    if num_images < 1:
        raise ConfigError(f"num_images must be at least 1, got {num_images}")
    if not (16 <= min_side <= max_side):
        raise ConfigError(f"need 16 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    if not 0.0 <= large_fraction <= 1.0:
        raise ConfigError(f"large_fraction must be in [0, 1], got {large_fraction}")
    if large_side < 16:
        raise ConfigError(f"large_side must be at least 16, got {large_side}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be in 1..100, got {quality}")
    out = pathlib.Path(out_dir)
    image_dir = out / "train"
    try:
        image_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the output folder ({e.strerror or e})") from None

    labels = LabelSpace.default()
    valid_attrs = frozenset(labels.attribute_ids)
    num_large = int(round(num_images * large_fraction))
    large = set(np.random.default_rng([seed, 0x1A46E]).permutation(num_images)[:num_large].tolist())

    rows: list[tuple[str, str, int, int, int, str]] = []
    show = sys.stderr.isatty()
    for i in tqdm(range(num_images), desc="synthetic images", unit="img", disable=not show):
        rng = np.random.default_rng([seed, i])
        height, width = _image_size(rng, min_side, max_side, i in large, large_side)
        image, instances = render_image(rng, height, width, valid_attrs)
        image_id = image_id_for(seed, i)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=quality)
        atomic_write_bytes(image_dir / f"{image_id}.jpg", buf.getvalue())
        for cid, attrs, mask in instances:
            rows.append((image_id, rle_encode(mask), height, width, cid, ",".join(map(str, attrs))))

    rows.sort(key=lambda r: r[0])  # Kaggle's file is sorted by ImageId; sort is stable within an image
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(rows)
    atomic_write_bytes(out / "train.csv", text.getvalue().encode("utf-8"))
    atomic_write_bytes(out / "label_descriptions.json",
                        (json.dumps(labels.to_json_dict(), indent=1) + "\n").encode("utf-8"))
    written = {image_id_for(seed, i) for i in range(num_images)}
    stale = sorted(p.name for p in image_dir.glob("*.jpg") if p.stem not in written)
    if stale:
        logger.warning("%s: %d .jpg files not written by this run are left in place (e.g. %s)",
                       image_dir, len(stale), stale[0])
    logger.info("wrote %d synthetic images and %d mask rows to %s", num_images, len(rows), out)
    return out
