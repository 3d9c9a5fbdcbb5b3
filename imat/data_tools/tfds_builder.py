"""TFDS builder for iMaterialist Fashion 2020: Kaggle folder (manual dir) -> array_record, pre-resized.

Works without TensorFlow: `GeneratorBasedBuilder` + `file_format="array_record"` serialises examples
with TFDS's numpy/protobuf path, and `tfds.builder_from_directory(dir).as_data_source()` reads them
back with random access (see `imat.data_tools.pipelines`). Only `tfds.features.Tensor` / `Text` /
`Scalar` are used: `tfds.features.Image` needs TensorFlow to encode.

Images are stored as raw uint8 tensors (S, S, 3), already decoded and resized by the one decoder
`imat.data_tools.images.decode_image`: reading one back is a protobuf parse and a memcpy (PNG/JPEG
would need TF or a decode per read, which is what preparing is meant to avoid).

`prepare(...)` is the entry point. It builds into a private staging folder inside `out_dir` and
swaps the finished version folder into place with renames, so a killed or failed prepare never
damages an earlier prepared dataset, and a second prepare with the same options is a no-op.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import secrets
import shutil
import sys
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tqdm.auto import tqdm

from imat.fileio import atomic_write_text, dir_lock, recover_dir, remove_stale_dirs, repair_dir, swap_in_dir
from imat.constants import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE_MODE, NUM_ATTRIBUTES, NUM_CATEGORIES, RESIZE_MODES
from imat.data_tools import kaggle
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
manual dir (`imat data prepare ROOT OUT`, or DownloadConfig(manual_dir=ROOT)). It must hold:
  ROOT/train.csv                 ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds
  ROOT/label_descriptions.json   the 46 categories and 294 attributes
  ROOT/train/<ImageId>.jpg       the training images
  ROOT/test/*.jpg                optional: unlabelled images, prepared as the "test" split
"""


def config_name(image_size: int, resize_mode: str) -> str:
    return f"s{image_size}_{resize_mode}"


@dataclasses.dataclass(eq=False)
class ImatConfig(tfds.core.BuilderConfig):
    """A builder config carrying the stored image size and resize mode (name e.g. "s128_stretch")."""

    image_size: int = DEFAULT_IMAGE_SIZE
    resize_mode: str = DEFAULT_RESIZE_MODE


