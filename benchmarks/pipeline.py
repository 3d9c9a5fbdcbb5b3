"""Batches/s of every training pipeline read from the prepared dataset vs decoding the original JPEGs.

The baseline is the same BatchSource (same rows, same rotations and augmentation) over a split
whose images() calls imat.data_tools.images.decode_image on the original file of each row, one
image at a time, as a loader without a prepared dataset would. Both run in this process, and the
script checks that both produce identical batches before printing the ratio.

    python benchmarks/pipeline.py                       # synthetic set (temp dir) + ccp-dev if ../shared exists
    python benchmarks/pipeline.py --root /path/to/kaggle --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

from imat.data_tools import tfds_builder
from imat.data_tools.images import decode_image
from imat.data_tools.kaggle import read_kaggle
from imat.data_tools.pipelines import PreparedSplit, make_pipeline
from imat.data_tools.synthetic import write_synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data" / "ccp-dev"
PIPELINES = [("classification", "online"), ("triplet", "online"), ("triplet", "offline"), ("rotation", "online")]


@dataclasses.dataclass(eq=False)
class OnTheFlySplit(PreparedSplit):
    """The prepared split's rows and labels, but every image decoded from its original file."""

    paths: list[str] = dataclasses.field(default_factory=list)

    def images(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return np.stack([decode_image(self.paths[i], self.image_size, self.resize_mode) for i in idx])


def _rate(source, steps: int, start: int = 1) -> float:
    source.batch(0)   # warm up (offline mining of epoch 0, permutation)
    t = time.perf_counter()
    for s in range(start, start + steps):
        source.batch(s)
    return steps / (time.perf_counter() - t)


def bench(root: pathlib.Path, work: pathlib.Path, *, image_size: int, batch_size: int, steps: int,
          baseline_steps: int, workers: int | None) -> dict[str, tuple[float, float]]:
    """Prints the table; returns {pipeline: (prepared images/s, JPEG images/s)}."""
    rates: dict[str, tuple[float, float]] = {}
    n_images = len(read_kaggle(root, check_images=False, validate_rle=False).records)
    print(f"\n== {root} ({n_images} images), image_size {image_size}, batch {batch_size}")
    t = time.perf_counter()
    data_dir = tfds_builder.prepare(root, work / "prepared", image_size=image_size, workers=workers)
    dt = time.perf_counter() - t
    print(f"prepare: {dt:.1f} s ({n_images / dt:.1f} images/s, workers={workers or os.cpu_count()})")
    t = time.perf_counter()
    cached = PreparedSplit.open(data_dir, "train", cache=True)
    print(f"open train (cache=True): {time.perf_counter() - t:.2f} s for {cached.num_examples} images")
    lazy = PreparedSplit.open(data_dir, "train", cache=False)
    records = {r.image_id: r for r in read_kaggle(root, check_images=False, validate_rle=False).records}
    fields = {f.name: getattr(cached, f.name) for f in dataclasses.fields(PreparedSplit) if f.init and f.name != "_cache"}
    otf = OnTheFlySplit(**fields, paths=[str(records[i].path) for i in cached.image_ids])

    print(f"{'pipeline':<22}{'cached b/s':>12}{'on-demand b/s':>15}{'JPEG b/s':>11}{'cached/JPEG':>13}{'on-demand/JPEG':>16}")
    for kind, mining in PIPELINES:
        for augment in (False, True):
            kw = dict(batch_size=batch_size, seed=0, mining=mining, augment=augment)
            src_c, src_l, src_j = (make_pipeline(kind, s, **kw) for s in (cached, lazy, otf))
            for probe in (0, 1):   # both read paths give the very same batches
                a, b, c = src_c.batch(probe), src_l.batch(probe), src_j.batch(probe)
                assert all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], c[k]) for k in a), kind
            r_c, r_l = _rate(src_c, steps), _rate(src_l, steps)
            r_j = _rate(src_j, baseline_steps)
            name = f"{kind}{'/' + mining if kind == 'triplet' else ''}{' +aug' if augment else ''}"
            print(f"{name:<22}{r_c:>12.1f}{r_l:>15.1f}{r_j:>11.2f}{r_c / r_j:>12.1f}x{r_l / r_j:>15.1f}x", flush=True)
            rates.setdefault(name, (r_c * batch_size, r_j * batch_size))
    return rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=pathlib.Path, default=None,
                    help="a Kaggle-layout folder (default: ../shared/data/ccp-dev when present)")
    ap.add_argument("--synthetic", type=int, default=200, help="synthetic images (0: skip)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30, help="batches timed from the prepared dataset")
    ap.add_argument("--baseline-steps", type=int, default=4, help="batches timed when decoding JPEGs")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--train-arch", default="resnet18",
                    help="also time this model's train step at the same batch/size ('' to skip)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    roots = []
    with tempfile.TemporaryDirectory(prefix="imat-bench-") as tmp:
        tmp = pathlib.Path(tmp)
        if args.synthetic:
            roots.append(write_synthetic(tmp / "synthetic", args.synthetic, seed=0))
        root = args.root or (DEFAULT_SHARED if DEFAULT_SHARED.is_dir() else None)
        if root is not None:
            roots.append(root)
        else:
            print(f"(no real data: {DEFAULT_SHARED} is absent; pass --root)")
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
        for i, r in enumerate(roots):
            rates = bench(r, tmp / f"run{i}", image_size=args.image_size, batch_size=args.batch_size,
                          steps=args.steps, baseline_steps=args.baseline_steps, workers=args.workers)
        if args.train_arch and roots:
            sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
            from common import train_step_rate

            step_rate, _ = train_step_rate(args.train_arch, args.image_size, args.batch_size)
            prepared, jpeg = rates["classification"]
            print(f"\ntrain step {args.train_arch} {args.image_size}px batch {args.batch_size}: {step_rate:.0f} images/s; "
                  f"classification pipeline feeds {prepared:.0f} images/s prepared ({prepared / step_rate:.1f}x the "
                  f"step) vs {jpeg:.0f} images/s decoding JPEGs ({jpeg / step_rate:.2f}x the step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
