"""TFDS builder for iMaterialist Fashion 2020: source folders (manual dir) -> array_record, pre-resized.

The sources are one or more folders of either kind `imat.data_tools.sources` reads (Kaggle layout or
image-level labels.csv), merged into one dataset: labelled photos are split 80/20 (seeded, by id)
into "train" and "validation"; image-level photos without labels go to an "unlabelled" split (for
self-supervision); a Kaggle folder's test/ images go to "test".

Works without TensorFlow: `GeneratorBasedBuilder` + `file_format="array_record"` serialises examples
with TFDS's numpy/protobuf path, and `tfds.builder_from_directory(dir).as_data_source()` reads them
back with random access (see `imat.data_tools.pipelines`). Only `tfds.features.Tensor` / `Text` /
`Scalar` are used: `tfds.features.Image` needs TensorFlow to encode.

Images are stored as raw uint8 tensors (S, S, 3), already decoded and resized by the one decoder
`imat.data_tools.images.decode_image`: reading one back is a protobuf parse and a memcpy (PNG/JPEG
would need TF or a decode per read, which is what preparing is meant to avoid).

`prepare(...)` is the entry point. It builds into a private staging folder inside `out_dir` and
swaps the finished version folder into place with renames, so a killed or failed prepare never
damages an earlier prepared dataset, and a second prepare with the same options and sources is a no-op.
Decode worker processes die with the process that started them (even when it is SIGKILLed).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm.auto import tqdm

from imat.fileio import atomic_write_text, dir_lock, recover_dir, remove_stale_dirs, repair_dir, swap_in_dir
from imat.constants import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE_MODE, NUM_ATTRIBUTES, NUM_CATEGORIES, RESIZE_MODES
from imat.data_tools import garments as garment_tools, kaggle, sources as source_kinds
from imat.data_tools.images import decode_image, read_image_size
from imat.errors import ConfigError, DataError, ImageDecodeError

logger = logging.getLogger(__name__)

BUILDER_NAME = "imaterialist_fashion2020"      # TFDS derives it from the class name; checked below
VERSION = "1.0.0"
MANIFEST_NAME = "imat_manifest.json"
LABELS_NAME = "label_descriptions.json"
MANIFEST_FORMAT = 1
_STAGING_PREFIX = ".imat-staging-"
_OLD_PREFIX = ".imat-old-"     # where imat before the shared folder swap moved a dataset aside

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the Kaggle competition "iMaterialist (Fashion) 2020 at FGVC7"
(https://www.kaggle.com/c/imaterialist-fashion-2020-fgvc7/data) and give its folder as the
manual dir (`imat data prepare ROOT --out OUT`, or DownloadConfig(manual_dir=ROOT)). It must hold:
  ROOT/train.csv                 ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds
  ROOT/label_descriptions.json   the 46 categories and 294 attributes
  ROOT/train/<ImageId>.jpg       the training images
  ROOT/test/*.jpg                optional: unlabelled images, prepared as the "test" split
Or an image-level folder: ROOT/labels.csv (ImageId,ClassIds; ids space-separated) and
ROOT/images/<ImageId>.jpg. `imat data prepare SRC [SRC ...]` merges several folders of either kind.
"""


def config_name(image_size: int, resize_mode: str, garments: bool = False) -> str:
    return f"s{image_size}_{resize_mode}" + ("_garments" if garments else "")


@dataclasses.dataclass(eq=False)
class ImatConfig(tfds.core.BuilderConfig):
    """A builder config carrying the stored image size and resize mode (name e.g. "s128_stretch")."""

    image_size: int = DEFAULT_IMAGE_SIZE
    resize_mode: str = DEFAULT_RESIZE_MODE
    garments: bool = False      # one example per garment (padded mask-box crop), see imat.data_tools.garments


