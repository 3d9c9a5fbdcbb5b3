"""Batches for training from a prepared dataset: classification, triplet (online/offline), rotation.

Reads the array_record files written by `tfds_builder.prepare` through TFDS's data source (random
access, no TensorFlow). Every batch is a pure function of (seed, step): epoch = step //
steps_per_epoch, one permutation per epoch, per-step random generators for sampling and
augmentation. A run resumed at step k therefore sees exactly the batches it would have seen.
Multi-host: `shard_index`/`num_shards` give each host a disjoint, equally sized shard of the split.

Images stay uint8 NHWC (the model normalises); batches are plain numpy, ready for jax.device_put.
The batch sources play the part of a grain sampler + batcher, addressable by step number;
`PreparedSplit` also satisfies grain's random-access source protocol for other uses.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import pathlib
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from imat.data_tools import triplets
from imat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

KINDS = ("classification", "triplet", "rotation")
MINING = ("online", "offline")
_READ_CHUNK = 512
# Stream tags mixed into the seed so that permutations, sampling, augmentation and mining draw
# from independent generators.
_PERMUTE, _SAMPLE, _AUGMENT, _MINE = 0, 1, 2, 3


# ---- the prepared split ----------------------------------------------------------------------------

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
                   resize_mode=manifest.get("resize_mode"), _source=source, _cache=images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """One example; with __len__ this is grain's random-access source protocol
        (`grain.MapDataset.source(split)`), for users who want grain's own transforms."""
        i = int(index)
        return {"image": self.images([i])[0], "categories": self.categories[i], "attributes": self.attributes[i]}

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


# ---- augmentation ------------------------------------------------------------------------------------

def augment_batch(images: np.ndarray, rng: np.random.Generator, *, scale=(0.6, 1.0),
                  ratio=(3 / 4, 4 / 3), flip: bool = True, parallel: bool | None = None) -> np.ndarray:
    """Random resized crop (area fraction in `scale`, aspect in `ratio`) back to the input size,
    then a horizontal flip with probability 1/2. uint8 in, uint8 out, same shape.
    parallel: crop in a thread pool (default: for 16 images or more); the result is the same."""
    b, h, w = images.shape[:3]
    area = rng.uniform(scale[0], scale[1], b) * h * w
    log_r = rng.uniform(np.log(ratio[0]), np.log(ratio[1]), b)
    ar = np.exp(log_r)
    cw = np.clip(np.round(np.sqrt(area * ar)), 1, w).astype(int)
    ch = np.clip(np.round(np.sqrt(area / ar)), 1, h).astype(int)
    ux, uy = rng.random(b), rng.random(b)
    flips = rng.random(b) < 0.5 if flip else np.zeros(b, bool)
    out = np.empty_like(images)

    def one(i: int) -> None:
        x0 = int(ux[i] * (w - cw[i] + 1))
        y0 = int(uy[i] * (h - ch[i] + 1))
        crop = images[i, y0:y0 + ch[i], x0:x0 + cw[i]]
        if crop.shape[:2] != (h, w):
            crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))
        out[i] = crop[:, ::-1] if flips[i] else crop

    # All random draws are made above, so running the crops in threads (PIL releases the GIL while
    # resizing) cannot change the result.
    if (b >= 16) if parallel is None else parallel:
        list(_augment_pool().map(one, range(b)))
    else:
        for i in range(b):
            one(i)
    return out


_AUG_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_AUG_POOL_LOCK = threading.Lock()


def _augment_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _AUG_POOL
    with _AUG_POOL_LOCK:
        if _AUG_POOL is None:
            _AUG_POOL = concurrent.futures.ThreadPoolExecutor(
                max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="imat-augment")
        return _AUG_POOL


def four_rotations(images: np.ndarray) -> np.ndarray:
    """uint8[4B,H,W,3] = [rot90(images, 0); rot90(images, 1); rot90(.., 2); rot90(.., 3)] (counter-clockwise).

    Each pixel is moved as one 3-byte item (a void view) rather than three uint8s: about twice as
    fast as rotating the uint8 array itself.
    """
    b, h, w, c = images.shape
    if h != w:
        raise ValueError(f"rotation batches need square images, got {h}x{w}")
    pixels = np.ascontiguousarray(images).view(np.dtype((np.void, c))).reshape(b, h, w)
    out = np.empty((4 * b, h, w), pixels.dtype)
    for k in range(4):
        out[k * b:(k + 1) * b] = np.rot90(pixels, k, axes=(1, 2))
    return out.view(np.uint8).reshape(4 * b, h, w, c)


# ---- batch sources -------------------------------------------------------------------------------------

