"""GPU check: ONNX Runtime CUDA provider, FAISS GPU and a JAX GPU training step, with throughput.

Run through benchmarks/gpu_check.sh on a machine with an NVIDIA GPU. Every part
also runs on CPU (it then says that no GPU path was taken), so the script itself
is testable anywhere. Each figure is printed next to its CPU baseline measured
in the same run.

    python benchmarks/gpu_check.py [--arch resnet50] [--size 128] [--batch 128] [--gallery 1000000]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import median_seconds, train_step_rate  # noqa: E402


def check_jax(args) -> tuple[object, dict]:
    import jax

    print(f"[jax] {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    rate, model = train_step_rate(args.arch, args.size, args.batch, args.repeats)
    print(f"[jax] train step {args.arch} {args.size}px batch {args.batch}: {rate:.0f} images/s")
    return model, {"jax_backend": jax.default_backend(), "train_images_per_s": rate}


def check_onnxruntime(model, args) -> dict:
    import onnxruntime as ort

    from imat.data_tools.labels import LabelSpace
    from imat.engine import Engine
    from imat.export.onnx_export import export_onnx

    print(f"[ort] {ort.__version__}, available providers {ort.get_available_providers()}")
    out = pathlib.Path(tempfile.mkdtemp()) / "model.onnx"
    t0 = time.perf_counter()
    export_onnx(model, out, image_size=args.size, objective="bce", category_names=LabelSpace.default().category_names)
    print(f"[ort] exported {args.arch} with parity gate in {time.perf_counter() - t0:.1f} s")
    images = np.random.default_rng(1).integers(0, 256, (args.batch * 4, args.size, args.size, 3), dtype=np.uint8)
    rates = {}
    for label, providers in (("cpu", ["CPUExecutionProvider"]), ("auto", None)):
        engine = Engine(out, providers=providers, batch_size=args.batch, progress=False)
        seconds = median_seconds(lambda: engine.embed(images), max(1, args.repeats // 2))
        rates[label] = len(images) / seconds
        print(f"[ort] {label:>4} -> {engine.provider}: {rates[label]:.0f} images/s (arrays, model only)")
    print(f"[ort] auto/cpu ratio {rates['auto'] / rates['cpu']:.1f}x")
    return {"ort_provider": engine.provider, "ort_cpu_images_per_s": rates["cpu"], "ort_auto_images_per_s": rates["auto"]}


def check_faiss(args) -> dict:
    import faiss

    from imat.engine.faiss_build import build_faiss_index

    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    print(f"[faiss] {faiss.__version__}, GPUs visible: {ngpu}")
    rng = np.random.default_rng(2)
    d = 128
    centres = rng.standard_normal((256, d)).astype(np.float32)
    xb = centres[rng.integers(0, 256, args.gallery)] + 0.3 * rng.standard_normal((args.gallery, d)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.integers(0, args.gallery, 2000)] + 0.05 * rng.standard_normal((2000, d)).astype(np.float32)
    results = {}
    for label, use_gpu in (("cpu", False), ("gpu", True)):
        if use_gpu and ngpu == 0:
            print("[faiss] no GPU: GPU search skipped")
            continue
        index = build_faiss_index(xb, "Flat", use_gpu=use_gpu)
        seconds = median_seconds(lambda: index.search(xq, 10), 3)
        results[label] = len(xq) / seconds
        print(f"[faiss] Flat {args.gallery} x {d} on {label}: {results[label]:.0f} queries/s")
    if "gpu" in results:
        print(f"[faiss] gpu/cpu ratio {results['gpu'] / results['cpu']:.1f}x")
    return {f"faiss_{k}_qps": v for k, v in results.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    summary = {}
    model, figures = check_jax(args)
    summary.update(figures)
    summary.update(check_onnxruntime(model, args))
    summary.update(check_faiss(args))
    print("summary:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in summary.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