def make_config(image_size: int = DEFAULT_IMAGE_SIZE, resize_mode: str = DEFAULT_RESIZE_MODE,
                garments: bool = False) -> ImatConfig:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or not 8 <= image_size <= 4096:
        raise ConfigError(f"image_size={image_size!r}: give an integer between 8 and 4096 pixels (default 128)")
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"resize_mode={resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
    return ImatConfig(
        name=config_name(int(image_size), resize_mode, garments),
        description=(f"{'garment crops' if garments else 'images'} resized to {image_size}x{image_size} "
                     f"({resize_mode}), raw uint8"),
        image_size=int(image_size),
        resize_mode=resize_mode,
        garments=bool(garments),
    )


def split_ids(image_ids: Iterable[str], seed: int, val_fraction: float) -> tuple[list[str], list[str]]:
    """(train_ids, validation_ids), sorted: a seeded permutation of the sorted ids, by image.

    Depends only on the set of ids and the seed, never on the order of train.csv.
    """
    ids = sorted(set(image_ids))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ids))
    n_val = int(round(len(ids) * val_fraction))
    val = {ids[i] for i in perm[:n_val]}
    return [i for i in ids if i not in val], [i for i in ids if i in val]


# ---- decoding, in a worker pool ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Task:
    image_id: str
    path: str
    size: int
    mode: str
    need_size: bool        # unlabelled test images: no CSV Height/Width, read them from the header


def _decode_task(task: _Task) -> tuple[np.ndarray | None, tuple[int, int] | None, str | None]:
    """(image, (height, width) or None, error or None); runs in a worker, must not raise on bad files."""
    try:
        hw = None
        if task.need_size:
            w, h = read_image_size(task.path)
            hw = (h, w)
        return decode_image(task.path, task.size, task.mode), hw, None
    except ImageDecodeError as e:
        return None, None, e.reason


_PR_SET_PDEATHSIG = 1          # from <linux/prctl.h>
_PARENT_POLL_S = 1.0


def _arm_parent_death_signal() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:      # reparented: the parent is gone
            os._exit(1)


def _die_with_parent(parent_pid: int, use_prctl: bool = True) -> None:
    """Worker initializer: exit when the parent does, so a SIGKILLed prepare leaves no worker behind
    (blocked forever on its task queue, reparented to init).

    PR_SET_PDEATHSIG where Linux offers it (it fires when the forking *thread* ends: the pool is
    forked from the thread that runs prepare, which shuts it down before returning); else a daemon
    thread that polls the parent pid. Either way, a parent that died before this ran is noticed here.
    """
    armed = use_prctl and _arm_parent_death_signal()
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="imat-parent-watch").start()


def _make_executor(workers: int) -> concurrent.futures.Executor:
    """Processes (fork) when safe; threads when a multithreaded runtime (JAX) is loaded, where fork
    can deadlock. PIL releases the GIL while decoding and resizing, so threads still scale."""
    if workers == 1:
        return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="imat-decode")
    if "jax" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imat-decode")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"),
                                                  initializer=_die_with_parent, initargs=(os.getpid(),))
    pool.submit(int).result()   # with fork, the first submit forks every worker: do it now, not later
    return pool