class BatchSource:
    """Deterministic batches of one prepared split (this host's shard of it)."""

    kind = "base"

    def __init__(self, split: PreparedSplit, *, batch_size: int, seed: int, augment: bool = False,
                 shard_index: int = 0, num_shards: int = 1):
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size!r}: give a positive batch size")
        if int(num_shards) < 1 or not 0 <= int(shard_index) < int(num_shards):
            raise ConfigError(f"shard_index={shard_index!r}, num_shards={num_shards!r}: "
                              "need 0 <= shard_index < num_shards")
        if int(seed) < 0:
            raise ConfigError(f"seed={seed!r}: give a non-negative integer seed")
        self.split = split
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.augment = bool(augment)
        self.shard_index, self.num_shards = int(shard_index), int(num_shards)
        n = split.num_examples
        # Strided shards, cut to equal length so every host runs the same number of steps.
        self.indices = np.arange(n, dtype=np.int64)[self.shard_index::self.num_shards][: n // self.num_shards]
        self.categories = split.categories[self.indices]
        self._perm_cache: tuple[int, int, np.ndarray] | None = None

    # -- to override
    def _num_units(self) -> int:
        """How many units (images, anchors, triplets) one epoch goes through."""
        return len(self.indices)

    def _units_per_step(self) -> int:
        return self.batch_size

    def batch_indices(self, step: int) -> np.ndarray:
        """Split row indices of the source images of batch `step`, in batch order."""
        raise NotImplementedError

    def batch(self, step: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # -- shared machinery
    @property
    def steps_per_epoch(self) -> int:
        return self._num_units() // self._units_per_step()

    def _check_size(self) -> None:
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"batch_size={self.batch_size}: larger than what the {self.split.split!r} split offers "
                f"({self._num_units()} usable {self.kind} units in shard {self.shard_index}/{self.num_shards}); "
                "lower the batch size")

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def _permutation(self, epoch: int, n: int, tag: int = _PERMUTE) -> np.ndarray:
        cached = self._perm_cache
        if cached is not None and cached[:2] == (epoch, tag):
            return cached[2]
        perm = self._rng(tag, epoch).permutation(n)
        self._perm_cache = (epoch, tag, perm)
        return perm

    def _units(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, positions in 0.._num_units()) of the units of `step`."""
        if int(step) < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, i = divmod(int(step), self.steps_per_epoch)
        k = self._units_per_step()
        return epoch, self._permutation(epoch, self._num_units())[i * k:(i + 1) * k]

    def _images(self, rows: np.ndarray, step: int) -> np.ndarray:
        images = self.split.images(rows)
        if self.augment:
            images = augment_batch(images, self._rng(_AUGMENT, int(step)))
        return images

    def iterate(self, start_step: int = 0, num_steps: int | None = None, prefetch: int = 2) -> Iterator[dict]:
        """batch(start_step), batch(start_step + 1), ...; a background thread keeps `prefetch` ready."""
        stop_at = None if num_steps is None else int(start_step) + int(num_steps)
        steps = iter(range(int(start_step), stop_at)) if stop_at is not None else _count(int(start_step))
        if prefetch <= 0:
            for s in steps:
                yield self.batch(s)
            return
        q: queue.Queue = queue.Queue(maxsize=int(prefetch))
        stop = threading.Event()
        done = object()

        def produce():
            try:
                for s in steps:
                    item = self.batch(s)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(done)
            except BaseException as e:  # handed to the consumer, raised there
                q.put(e)

        thread = threading.Thread(target=produce, name=f"imat-prefetch-{self.kind}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():   # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)


def _count(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


class ClassificationSource(BatchSource):
    kind = "classification"

    def __init__(self, split, **kw):
        super().__init__(split, **kw)
        self._check_size()

    def batch_indices(self, step: int) -> np.ndarray:
        _, units = self._units(step)
        return self.indices[units]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.batch_indices(step)
        return {"images": self._images(rows, step), "categories": self.split.categories[rows]}


class RotationSource(ClassificationSource):
    """Each source image in 4 rotations (0, 90, 180, 270 degrees counter-clockwise, labels 0..3),
    rotated after resizing (and after augmentation) so that no resize artefact reveals the angle."""

    kind = "rotation"

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.batch_indices(step)
        b = len(rows)
        return {
            "images": four_rotations(self._images(rows, step)),
            "rotation": np.repeat(np.arange(4, dtype=np.int32), b),
            "categories": np.tile(self.split.categories[rows], (4, 1)),
        }


class OnlineTripletSource(BatchSource):
    """Batches of B images in which every image has a positive (shares a category).

    An M-per-class sampler generalised to multi-label: each epoch walks a permutation of the
    anchors; for each anchor one of its categories is chosen (uniformly, among those with another
    image in the shard), then a positive of that category (preferring images not yet in the
    batch). Layout: [anchors (B//2); positives (B - B//2)]; with odd B the first anchor gets two.
    """

    kind = "triplet"

    def __init__(self, split, **kw):
        super().__init__(split, **kw)
        if self.batch_size < 2:
            raise ConfigError(f"batch_size={self.batch_size}: triplet batches need at least 2 images")
        labels = self.categories > 0.5
        counts = labels.sum(0)
        self._members = [np.flatnonzero(labels[:, c]) for c in range(labels.shape[1])]
        self._usable = labels & (counts >= 2)[None, :]        # categories through which a positive exists
        self._pool = np.flatnonzero(self._usable.any(1))       # shard positions that can be anchors
        dropped = len(self.indices) - len(self._pool)
        if dropped:
            logger.info("online triplets: %d of %d images have no image sharing a category; not used as anchors",
                        dropped, len(self.indices))
        self._check_size()

    def _num_units(self) -> int:
        return len(self._pool)

    def _units_per_step(self) -> int:
        return self.batch_size // 2

    def batch_indices(self, step: int) -> np.ndarray:
        _, units = self._units(step)
        anchors = self._pool[units]
        rng = self._rng(_SAMPLE, int(step))
        in_batch = set(anchors.tolist())
        owners = list(anchors) + ([anchors[0]] if self.batch_size % 2 else [])
        positives = []
        for a in owners:
            cats = np.flatnonzero(self._usable[a])
            c = cats[rng.integers(len(cats))]
            cands = self._members[c]
            cands = cands[cands != a]                  # non-empty: c has >= 2 members
            fresh = cands[~np.isin(cands, np.fromiter(in_batch, np.int64, len(in_batch)))]
            pool = fresh if len(fresh) else cands        # tiny shards: repeat an image rather than fail
            pick = pool[rng.integers(len(pool))]
            positives.append(int(pick))
            in_batch.add(int(pick))
        return self.indices[np.concatenate([anchors, np.asarray(positives, np.int64)])]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.batch_indices(step)
        return {"images": self._images(rows, step), "categories": self.split.categories[rows]}


class OfflineTripletSource(BatchSource):
    """Triplets mined once per epoch over the shard (`triplets.mine_offline`: the seed report's rules,
    with relaxed negatives for anchors that overlap every image); batch = B triplets laid out
    [anchors; positives; negatives]."""

    kind = "triplet"

    def __init__(self, split, **kw):
        super().__init__(split, **kw)
        self._mined: tuple[int, triplets.MinedTriplets] | None = None
        self._mine_lock = threading.Lock()     # batch() may run in the prefetch thread and the caller
        self._num_triplets = len(self._mine(0))
        self._check_size()

    def _mine(self, epoch: int) -> triplets.MinedTriplets:
        with self._mine_lock:
            if self._mined is None or self._mined[0] != epoch:
                seed = np.random.SeedSequence([self.seed, _MINE, epoch])
                # relax_negatives: on street photos many anchors share a category (shoes) with every
                # other image; they get the least-overlapping negative instead of being dropped.
                self._mined = (epoch, triplets.mine_offline(self.categories, seed, relax_negatives=True))
            return self._mined[1]

    def _num_units(self) -> int:
        return self._num_triplets

    def batch_indices(self, step: int) -> np.ndarray:
        epoch, units = self._units(step)
        m = self._mine(epoch)
        local = np.concatenate([m.anchors[units], m.positives[units], m.negatives[units]])
        return self.indices[local]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.batch_indices(step)
        return {"images": self._images(rows, step), "categories": self.split.categories[rows]}


def make_pipeline(kind: str, split: PreparedSplit, *, batch_size: int, seed: int, augment: bool = False,
                  mining: str = "online", shard_index: int = 0, num_shards: int = 1) -> BatchSource:
    """A BatchSource of `kind` (classification | triplet | rotation) over this host's shard of `split`."""
    kw = dict(batch_size=batch_size, seed=seed, augment=augment, shard_index=shard_index, num_shards=num_shards)
    if kind == "classification":
        return ClassificationSource(split, **kw)
    if kind == "rotation":
        return RotationSource(split, **kw)
    if kind == "triplet":
        if mining == "online":
            return OnlineTripletSource(split, **kw)
        if mining == "offline":
            return OfflineTripletSource(split, **kw)
        raise ConfigError(f"mining={mining!r} is not one of {', '.join(MINING)}")
    raise ConfigError(f"pipeline kind {kind!r} is not one of {', '.join(KINDS)}")


def describe(source: BatchSource) -> str:
    return (f"{source.kind} pipeline: {source.split.num_examples} images in {source.split.split!r}, shard "
            f"{source.shard_index}/{source.num_shards}, batch {source.batch_size}, "
            f"{source.steps_per_epoch} steps/epoch")


__all__: Sequence[str] = ("PreparedSplit", "BatchSource", "make_pipeline", "augment_batch", "find_dataset_dir")
