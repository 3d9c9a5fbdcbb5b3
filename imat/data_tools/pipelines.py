"""Batches for training from a prepared split: classification, triplet (online/offline), rotation.

Every batch is a pure function of (seed, step): epoch = step // steps_per_epoch, one
permutation per epoch, per-step random generators for sampling and augmentation. A run resumed
at step k therefore sees exactly the batches it would have seen. Multi-host: `shard_index` /
`num_shards` give each host a disjoint, equally sized shard of the split. Triplet positives and
negatives follow the shared relevance rule (:mod:`imat.relevance`). Batches are plain numpy,
ready for jax.device_put.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from imat.data_tools import triplets
from imat.data_tools.augment import augment_batch, four_rotations, mixup_batch
from imat.data_tools.prefetch import prefetch
from imat.data_tools.prepared import PreparedSplit, find_dataset_dir
from imat.errors import ConfigError
from imat.relevance import Relevance, jaccard

logger = logging.getLogger(__name__)

KINDS = ("classification", "triplet", "rotation")
TRIPLET_SAMPLING = ("online", "offline")
# Stream tags mixed into the seed so that permutations, sampling, augmentation and mining draw
# from independent generators.
_PERMUTE, _SAMPLE, _AUGMENT, _MINE, _MIXUP = 0, 1, 2, 3, 4


# ---- batch sources -------------------------------------------------------------------------------------

class BatchSource:
    """Deterministic batches of one prepared split (this host's shard of it)."""

    kind = "base"

    def __init__(self, split: PreparedSplit, *, batch_size: int, seed: int, augment: bool = False,
                 shard_index: int = 0, num_shards: int = 1, relevance: Relevance = Relevance()):
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
        self.relevance = relevance
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
        """The images (augmented when asked) and categories of ``batch_indices(step)``."""
        rows = self.batch_indices(step)
        return {"images": self._images(rows, step), "categories": self.split.categories[rows]}

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

    def iterate(self, start_step: int = 0, num_steps: int | None = None, prefetch_depth: int = 2) -> Iterator[dict]:
        """batch(start_step), batch(start_step + 1), ...; a background thread keeps `prefetch_depth` ready."""
        start = int(start_step)
        steps = range(start, start + int(num_steps)) if num_steps is not None else _count(start)
        return prefetch(self.batch, steps, prefetch_depth, name=f"imat-prefetch-{self.kind}")


def _count(start: int) -> Iterator[int]:
    while True:
        yield start
        start += 1


class ClassificationSource(BatchSource):
    """Images and their multi-hot categories; ``mixup`` > 0 blends each with a partner from the batch
    (``augment.mixup_batch``, Beta(mixup, mixup)), after the crop and flip."""

    kind = "classification"

    def __init__(self, split, *, mixup: float = 0.0, **kw):
        super().__init__(split, **kw)
        if not mixup >= 0:
            raise ConfigError(f"mixup={mixup!r}: give alpha >= 0 (0 turns mixup off)")
        self.mixup = float(mixup)
        self._check_size()

    def batch_indices(self, step: int) -> np.ndarray:
        _, units = self._units(step)
        return self.indices[units]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        rows = self.batch_indices(step)
        images, categories = self._images(rows, step), self.split.categories[rows]
        if self.mixup > 0:
            images, categories = mixup_batch(images, categories, self.mixup, self._rng(_MIXUP, int(step)))
        return {"images": images, "categories": categories}


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
    """Batches of B images in which every anchor has a positive by the relevance rule.

    Each epoch walks a permutation of the usable anchors (images with at least one relevant
    image in the shard); each anchor brings one positive drawn uniformly among the images
    relevant to it (Jaccard >= positive_threshold), preferring images not yet in the batch.
    Layout: [anchors (B//2); positives (B - B//2)]; with odd B the first anchor gets two.
    Relevance is computed between the distinct category sets of the shard (few, even for a
    large dataset), never between all N x N images.
    """

    kind = "triplet"

    def __init__(self, split, **kw):
        super().__init__(split, **kw)
        if self.batch_size < 2:
            raise ConfigError(f"batch_size={self.batch_size}: triplet batches need at least 2 images")
        sets, self._set_of = np.unique(self.categories >= 0.5, axis=0, return_inverse=True)
        self._set_of = self._set_of.reshape(-1)
        counts = np.bincount(self._set_of, minlength=len(sets))
        self._members = [np.flatnonzero(self._set_of == s) for s in range(len(sets))]
        relevant = jaccard(sets) >= self.relevance.positive_threshold   # [S, S], the diagonal included
        self._relevant_sets = [np.flatnonzero(row) for row in relevant]
        # Images relevant to an image of set s, the image itself excluded.
        others = np.array([counts[r].sum() for r in self._relevant_sets]) - 1
        self._pool = np.flatnonzero(others[self._set_of] > 0)     # shard positions that can be anchors
        dropped = len(self.indices) - len(self._pool)
        if dropped:
            logger.info("online triplets: %d of %d images have no relevant image (Jaccard >= %g); not used as anchors",
                        dropped, len(self.indices), self.relevance.positive_threshold)
        self._check_size()

    def _num_units(self) -> int:
        return len(self._pool)

    def _units_per_step(self) -> int:
        return self.batch_size // 2

    def _candidates(self, a: int) -> np.ndarray:
        cands = np.concatenate([self._members[s] for s in self._relevant_sets[self._set_of[a]]])
        return cands[cands != a]

    def batch_indices(self, step: int) -> np.ndarray:
        _, units = self._units(step)
        anchors = self._pool[units]
        rng = self._rng(_SAMPLE, int(step))
        in_batch = np.zeros(len(self.indices), bool)
        in_batch[anchors] = True
        owners = list(anchors) + ([anchors[0]] if self.batch_size % 2 else [])
        positives = []
        for a in owners:
            cands = self._candidates(int(a))             # non-empty: a is in the pool
            fresh = cands[~in_batch[cands]]
            pool = fresh if len(fresh) else cands          # tiny shards: repeat an image rather than fail
            pick = int(pool[rng.integers(len(pool))])
            positives.append(pick)
            in_batch[pick] = True
        return self.indices[np.concatenate([anchors, np.asarray(positives, np.int64)])]


class OfflineTripletSource(BatchSource):
    """Triplets mined once per epoch over the shard (`triplets.mine_offline`, the shared relevance
    rule, with relaxed negatives for anchors that overlap every image); batch = B triplets laid out
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
                # relax_negatives: on street photos some anchors overlap every other image; they get
                # the least-overlapping negative instead of being dropped.
                self._mined = (epoch, triplets.mine_offline(self.categories, seed, relevance=self.relevance,
                                                            relax_negatives=True))
            return self._mined[1]

    def _num_units(self) -> int:
        return self._num_triplets

    def batch_indices(self, step: int) -> np.ndarray:
        epoch, units = self._units(step)
        m = self._mine(epoch)
        local = np.concatenate([m.anchors[units], m.positives[units], m.negatives[units]])
        return self.indices[local]


class ShardGroup:
    """Several shards of one split read by one process: each batch is their batches end to end.

    A process that reads shards k..k+m-1 of N supplies rows [k*b, (k+m)*b) of the global batch
    (b the per-shard batch), so the global batch is the same whatever the number of processes.
    """

    def __init__(self, sources: Sequence[BatchSource]):
        if not sources:
            raise ValueError("a shard group needs at least one source")
        self.sources = list(sources)
        self.kind = self.sources[0].kind
        self.split = self.sources[0].split
        self.batch_size = sum(s.batch_size for s in self.sources)

    @property
    def steps_per_epoch(self) -> int:
        return min(s.steps_per_epoch for s in self.sources)

    def batch_indices(self, step: int) -> np.ndarray:
        return np.concatenate([s.batch_indices(step) for s in self.sources])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        if len(self.sources) == 1:
            return self.sources[0].batch(step)
        parts = [s.batch(step) for s in self.sources]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def iterate(self, start_step: int = 0, num_steps: int | None = None, prefetch_depth: int = 2) -> Iterator[dict]:
        """As BatchSource.iterate."""
        start = int(start_step)
        steps = range(start, start + int(num_steps)) if num_steps is not None else _count(start)
        return prefetch(self.batch, steps, prefetch_depth, name=f"imat-prefetch-{self.kind}")


def make_pipeline(kind: str, split: PreparedSplit, *, batch_size: int, seed: int, augment: bool = False,
                  mining: str = "online", shard_index: int = 0, num_shards: int = 1,
                  relevance: Relevance = Relevance(), mixup: float = 0.0) -> BatchSource:
    """A BatchSource of `kind` (classification | triplet | rotation) over this host's shard of `split`;
    `mining` (triplet only): "online" batches for in-batch mining or "offline" mined triplets;
    `mixup` (classification only): Beta alpha of in-batch mixup, 0 for none."""
    kw = dict(batch_size=batch_size, seed=seed, augment=augment, shard_index=shard_index, num_shards=num_shards,
              relevance=relevance)
    if mixup and kind != "classification":
        raise ConfigError(f"mixup={mixup!r}: only the classification pipeline mixes photos, not {kind!r}")
    if kind == "classification":
        return ClassificationSource(split, mixup=mixup, **kw)
    if kind == "rotation":
        return RotationSource(split, **kw)
    if kind == "triplet":
        if mining == "online":
            return OnlineTripletSource(split, **kw)
        if mining == "offline":
            return OfflineTripletSource(split, **kw)
        raise ConfigError(f"mining={mining!r} is not one of {', '.join(TRIPLET_SAMPLING)}")
    raise ConfigError(f"pipeline kind {kind!r} is not one of {', '.join(KINDS)}")


__all__: Sequence[str] = ("PreparedSplit", "BatchSource", "ShardGroup", "make_pipeline", "augment_batch", "find_dataset_dir")