def _ordered_map(executor, fn, items: Iterable, window: int) -> Iterator:
    """executor.map, in order, with at most `window` results in flight (bounded memory)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(executor.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---- the TFDS builder ---------------------------------------------------------------------------

class _ClassProperty:
    """Read-only class-level property (TFDS declares `code_path` as one)."""

    def __init__(self, fget):
        self.fget = fget

    def __get__(self, obj, cls=None):
        return self.fget(cls if cls is not None else type(obj))


class ImaterialistFashion2020(tfds.core.GeneratorBasedBuilder):
    """iMaterialist Fashion 2020 (FGVC7): pre-resized images with multi-hot categories and attributes."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "imat: raw uint8 images pre-resized by imat.data_tools.images.decode_image."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
    BUILDER_CONFIGS = [make_config(DEFAULT_IMAGE_SIZE, mode) for mode in RESIZE_MODES]

    # TFDS 4.9.10's `code_path` touches `importlib_resources.abc` for builders defined in a package,
    # but declares that dependency only for Python < 3.9: without it, every download_and_prepare
    # fails with ModuleNotFoundError. The answer is simply this file.
    code_path = _ClassProperty(lambda cls: epath.Path(__file__))

    def __init__(self, *, seed: int = 0, val_fraction: float = 0.2, workers: int | None = None,
                 strict: bool = False, sources: Sequence[kaggle.SourceDataset] | None = None,
                 executor: concurrent.futures.Executor | None = None,
                 garment_options: garment_tools.GarmentOptions | None = None, **kwargs):
        """seed/val_fraction: the train/validation split; workers: decode processes (default: all
        cores); strict: stop at the first problem; sources: the source folders already read (else
        the manual dir is read in _split_generators); executor: a decode pool to use (else one per split)."""
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.strict = bool(strict)
        self.problems: list[kaggle.Problem] = []      # filled while generating
        self.source_summary: str = ""
        self.labels = None
        self._sources = list(sources) if sources is not None else None
        self.source_counts: list[dict] = []           # per source: path, kind, counts (filled while generating)
        self._executor = executor
        self.garment_options = garment_options or garment_tools.GarmentOptions()
        self.garment_counts: dict = {}                # garments mode: kept / skipped masks (filled while generating)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        features = {
            "image_id": tfds.features.Text(),
            "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
            "categories": tfds.features.Tensor(shape=(NUM_CATEGORIES,), dtype=np.uint8),
            "attributes": tfds.features.Tensor(shape=(NUM_ATTRIBUTES,), dtype=np.uint8),
            "height": tfds.features.Scalar(dtype=np.int32, doc="original height in pixels"),
            "width": tfds.features.Scalar(dtype=np.int32, doc="original width in pixels"),
        }
        if getattr(self.builder_config, "garments", False):
            # image_id is "<ImageId>:<k>"; the photo's own id and the garment's place in it:
            features.update({
                "parent_image_id": tfds.features.Text(),
                "garment_k": tfds.features.Scalar(dtype=np.int32, doc="0-based row of the photo in train.csv"),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.int32, doc="x0, y0, x1, y1 (exclusive), pixels"),
                "category_id": tfds.features.Scalar(dtype=np.int32, doc="the garment's category id"),
                "mask_area": tfds.features.Scalar(dtype=np.int32, doc="mask pixels"),
            })
        return tfds.core.DatasetInfo(
            builder=self,
            description="iMaterialist Fashion 2020 images, resized once, with multi-hot labels.",
            features=tfds.features.FeaturesDict(features),
            homepage="https://www.kaggle.com/c/imaterialist-fashion-2020-fgvc7",
            # Written in generation order (sorted image ids): the pipelines shuffle per epoch
            # themselves, and skipping TFDS's shuffle avoids a pass through temporary buckets.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        read = self._sources if self._sources is not None else [source_kinds.read_source(root, strict=self.strict)]
        merged = source_kinds.merge_sources(read)
        labels = merged.labels
        if labels.num_categories != NUM_CATEGORIES or labels.num_attributes != NUM_ATTRIBUTES:
            raise DataError(f"{merged.labels_file}: {labels.num_categories} categories and "
                            f"{labels.num_attributes} attributes, expected {NUM_CATEGORIES} and "
                            f"{NUM_ATTRIBUTES} (the iMaterialist 2020 label space)")
        self.labels = labels
        self.problems = list(merged.problems)
        self.source_summary = "\n".join(ds.summary() for ds in read)
        self.source_counts = merged.counts
        by_id = {r.image_id: r for r in merged.labelled}
        # Split each source on its own: a photo is in the same split whether its source is
        # prepared alone or with others (so a benchmark's held-out photos stay held out).
        train_ids, val_ids = [], []
        for ds in read:
            t, v = split_ids([r.image_id for r in ds.records if r.categories], self.seed, self.val_fraction)
            train_ids += t
            val_ids += v
        train_ids, val_ids = sorted(train_ids), sorted(val_ids)
        if getattr(self.builder_config, "garments", False):
            return self._garment_splits(read, train_ids, val_ids)
        splits = {"train": self._generate_examples([by_id[i] for i in train_ids], "train")}
        if val_ids:
            splits["validation"] = self._generate_examples([by_id[i] for i in val_ids], "validation")
        if merged.unlabelled:
            logger.warning("%d photos have no labels: kept out of train/validation, written to the "
                           "'unlabelled' split (e.g. %s)", len(merged.unlabelled),
                           ", ".join(f"{r.path}" for r in merged.unlabelled[:3]))
            splits["unlabelled"] = self._generate_examples(sorted(merged.unlabelled, key=lambda r: r.image_id),
                                                           "unlabelled")
        test = _test_records(read)
        if test:
            splits["test"] = self._generate_examples(test, "test")
        return splits

    def _generate_examples(self, items: list[kaggle.ImageRecord], split: str):
        """Yields (image_id, example); originals decoded in a pool of `workers`, in order."""
        size, mode = self.builder_config.image_size, self.builder_config.resize_mode
        tasks = [_Task(r.image_id, str(r.path), size, mode, need_size=r.height is None) for r in items]
        if self._executor is not None:
            yield from self._examples(self._executor, items, tasks, split)
            return
        pool = _make_executor(self.workers)
        try:
            yield from self._examples(pool, items, tasks, split)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)   # on failure, do not decode what is queued

    def _skip_corrupt(self, task, error: str, what: str = "") -> None:
        """Record a photo that failed to decode (or stop, in strict mode), naming its file."""
        problem = kaggle.Problem(task.path, None, task.image_id, f"corrupt image: {error}")
        if self.strict:
            raise DataError(f"{problem} (strict mode stops at the first problem; "
                            "remove or replace the file, or rerun without --strict)")
        logger.warning("skipped: %s%s", problem, what)
        self.problems.append(problem)

    def _examples(self, pool, items: list[kaggle.ImageRecord], tasks: list[_Task], split: str):
        skipped = 0
        with tqdm(total=len(tasks), desc=f"decoding {split}", unit="img", disable=None) as bar:
            results = _ordered_map(pool, _decode_task, tasks, window=self.workers * 16)
            for item, task, (image, hw, error) in zip(items, tasks, results):
                bar.update(1)
                if error is not None:
                    self._skip_corrupt(task, error)
                    skipped += 1
                    continue
                # Image-level and test records: no attributes (all zero), size from the image header.
                categories = self.labels.categories_to_multihot(item.categories).astype(np.uint8)
                attributes = self.labels.attributes_to_multihot(item.attributes).astype(np.uint8)
                height, width = (item.height, item.width) if hw is None else hw
                yield task.image_id, {
                    "image_id": task.image_id, "image": image, "categories": categories,
                    "attributes": attributes, "height": height, "width": width,
                }
        if skipped:
            logger.warning("%s: %d of %d images skipped as corrupt", split, skipped, len(tasks))


    # ---- garments: one example per garment, split by parent photo -------------------------------

    def _garment_splits(self, read: Sequence[kaggle.SourceDataset], train_ids: list[str], val_ids: list[str]):
        """Garments of the photos of each split (a photo's garments all go where the photo goes)."""
        by_photo: dict[str, list[garment_tools.Garment]] = {}
        counts = collections.Counter()
        for ds in read:
            gs = garment_tools.garments_of(ds, self.garment_options)
            counts.update(gs.counts())
            for g in gs.garments:
                by_photo.setdefault(g.image_id, []).append(g)
        self.garment_counts = dict(counts)
        splits = {"train": self._generate_garment_examples([by_photo[i] for i in train_ids if i in by_photo],
                                                           "train")}
        if val_ids:
            splits["validation"] = self._generate_garment_examples(
                [by_photo[i] for i in val_ids if i in by_photo], "validation")
        return splits

    def _generate_garment_examples(self, photos: list[list[garment_tools.Garment]], split: str):
        size, mode = self.builder_config.image_size, self.builder_config.resize_mode
        padding = float(self.garment_options.padding)
        tasks = [_GarmentTask(gs[0].image_id, str(gs[0].path), tuple(g.box for g in gs), size, mode, padding)
                 for gs in photos]
        pool = self._executor or _make_executor(self.workers)
        try:
            results = _ordered_map(pool, _decode_garment_task, tasks, window=self.workers * 16)
            with tqdm(total=len(tasks), desc=f"cropping {split}", unit="photo", disable=None) as bar:
                for garments, task, (crops, error) in zip(photos, tasks, results):
                    bar.update(1)
                    if error is not None:
                        self._skip_corrupt(task, error, f" ({len(garments)} garments)")
                        continue
                    for g, crop in zip(garments, crops):
                        yield g.id, {
                            "image_id": g.id, "image": crop,
                            "categories": self.labels.categories_to_multihot([g.category_id]).astype(np.uint8),
                            "attributes": self.labels.attributes_to_multihot(g.attribute_ids).astype(np.uint8),
                            "height": g.height, "width": g.width, "parent_image_id": g.image_id,
                            "garment_k": g.k, "box": np.asarray(g.box, np.int32), "category_id": g.category_id,
                            "mask_area": g.area,
                        }
        finally:
            if self._executor is None:
                pool.shutdown(wait=True, cancel_futures=True)


