"""End-to-end embedding throughput of the engine vs its parts and a naive pipeline, same run.

    python benchmarks/engine.py [--model model.onnx] [--limit 200] [--batch-size 64] [--threads N]

Images: the real photos of shared/data/real-smoke/train and ccp-dev/train (read in place).
Measured (images/s, median of --repeats):

- decode-only:  imat's decoder (JPEG draft mode) in the engine's thread pool, no model
- model-only:   ONNX Runtime on pre-decoded uint8 arrays, batch by batch
- naive:        full PIL decode (no draft), RGB, resize, then the model one batch at a time, no overlap
- end-to-end:   Engine.embed (decode pool overlapping the model)

Decode and model share the same CPU cores, so the best an overlapped pipeline can do is the
sum of per-image costs: bound = 1 / (1/decode + 1/model); printed with end-to-end / bound.
Without --model a tiny random-projection ONNX model (the engine tests' model) is used and the
output says so: then the model is nearly free and the numbers measure the decode path.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import logging
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np
from PIL import Image, ImageOps

from imat.data_tools.images import decode_image
from imat.engine import Engine
from imat.engine.embedder import default_decode_threads

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data"


def test_model(out_dir: pathlib.Path, image_size: int) -> pathlib.Path:
    path = REPO / "tests" / "engine" / "tiny_onnx.py"
    spec = importlib.util.spec_from_file_location("imat_engine_tiny_onnx", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny_model(out_dir / "tiny.onnx", image_size=image_size, dim=128)


def naive_decode(path: pathlib.Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")  # every pixel decoded: no draft
        return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR))


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, default=None, help="exported model.onnx (default: tiny test model)")
    ap.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
    ap.add_argument("--limit", type=int, default=200, help="at most this many photos")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="decoder threads")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=128, help="image size of the tiny test model")
    args = ap.parse_args(argv)
    logging.getLogger("faiss").setLevel(logging.WARNING)

    paths = sorted((args.shared / "real-smoke" / "train").glob("*.jpg"))
    paths += sorted((args.shared / "ccp-dev" / "train").glob("*.jpg"))[: max(0, args.limit - len(paths))]
    if not paths:
        raise SystemExit(f"no photos under {args.shared}/real-smoke/train or ccp-dev/train")
    with tempfile.TemporaryDirectory() as tmp:
        flag = ""
        model = args.model
        if model is None:
            model = test_model(pathlib.Path(tmp), args.image_size)
            flag = "  [TEST MODEL: tiny random projection, not an exported network]"
        threads = args.threads or default_decode_threads()
        engine = Engine(model, batch_size=args.batch_size, decode_threads=threads, progress=False)
        meta = engine.metadata
        size, mode, bs = meta.image_size, meta.resize_mode, args.batch_size
        n = len(paths)
        print(f"{n} photos (real-smoke + ccp-dev), model {model.name} {meta.architecture} {size}px "
              f"on {engine.provider}, batch {bs}, {threads} decoder threads, "
              f"{engine.session.intra_op_threads} model threads, {os.cpu_count()} cores{flag}")

        def decode_only():
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                return list(pool.map(lambda p: decode_image(p, size, mode), paths))

        arrays = decode_only()
        batches = [np.stack(arrays[i : i + bs]) for i in range(0, n, bs)]

        def model_only():
            for b in batches:
                engine.session.run(b)

        def naive():
            for i in range(0, n, bs):
                engine.session.run(np.stack([naive_decode(p, size) for p in paths[i : i + bs]]))

        def end_to_end():
            engine.embed(paths)

        model_only()  # warm-up (ORT allocations)
        rates = {}
        for name, fn in (("decode-only", decode_only), ("model-only", model_only), ("naive", naive),
                         ("end-to-end", end_to_end)):
            rates[name] = n / timed(fn, args.repeats)
        bound = 1.0 / (1.0 / rates["decode-only"] + 1.0 / rates["model-only"])
        for name, rate in rates.items():
            print(f"{name:<14}{rate:>10.1f} images/s")
        print(f"{'bound':<14}{bound:>10.1f} images/s  (1/(1/decode + 1/model): both phases share the cores)")
        print(f"end-to-end / bound = {rates['end-to-end'] / bound:.2f};  end-to-end / naive = "
              f"{rates['end-to-end'] / rates['naive']:.2f}x")
        t = engine.last_result.timings
        print(f"last end-to-end run: {t.summary()}")


if __name__ == "__main__":
    main()
