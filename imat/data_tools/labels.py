"""The iMaterialist label space: 46 categories and 294 attributes (sparse ids), multi-hot both ways.

Attribute ids in label_descriptions.json run 0..340 with gaps, so model outputs use a dense
column per attribute; `attribute_index` maps a sparse id to its column.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from imat.errors import DataError

logger = logging.getLogger(__name__)

PACKAGED_LABELS = pathlib.Path(__file__).with_name("label_descriptions_2020.json")


@dataclass(frozen=True)
class LabelSpace:
    """Category and attribute ids/names, in the order of the model's output columns."""

    category_ids: tuple[int, ...]
    category_names: tuple[str, ...]
    category_supercategories: tuple[str, ...]
    attribute_ids: tuple[int, ...]
    attribute_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n, m = len(self.category_ids), len(self.attribute_ids)
        if not (len(self.category_names) == len(self.category_supercategories) == n):
            raise DataError("label space: category ids, names and supercategories differ in length")
        if len(self.attribute_names) != m:
            raise DataError("label space: attribute ids and names differ in length")
        if len(set(self.category_ids)) != n or len(set(self.attribute_ids)) != m:
            raise DataError("label space: duplicate category or attribute ids")

    # Derived lookups, not dataclass fields (so equality, repr and asdict see only the contract's fields).
    @functools.cached_property
    def _category_pos(self) -> dict[int, int]:
        return {c: i for i, c in enumerate(self.category_ids)}

    @functools.cached_property
    def _attribute_pos(self) -> dict[int, int]:
        return {a: i for i, a in enumerate(self.attribute_ids)}

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path) -> "LabelSpace":
        """Read a Kaggle label_descriptions.json; DataError naming the file when missing/malformed."""
        path = pathlib.Path(path)
        hint = "use the label_descriptions.json of iMaterialist Fashion 2020 (FGVC7)"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(f"{path}: label descriptions file not found; {hint}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read label descriptions ({e}); {hint}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); {hint}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data, *, source: str = "<label descriptions>") -> "LabelSpace":
        """Build from the parsed JSON ({"categories": [...], "attributes": [...]})."""
        hint = 'expected {"categories": [{"id", "name", "supercategory"}...], "attributes": [{"id", "name"}...]}'
        if not isinstance(data, dict) or not isinstance(data.get("categories"), list) \
                or not isinstance(data.get("attributes"), list):
            raise DataError(f"{source}: malformed label descriptions; {hint}")
        try:
            cats = sorted(data["categories"], key=lambda c: int(c["id"]))
            attrs = sorted(data["attributes"], key=lambda a: int(a["id"]))
            space = cls(
                category_ids=tuple(int(c["id"]) for c in cats),
                category_names=tuple(str(c["name"]) for c in cats),
                category_supercategories=tuple(str(c.get("supercategory", "")) for c in cats),
                attribute_ids=tuple(int(a["id"]) for a in attrs),
                attribute_names=tuple(str(a["name"]) for a in attrs),
            )
            object.__setattr__(space, "_attribute_supercategories",
                               tuple(str(a.get("supercategory", "")) for a in attrs))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{source}: malformed label descriptions entry ({e!r}); {hint}") from None
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
        if not space.category_ids:
            raise DataError(f"{source}: no categories; {hint}")
        return space

    @classmethod
    def default(cls) -> "LabelSpace":
        """The packaged iMaterialist 2020 label space (46 categories, 294 attributes)."""
        return _default()

    # ---- sizes and lookups ----------------------------------------------------------------------
    @property
    def num_categories(self) -> int:
        return len(self.category_ids)

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_ids)

    def has_category(self, category_id: int) -> bool:
        return category_id in self._category_pos

    def has_attribute(self, attribute_id: int) -> bool:
        return attribute_id in self._attribute_pos

    def category_index(self, category_id: int) -> int:
        try:
            return self._category_pos[int(category_id)]
        except KeyError:
            raise DataError(f"unknown category id {category_id}; valid ids are "
                            f"{self.category_ids[0]}..{self.category_ids[-1]}") from None

    def attribute_index(self, attribute_id: int) -> int:
        """Dense column of a sparse attribute id."""
        try:
            return self._attribute_pos[int(attribute_id)]
        except KeyError:
            raise DataError(f"unknown attribute id {attribute_id}; not in the label descriptions "
                            f"({self.num_attributes} attributes)") from None

    # ---- multi-hot ------------------------------------------------------------------------------
    def categories_to_multihot(self, ids: Iterable[int]) -> np.ndarray:
        vec = np.zeros(self.num_categories, np.float32)
        for i in ids:
            vec[self.category_index(i)] = 1.0
        return vec

    def attributes_to_multihot(self, ids: Iterable[int]) -> np.ndarray:
        vec = np.zeros(self.num_attributes, np.float32)
        for i in ids:
            vec[self.attribute_index(i)] = 1.0
        return vec

    def multihot_to_categories(self, vec, threshold: float = 0.5) -> list[int]:
        vec = self._check_vec(vec, self.num_categories, "category")
        return [self.category_ids[i] for i in np.flatnonzero(vec >= threshold)]

    def multihot_to_attributes(self, vec, threshold: float = 0.5) -> list[int]:
        vec = self._check_vec(vec, self.num_attributes, "attribute")
        return [self.attribute_ids[i] for i in np.flatnonzero(vec >= threshold)]

    @staticmethod
    def _check_vec(vec, n: int, what: str) -> np.ndarray:
        vec = np.asarray(vec)
        if vec.shape != (n,):
            raise DataError(f"{what} vector has shape {vec.shape}, expected ({n},)")
        return vec

    # ---- serialisation --------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        """The content of a label_descriptions.json describing this label space."""
        # Attribute supercategories are kept (outside the fields) when read from a file, so a
        # round trip preserves them; a LabelSpace built by hand writes "".
        attr_super = getattr(self, "_attribute_supercategories", None) or ("",) * self.num_attributes
        return {
            "categories": [
                {"id": i, "name": n, "supercategory": s}
                for i, n, s in zip(self.category_ids, self.category_names, self.category_supercategories)
            ],
            "attributes": [
                {"id": i, "name": n, "supercategory": s}
                for i, n, s in zip(self.attribute_ids, self.attribute_names, attr_super)
            ],
        }


_DEFAULT: LabelSpace | None = None


def _default() -> LabelSpace:
    global _DEFAULT  # immutable value, so a benign race at worst builds it twice
    if _DEFAULT is None:
        _DEFAULT = LabelSpace.from_json(PACKAGED_LABELS)
    return _DEFAULT