@dataclasses.dataclass(frozen=True)
class _GarmentTask:
    image_id: str
    path: str
    boxes: tuple
    size: int
    mode: str
    padding: float


def _decode_garment_task(task: _GarmentTask) -> tuple[list[np.ndarray] | None, str | None]:
    """(crops of the photo's garments, None) or (None, error); runs in a worker, must not raise on bad files."""
    try:
        return garment_tools.decode_crops(task.path, task.boxes, task.size, task.mode, task.padding), None
    except ImageDecodeError as e:
        return None, e.reason
    except ConfigError as e:   # a mask box outside the photo (train.csv size disagrees with the image)
        return None, str(e)


assert ImaterialistFashion2020.name == BUILDER_NAME, ImaterialistFashion2020.name


def _test_records(read: Sequence[kaggle.SourceDataset]) -> list[kaggle.ImageRecord]:
    """Unlabelled records of the Kaggle sources' test/ folders; id = file stem (the file name if two
    stems clash)."""
    paths = [p for ds in read if ds.kind == source_kinds.KAGGLE and (ds.root / "test").is_dir()
             for p in kaggle.list_images(ds.root / "test")]
    stems = collections.Counter(p.stem for p in paths)
    by_id: dict[str, pathlib.Path] = {}
    for p in paths:
        image_id = p.stem if stems[p.stem] == 1 else p.name
        if image_id in by_id:
            raise DataError(f"{p}: test image {image_id} also in {by_id[image_id]}; rename one "
                            "(test images of all sources share one split)")
        by_id[image_id] = p
    return [kaggle.ImageRecord(image_id=i, path=p, height=None, width=None, masks=(), categories=(),
                               attributes=()) for i, p in by_id.items()]


