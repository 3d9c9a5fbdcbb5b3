"""Decode + resize throughput: imat's draft-mode decoder against a full decode then resize, same run.

    python benchmarks/decode.py [--ccp] [--size 128] [--repeats 5] [--shared ../shared/data]

Reads the real photos of shared/data/real-smoke (and ccp-dev with --ccp) in place; prints images/s of
each decoder (median over repeats), their ratio and the mean absolute pixel difference between them.
The baseline uses the same EXIF, RGB and resize steps, so the ratio isolates the JPEG draft mode.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np
from PIL import Image, ImageOps

from imat.data_tools.images import REDUCING_GAP, RESAMPLE, decode_image

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data"


def full_decode(path: pathlib.Path, size: int) -> np.ndarray:
    """Baseline: decode every pixel, then orient, convert and resize exactly as decode_image does."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im).convert("RGB")
        return np.array(im.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP))


def time_pass(fn, paths, size: int) -> tuple[float, list[np.ndarray]]:
    t = time.perf_counter()
    outs = [fn(p, size) for p in paths]
    return len(paths) / (time.perf_counter() - t), outs


def draft_decode(path: pathlib.Path, size: int) -> np.ndarray:
    return decode_image(path, size)


def run(name: str, paths: list[pathlib.Path], size: int, repeats: int) -> None:
    time_pass(draft_decode, paths, size)  # warm-up: page cache, lazy imports
    draft_rates, full_rates = [], []
    for _ in range(repeats):  # interleaved, so machine load affects both alike
        rate, draft_out = time_pass(draft_decode, paths, size)
        draft_rates.append(rate)
        rate, full_out = time_pass(full_decode, paths, size)
        full_rates.append(rate)
    draft_rate, full_rate = statistics.median(draft_rates), statistics.median(full_rates)
    diff = np.mean([np.abs(a.astype(np.float32) - b).mean() for a, b in zip(draft_out, full_out)])
    pixels = []
    for p in paths:
        with Image.open(p) as im:
            pixels.append(im.size[0] * im.size[1])
    print(f"{name}: {len(paths)} images (mean {np.mean(pixels) / 1e6:.1f} MP), {size}x{size}, "
          f"median of {repeats} repeats")
    print(f"  full decode + resize : {full_rate:8.1f} images/s")
    print(f"  draft-mode decoder   : {draft_rate:8.1f} images/s")
    print(f"  speed-up             : {draft_rate / full_rate:8.2f}x   mean |diff| {diff:.2f} grey levels")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED, help="the shared data folder")
    ap.add_argument("--ccp", action="store_true", help="also benchmark ccp-dev (500 photos)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    smoke = args.shared / "real-smoke" / "train"
    if not smoke.is_dir():
        print(f"real data not available: {smoke} is absent", file=sys.stderr)
        return 1
    run("real-smoke", sorted(smoke.glob("*.jpg")), args.size, args.repeats)
    if args.ccp:
        run("ccp-dev", sorted((args.shared / "ccp-dev" / "train").glob("*.jpg")), args.size, max(1, args.repeats // 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