def make_config(image_size: int = DEFAULT_IMAGE_SIZE, resize_mode: str = DEFAULT_RESIZE_MODE) -> ImatConfig:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or not 8 <= image_size <= 4096:
        raise ConfigError(f"image_size={image_size!r}: give an integer between 8 and 4096 pixels (default 128)")
    if resize_mode not in RESIZE_MODES:
        raise ConfigError(f"resize_mode={resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
    return ImatConfig(
        name=config_name(int(image_size), resize_mode),
        description=f"images resized to {image_size}x{image_size} ({resize_mode}), raw uint8",
        image_size=int(image_size),
        resize_mode=resize_mode,
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


def _make_executor(workers: int) -> concurrent.futures.Executor:
    """Processes (fork) when safe; threads when a multithreaded runtime (JAX) is loaded, where fork
    can deadlock. PIL releases the GIL while decoding and resizing, so threads still scale."""
    if workers == 1:
        return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="imat-decode")
    if "jax" in sys.modules or "fork" not in multiprocessing.get_all_start_methods():
        return concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imat-decode")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
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
                 strict: bool = False, source: kaggle.KaggleDataset | None = None,
                 executor: concurrent.futures.Executor | None = None, **kwargs):
        """seed/val_fraction: the train/validation split; workers: decode processes (default: all
        cores); strict: stop at the first problem; source: the manual dir already read (else it is
        read in _split_generators); executor: a decode pool to use (else one per split)."""
        self.seed = int(seed)
        self.val_fraction = float(val_fraction)
        self.workers = max(1, int(workers or os.cpu_count() or 1))
        self.strict = bool(strict)
        self.problems: list[kaggle.Problem] = []      # filled while generating
        self.source_summary: str = ""
        self.labels = None
        self._source = source
        self._executor = executor
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="iMaterialist Fashion 2020 images, resized once, with multi-hot labels.",
            features=tfds.features.FeaturesDict({
                "image_id": tfds.features.Text(),
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
                "categories": tfds.features.Tensor(shape=(NUM_CATEGORIES,), dtype=np.uint8),
                "attributes": tfds.features.Tensor(shape=(NUM_ATTRIBUTES,), dtype=np.uint8),
                "height": tfds.features.Scalar(dtype=np.int32, doc="original height in pixels"),
                "width": tfds.features.Scalar(dtype=np.int32, doc="original width in pixels"),
            }),
            homepage="https://www.kaggle.com/c/imaterialist-fashion-2020-fgvc7",
            # Written in generation order (sorted image ids): the pipelines shuffle per epoch
            # themselves, and skipping TFDS's shuffle avoids a pass through temporary buckets.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        ds = self._source if self._source is not None else kaggle.read_kaggle(root, strict=self.strict)
        if ds.labels.num_categories != NUM_CATEGORIES or ds.labels.num_attributes != NUM_ATTRIBUTES:
            raise DataError(f"{root / LABELS_NAME}: {ds.labels.num_categories} categories and "
                            f"{ds.labels.num_attributes} attributes, expected {NUM_CATEGORIES} and "
                            f"{NUM_ATTRIBUTES} (the iMaterialist 2020 label space)")
        if not ds.records:
            raise DataError(f"{root / 'train.csv'}: no usable image (see the problems logged above)")
        self.labels = ds.labels
        self.problems = list(ds.problems)
        self.source_summary = ds.summary()
        by_id = {r.image_id: r for r in ds.records}
        train_ids, val_ids = split_ids(by_id, self.seed, self.val_fraction)
        splits = {"train": self._generate_examples([by_id[i] for i in train_ids], "train")}
        if val_ids:
            splits["validation"] = self._generate_examples([by_id[i] for i in val_ids], "validation")
        test_dir = root / "test"
        if test_dir.is_dir():
            test_paths = kaggle.list_images(test_dir)
            if test_paths:
                splits["test"] = self._generate_examples(test_paths, "test")
        return splits

    def _generate_examples(self, items: list, split: str):
        """Yields (image_id, example); originals decoded in a pool of `workers`, in order."""
        size, mode = self.builder_config.image_size, self.builder_config.resize_mode
        labelled = split != "test"
        if labelled:   # ImageRecords
            tasks = [_Task(r.image_id, str(r.path), size, mode, need_size=False) for r in items]
        else:          # paths of unlabelled images: id = file stem (the file name if two stems clash)
            stems = collections.Counter(p.stem for p in items)
            tasks = [_Task(p.stem if stems[p.stem] == 1 else p.name, str(p), size, mode, need_size=True)
                     for p in items]
        if self._executor is not None:
            yield from self._examples(self._executor, items, tasks, labelled, split)
            return
        pool = _make_executor(self.workers)
        try:
            yield from self._examples(pool, items, tasks, labelled, split)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)   # on failure, do not decode what is queued

    def _examples(self, pool, items: list, tasks: list[_Task], labelled: bool, split: str):
        zeros_c = np.zeros(NUM_CATEGORIES, np.uint8)
        zeros_a = np.zeros(NUM_ATTRIBUTES, np.uint8)
        skipped = 0
        with tqdm(total=len(tasks), desc=f"decoding {split}", unit="img", disable=None) as bar:
            results = _ordered_map(pool, _decode_task, tasks, window=self.workers * 16)
            for item, task, (image, hw, error) in zip(items, tasks, results):
                bar.update(1)
                if error is not None:
                    problem = kaggle.Problem(task.path, None, task.image_id, f"corrupt image: {error}")
                    if self.strict:
                        raise DataError(f"{problem} (strict mode stops at the first problem; "
                                        "remove or replace the file, or rerun without --strict)")
                    logger.warning("skipped: %s", problem)
                    self.problems.append(problem)
                    skipped += 1
                    continue
                if labelled:
                    categories = self.labels.categories_to_multihot(item.categories).astype(np.uint8)
                    attributes = self.labels.attributes_to_multihot(item.attributes).astype(np.uint8)
                    height, width = item.height, item.width
                else:
                    categories, attributes = zeros_c, zeros_a
                    height, width = hw
                yield task.image_id, {
                    "image_id": task.image_id, "image": image, "categories": categories,
                    "attributes": attributes, "height": height, "width": width,
                }
        if skipped:
            logger.warning("%s: %d of %d images skipped as corrupt", split, skipped, len(tasks))