# ---- prepare: staging, manifest, atomic swap ------------------------------------------------------

def dataset_dir(out_dir, image_size: int = DEFAULT_IMAGE_SIZE, resize_mode: str = DEFAULT_RESIZE_MODE,
                garments: bool = False) -> pathlib.Path:
    """Where `prepare(root, out_dir, ...)` puts the dataset of these options."""
    return pathlib.Path(out_dir) / BUILDER_NAME / config_name(image_size, resize_mode, garments) / VERSION


def _stat_signature(path: pathlib.Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


_SIGNATURE_FILES = {
    source_kinds.KAGGLE: ("train.csv", LABELS_NAME, "train", "test"),
    source_kinds.IMAGE_LEVEL: (source_kinds.IMAGE_LEVEL_CSV, source_kinds.IMAGE_LEVEL_IMAGES),
}


def _source_signature(root: pathlib.Path, kind: str = source_kinds.KAGGLE) -> dict:
    """Cheap change detector of a source folder (sizes and mtimes; a folder's mtime changes when
    files are added or removed)."""
    return {name: _stat_signature(root / name) for name in _SIGNATURE_FILES[kind]}


def _same_request(existing: dict, request: dict) -> bool:
    """Does an existing manifest describe what `request` asks for? Sources compare by path, kind and
    signature (the manifest adds their counts)."""
    def key(entry: dict) -> tuple:
        return entry.get("path"), entry.get("kind"), entry.get("signature")

    for k, want in request.items():
        have = existing.get(k)
        if k == "sources":
            if not isinstance(have, list) or [key(e) for e in have if isinstance(e, dict)] != [key(e) for e in want]:
                return False
        elif have != want:
            return False
    return True


def read_manifest(data_dir) -> dict | None:
    path = pathlib.Path(data_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("%s: unreadable manifest (%s); the dataset will be rebuilt", path, e)
        return None


def _write_json(path: pathlib.Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _recover(out_dir: pathlib.Path, target: pathlib.Path) -> None:
    """Remove staging folders of dead prepares; repair a swap of `target` that was killed (imat.fileio)."""
    remove_stale_dirs(out_dir, _STAGING_PREFIX)
    repair_dir(target, error=DataError, legacy_old_prefixes=(f"{_OLD_PREFIX}{target.name}-",))


def _swap_in(built: pathlib.Path, target: pathlib.Path) -> None:
    """Swap the finished dataset in under the lock of `target` (imat.fileio): of two concurrent
    prepares with the same options, the second to swap fails with a DataError naming the other's
    pid instead of colliding."""
    with dir_lock(target, error=DataError, option="--out"):
        recover_dir(target, legacy_old_prefixes=(f"{_OLD_PREFIX}{target.name}-",))
        swap_in_dir(built, target)


class _QuietCustomConfig(logging.Filter):
    """Drops TFDS's 'Using custom data configuration' warning: sizes other than 128 are custom
    configs by design, not a mistake worth a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Using custom data configuration" not in record.getMessage()


def prepare(roots, out_dir, *, image_size: int = DEFAULT_IMAGE_SIZE, resize_mode: str = DEFAULT_RESIZE_MODE,
            workers: int | None = None, seed: int = 0, val_fraction: float = 0.2,
            strict: bool = False, garments: bool = False,
            garment_options: garment_tools.GarmentOptions | None = None) -> pathlib.Path:
    """Prepare one source folder, or several merged, into `out_dir`; returns the dataset folder to train from.

    garments=True: one example per garment of the Kaggle sources' masks (`imat.data_tools.garments`;
    `garment_options` say which and how they are cropped), in `.../s<size>_<mode>_garments/1.0.0`, split by
    parent photo (the photo split of the whole-photo dataset), with `"garments": true` in the manifest.

    `roots` is a folder or a sequence of folders, each Kaggle-layout or image-level (see
    `imat.data_tools.sources`). The returned folder is `out_dir/imaterialist_fashion2020/s<size>_<mode>/1.0.0`
    (a TFDS dataset directory: `tfds.builder_from_directory` and `PreparedSplit.open` take it). Reruns
    with the same options and unchanged sources are no-ops; other options or a changed source rebuild it.
    """
    config = make_config(image_size, resize_mode, garments)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction={val_fraction!r}: give a fraction in [0, 1), e.g. 0.2 for 80/20")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r}: give a non-negative integer seed for the train/validation split")
    if workers is not None and int(workers) < 1:
        raise ConfigError(f"workers={workers!r}: give a positive number of decode processes")
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    roots = [pathlib.Path(r).expanduser().resolve() for r in roots]
    if not roots:
        raise ConfigError("no source folder given; give at least one dataset folder to prepare")
    out_dir = pathlib.Path(out_dir).expanduser().resolve()
    kinds = []
    for root in roots:
        if not root.is_dir():
            raise DataError(f"{root}: not a folder; give a Kaggle folder (train.csv, {LABELS_NAME}, train/) "
                            f"or an image-level folder ({source_kinds.IMAGE_LEVEL_CSV}, images/)")
        if roots.count(root) > 1:
            raise ConfigError(f"{root}: given twice as a source; give each source folder once")
        kinds.append(source_kinds.detect_kind(root))
        image_dir = root / ("images" if kinds[-1] == source_kinds.IMAGE_LEVEL else "train")
        if out_dir == root or out_dir == image_dir or image_dir in out_dir.parents:
            raise ConfigError(f"out_dir={out_dir}: write the prepared dataset outside the source image folder "
                              f"{image_dir}")
    if garments and any(k != source_kinds.KAGGLE for k in kinds):
        bad = next(r for r, k in zip(roots, kinds) if k != source_kinds.KAGGLE)
        raise ConfigError(f"{bad}: --garments needs Kaggle-layout sources (train.csv with masks); this one has "
                          "image-level labels only")
    target = dataset_dir(out_dir, config.image_size, config.resize_mode, garments)
    request = {
        "format": MANIFEST_FORMAT, "builder": BUILDER_NAME, "version": VERSION, "config": config.name,
        "image_size": config.image_size, "resize_mode": config.resize_mode, "seed": int(seed),
        "val_fraction": float(val_fraction),
        # Sorted by path: the dataset is a function of the set of sources (the split is by id).
        "sources": sorted(({"path": str(r), "kind": k, "signature": _source_signature(r, k)}
                           for r, k in zip(roots, kinds)), key=lambda e: e["path"]),
    }
    if garments:
        garment_options = garment_options or garment_tools.GarmentOptions()
        request.update({"garments": True, **garment_options.to_manifest()})
    _recover(out_dir, target)
    existing = read_manifest(target)
    if existing is not None and _same_request(existing, request):
        logger.info("%s is already prepared with these options; nothing to do", target)
        return target
    if existing is not None:
        changed = sorted(k for k in request if not _same_request({k: existing.get(k)}, {k: request[k]}))
        logger.warning("%s exists but differs in %s; rebuilding (the old one stays until the new one is done)",
                       target, ", ".join(changed))
    # User errors surface before any writing.
    read = [source_kinds.read_source(r, strict=strict) for r in roots]
    source_kinds.merge_sources(read)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f"{_STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    # The decode pool is started before TFDS starts any writer thread, so forking it is safe.
    pool = _make_executor(max(1, int(workers or os.cpu_count() or 1)))
    try:
        # TFDS wants the predefined configs by name and only other sizes as config objects.
        known = config.name in ImaterialistFashion2020.builder_configs
        quiet = _QuietCustomConfig()
        logging.getLogger("absl").addFilter(quiet)
        try:
            builder = ImaterialistFashion2020(
                data_dir=str(staging), config=config.name if known else config, file_format="array_record",
                seed=seed, val_fraction=val_fraction, workers=workers, strict=strict, sources=read,
                executor=pool, garment_options=garment_options)
        finally:
            logging.getLogger("absl").removeFilter(quiet)
        builder.download_and_prepare(
            download_dir=str(staging / "downloads"),
            download_config=tfds.download.DownloadConfig(manual_dir=str(roots[0])),
        )
        built = pathlib.Path(str(builder.data_dir))
        splits = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
        counts = {c["path"]: c for c in builder.source_counts}
        manifest = dict(request)
        manifest.update({
            "sources": [{**entry, **counts.get(entry["path"], {})} for entry in request["sources"]],
            "splits": splits,
            "num_problems": len(builder.problems),
            "problems": [str(p) for p in builder.problems[:1000]],
            "problem_counts": dict(collections.Counter(p.kind for p in builder.problems)),
            "image_format": "raw uint8 (H, W, 3)",
            "decoder": "imat.data_tools.images.decode_image",
        })
        if garments:
            manifest.update({"decoder": "imat.data_tools.garments.decode_crops",
                             "garment_counts": builder.garment_counts})
        if len(roots) == 1:   # the single-source manifest's field, kept for readers of older manifests
            manifest["source_root"] = str(roots[0])
        _write_json(built / LABELS_NAME, builder.labels.to_json_dict())
        _write_json(built / MANIFEST_NAME, manifest)
        _swap_in(built, target)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("prepared %s: %s (%d problems)", target,
                ", ".join(f"{k} {v}" for k, v in splits.items()), len(builder.problems))
    return target
