"""The prepared dataset, read back: ``PreparedSplit.open(data_dir, split)``.

Reads the array_record files written by ``tfds_builder.prepare`` through TFDS's data source
(random access, no TensorFlow). Labels are always held in RAM; images are cached in RAM or
read on demand. Images stay uint8 NHWC (the model normalises).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import threading

import numpy as np

from imat.errors import DataError

logger = logging.getLogger(__name__)

_READ_CHUNK = 512
UNLABELLED_SPLIT = "unlabelled"


def find_dataset_dir(data_dir) -> pathlib.Path:
    """The TFDS dataset folder (holding dataset_info.json) at or below `data_dir` (at most 3 levels)."""
    data_dir = pathlib.Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a folder; give the folder printed by `imat data prepare`")
    if (data_dir / "dataset_info.json").is_file():
        return data_dir
    found = []
    for pattern in ("*/dataset_info.json", "*/*/dataset_info.json", "*/*/*/dataset_info.json"):
        found += [p.parent for p in data_dir.glob(pattern)
                  if not any(part.startswith(".") for part in p.relative_to(data_dir).parts)]
    if not found:
        raise DataError(f"{data_dir}: no prepared dataset here (no dataset_info.json); "
                        "run `imat data prepare KAGGLE_DIR OUT_DIR` and give the folder it prints")
    if len(found) > 1:
        raise DataError(f"{data_dir}: holds {len(found)} prepared datasets ("
                        + ", ".join(str(p.relative_to(data_dir)) for p in sorted(found))
                        + "); give the one to use")
    return found[0]


@dataclasses.dataclass(eq=False)
class PreparedSplit:
    """One split of a prepared dataset; labels always in RAM, images cached in RAM or read on demand."""

    data_dir: pathlib.Path
    split: str
    image_ids: list[str]
    categories: np.ndarray          # float32[N, 46]
    attributes: np.ndarray          # float32[N, 294]
    heights: np.ndarray             # int32[N], original sizes
    widths: np.ndarray
    image_size: int
    resize_mode: str | None
    garments: bool = False          # examples are garment crops (`imat data prepare --garments`)
    garment_padding: float | None = None   # their context padding (the engine must crop the same way)
    _source: object = dataclasses.field(repr=False, default=None)
    _cache: np.ndarray | None = dataclasses.field(repr=False, default=None)
    _lock: threading.Lock = dataclasses.field(repr=False, default_factory=threading.Lock)

    @property
    def num_examples(self) -> int:
        return len(self.image_ids)

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def __len__(self) -> int:
        return self.num_examples

    @classmethod
    def open(cls, data_dir, split: str = "train", *, cache: bool = True) -> "PreparedSplit":
        import tensorflow_datasets as tfds   # heavy; only readers of prepared data need it

        ds_dir = find_dataset_dir(data_dir)
        try:
            builder = tfds.builder_from_directory(str(ds_dir))
        except Exception as e:  # TFDS raises assorted errors for damaged metadata
            raise DataError(f"{ds_dir}: unreadable prepared dataset ({e}); prepare it again") from None
        available = list(builder.info.splits.keys())
        if split not in available:
            raise DataError(f"{ds_dir}: no split {split!r}; it has {', '.join(sorted(available))}")
        source = builder.as_data_source(split=split)
        n = len(source)
        shape = builder.info.features["image"].shape
        manifest = {}
        try:
            manifest = json.loads((ds_dir / "imat_manifest.json").read_text())
        except (OSError, ValueError):
            logger.warning("%s: no readable imat_manifest.json; resize mode unknown", ds_dir)
        ids: list[str] = []
        cats = np.zeros((n, builder.info.features["categories"].shape[0]), np.float32)
        attrs = np.zeros((n, builder.info.features["attributes"].shape[0]), np.float32)
        heights = np.zeros(n, np.int32)
        widths = np.zeros(n, np.int32)
        images = np.empty((n, *shape), np.uint8) if cache else None
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=n, desc=f"reading {split}", unit="img", disable=None)
            for start in range(0, n, _READ_CHUNK):
                rows = source.__getitems__(list(range(start, min(n, start + _READ_CHUNK))))
                for i, ex in enumerate(rows, start):
                    ids.append(ex["image_id"].decode() if isinstance(ex["image_id"], bytes) else str(ex["image_id"]))
                    cats[i] = ex["categories"]
                    attrs[i] = ex["attributes"]
                    heights[i] = ex["height"]
                    widths[i] = ex["width"]
                    if images is not None:
                        images[i] = ex["image"]
                bar.update(len(rows))
            bar.close()
        except (OSError, ValueError) as e:
            raise DataError(f"{ds_dir}: cannot read split {split!r} ({e}); prepare it again") from None
        return cls(data_dir=ds_dir, split=split, image_ids=ids, categories=cats, attributes=attrs,
                   heights=heights, widths=widths, image_size=int(shape[0]),
                   resize_mode=manifest.get("resize_mode"), garments=bool(manifest.get("garments", False)),
                   garment_padding=manifest.get("garment_padding"),
                   _source=source, _cache=images)

    def available_splits(self) -> list[str]:
        import tensorflow_datasets as tfds

        return list(tfds.builder_from_directory(str(self.data_dir)).info.splits.keys())

    def with_unlabelled(self) -> "PreparedSplit":
        """This split plus the dataset's ``unlabelled`` split (photos without labels, kept out of the
        supervised splits), for self-supervised objectives; ``self`` when there is none."""
        if UNLABELLED_SPLIT not in self.available_splits():
            return self
        extra = PreparedSplit.open(self.data_dir, UNLABELLED_SPLIT, cache=True)
        mine = self if self.cached else PreparedSplit.open(self.data_dir, self.split, cache=True)
        logger.info("adding %d unlabelled photos to %d of split %r", extra.num_examples, mine.num_examples, self.split)
        return PreparedSplit(
            data_dir=self.data_dir, split=f"{self.split}+{UNLABELLED_SPLIT}",
            image_ids=mine.image_ids + extra.image_ids,
            categories=np.concatenate([mine.categories, extra.categories]),
            attributes=np.concatenate([mine.attributes, extra.attributes]),
            heights=np.concatenate([mine.heights, extra.heights]), widths=np.concatenate([mine.widths, extra.widths]),
            image_size=self.image_size, resize_mode=self.resize_mode,
            _cache=np.concatenate([mine._cache, extra._cache]))

    def images(self, indices) -> np.ndarray:
        """uint8[len(indices), S, S, 3] in the order given (indices may repeat)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
            raise IndexError(f"image index out of range 0..{self.num_examples - 1}")
        if self._cache is not None:
            return self._cache[idx]
        with self._lock:   # one reader at a time (prefetch thread and caller)
            rows = self._source.__getitems__(idx.tolist()) if idx.size else []
        out = np.empty((idx.size, self.image_size, self.image_size, 3), np.uint8)
        for i, ex in enumerate(rows):
            out[i] = ex["image"]
        return out