assert ImaterialistFashion2020.name == BUILDER_NAME, ImaterialistFashion2020.name


# ---- prepare: staging, manifest, atomic swap ------------------------------------------------------

def dataset_dir(out_dir, image_size: int = DEFAULT_IMAGE_SIZE, resize_mode: str = DEFAULT_RESIZE_MODE) -> pathlib.Path:
    """Where `prepare(root, out_dir, ...)` puts the dataset of these options."""
    return pathlib.Path(out_dir) / BUILDER_NAME / config_name(image_size, resize_mode) / VERSION


def _stat_signature(path: pathlib.Path) -> list[int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _source_signature(root: pathlib.Path) -> dict:
    """Cheap change detector of the Kaggle folder (sizes and mtimes; a folder's mtime changes when
    files are added or removed)."""
    return {name: _stat_signature(root / name) for name in ("train.csv", LABELS_NAME, "train", "test")}


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


def prepare(root, out_dir, *, image_size: int = DEFAULT_IMAGE_SIZE, resize_mode: str = DEFAULT_RESIZE_MODE,
            workers: int | None = None, seed: int = 0, val_fraction: float = 0.2,
            strict: bool = False) -> pathlib.Path:
    """Prepare the Kaggle folder `root` into `out_dir`; returns the dataset folder to train from.

    The returned folder is `out_dir/imaterialist_fashion2020/s<size>_<mode>/1.0.0` (a TFDS dataset
    directory: `tfds.builder_from_directory` and `PreparedSplit.open` take it). Reruns with the same
    options and an unchanged source are no-ops; other options or a changed source rebuild it.
    """
    config = make_config(image_size, resize_mode)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction={val_fraction!r}: give a fraction in [0, 1), e.g. 0.2 for 80/20")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r}: give a non-negative integer seed for the train/validation split")
    if workers is not None and int(workers) < 1:
        raise ConfigError(f"workers={workers!r}: give a positive number of decode processes")
    root = pathlib.Path(root).expanduser().resolve()
    out_dir = pathlib.Path(out_dir).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the Kaggle folder (train.csv, {LABELS_NAME}, train/)")
    if out_dir == root or out_dir == root / "train" or (root / "train") in out_dir.parents:
        raise ConfigError(f"out_dir={out_dir}: write the prepared dataset outside the Kaggle image folder")
    target = dataset_dir(out_dir, config.image_size, config.resize_mode)
    request = {
        "format": MANIFEST_FORMAT, "builder": BUILDER_NAME, "version": VERSION, "config": config.name,
        "image_size": config.image_size, "resize_mode": config.resize_mode, "seed": int(seed),
        "val_fraction": float(val_fraction), "source_root": str(root), "source_signature": _source_signature(root),
    }
    _recover(out_dir, target)
    existing = read_manifest(target)
    if existing is not None and {k: existing.get(k) for k in request} == request:
        logger.info("%s is already prepared with these options; nothing to do", target)
        return target
    if existing is not None:
        changed = sorted(k for k in request if existing.get(k) != request[k])
        logger.warning("%s exists but differs in %s; rebuilding (the old one stays until the new one is done)",
                       target, ", ".join(changed))
    source = kaggle.read_kaggle(root, strict=strict)   # user errors surface before any writing
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
                seed=seed, val_fraction=val_fraction, workers=workers, strict=strict, source=source,
                executor=pool)
        finally:
            logging.getLogger("absl").removeFilter(quiet)
        builder.download_and_prepare(
            download_dir=str(staging / "downloads"),
            download_config=tfds.download.DownloadConfig(manual_dir=str(root)),
        )
        built = pathlib.Path(str(builder.data_dir))
        splits = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
        manifest = dict(request)
        manifest.update({
            "splits": splits,
            "num_problems": len(builder.problems),
            "problems": [str(p) for p in builder.problems[:1000]],
            "problem_counts": dict(collections.Counter(p.kind for p in builder.problems)),
            "image_format": "raw uint8 (H, W, 3)",
            "decoder": "imat.data_tools.images.decode_image",
        })
        _write_json(built / LABELS_NAME, builder.labels.to_json_dict())
        _write_json(built / MANIFEST_NAME, manifest)
        _swap_in(built, target)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("prepared %s: %s (%d problems)", target,
                ", ".join(f"{k} {v}" for k, v in splits.items()), len(builder.problems))
    return target
