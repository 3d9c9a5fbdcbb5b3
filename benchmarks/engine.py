"""The engine against the hardware limit and a PyTorch pipeline, per model and photo set, in one run.

    python benchmarks/engine.py [--models mobilenet_v2=m.onnx,resnet50=r.onnx] [--int8]
                                [--sets smoke8,ccp] [--torch-python /path/to/torch-venv/bin/python]

Photo sets: `smoke8` = the 13 real-smoke photos (iMaterialist size, up to 6000x4000) eight times
(104 photos); `ccp` = the 500 ccp-dev photos (550x830). Without --models, MobileNetV2 and ResNet50
with random weights are exported once (needs the train extra) into --cache: speed does not depend on
the weights. --int8 quantizes each model (imat.export.quantize: calibrated on 128 ccp-extra photos,
gated on 256 ccp-dev photos) unless NAME.int8.onnx is already beside it. Per model and set:

- decode-only:  imat's decoder (draft mode, EXIF, resize) on one thread: t_decode per photo
- model-only:   ONNX Runtime with one intra-op thread on decoded arrays (fp32, int8): t_model per photo
- bound:        cores / (t_decode + t_model): every core decoding or running the model, no idling
- Engine.embed: in process, adaptive thread plan (and the old static split: 1 decoder, ORT the rest)
- imat index:   the whole command in a fresh process (start-up, embedding, FAISS build, writing)
- PyTorch:      benchmarks/torch_pipeline.py under --torch-python (torchvision, DataLoader 2 workers,
                full PIL decode, FAISS flat), its whole process; absent without --torch-python

Each rate is images/s; the ratio after it is the rate / bound (or imat index / PyTorch). Rates are
the fastest of --repeats runs (the machine is shared: other load only slows a run down); the load
average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from imat.data_tools.images import decode_image

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data"
CALIBRATION, HELDOUT = 128, 256


def export_random(arch: str, cache: pathlib.Path, size: int) -> pathlib.Path:
    """model.onnx of `arch` with random weights (exported once, then reused from the cache)."""
    out = cache / f"{arch}_{size}.onnx"
    if not out.is_file():
        from flax import nnx

        from imat.data_tools.labels import LabelSpace
        from imat.export.onnx_export import export_onnx
        from imat.train_jax.models import create_model

        model = create_model(arch, rngs=nnx.Rngs(0))
        export_onnx(model, out, image_size=size, objective="bce", category_names=LabelSpace.default().category_names)
    return out


def int8_model(model: pathlib.Path, shared: pathlib.Path, size: int) -> tuple[pathlib.Path | None, str]:
    """(the int8 model beside `model`, made now if missing; or None and why it was refused)."""
    from imat.errors import ModelError
    from imat.export.onnx_export import int8_path
    from imat.export.quantize import quantize_int8

    out = int8_path(model)
    if out.is_file():
        return out, "existing"
    cal = sorted((shared / "ccp-extra" / "images").glob("*.jpg"))[:CALIBRATION]
    held = sorted((shared / "ccp-dev" / "train").glob("*.jpg"))[:HELDOUT]
    try:
        report = quantize_int8(model, out, np.stack([decode_image(p, size, "stretch") for p in cal]),
                               np.stack([decode_image(p, size, "stretch") for p in held]))
    except ModelError as e:
        return None, str(e)
    return out, report.agreement.describe()


def fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def photo_folder(paths: list[pathlib.Path], folder: pathlib.Path) -> pathlib.Path:
    """A folder of links, one per photo (repeats get their own names), for the whole-command runs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        (folder / f"{i:04d}_{p.name}").symlink_to(p.resolve())
    return folder


def one_thread_session(model: pathlib.Path):
    from imat.engine.session import ModelSession

    return ModelSession(model, intra_op_threads=1)


def whole_index_command(model: pathlib.Path, folder: pathlib.Path, out: pathlib.Path, batch: int) -> float:
    cmd = [sys.executable, "-m", "imat.cli.main", "-q", "index", "--model", str(model), "--images", str(folder),
           "--out", str(out), "--batch-size", str(batch)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - t0


def torch_pipeline(python: str, arch: str, listing: pathlib.Path, size: int, batch: int) -> dict:
    cmd = [python, str(REPO / "benchmarks" / "torch_pipeline.py"), "--arch", arch, "--list", str(listing),
           "--size", str(size), "--batch-size", str(batch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="NAME=model.onnx[,NAME=model.onnx] (default: random "
                    "mobilenet_v2 and resnet50, exported into --cache)")
    ap.add_argument("--model", type=pathlib.Path, default=None, help="one model.onnx (named by its architecture)")
    ap.add_argument("--cache", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "imat-bench-models")
    ap.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
    ap.add_argument("--sets", default="smoke8,ccp")
    ap.add_argument("--int8", action="store_true", help="also the int8 model of each (quantized if missing)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--torch-python", default=None, help="python of an environment with torch + torchvision")
    ap.add_argument("--json", type=pathlib.Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    from imat.engine import Engine
    from imat.engine.session import ModelSession

    cores = os.cpu_count() or 1
    if args.model is not None:
        models = {ModelSession(args.model).metadata.architecture: args.model}
    elif args.models:
        models = {k: pathlib.Path(v) for k, v in (item.split("=", 1) for item in args.models.split(","))}
    else:
        args.cache.mkdir(parents=True, exist_ok=True)
        models = {a: export_random(a, args.cache, args.size) for a in ("mobilenet_v2", "resnet50")}
    smoke = sorted((args.shared / "real-smoke" / "train").glob("*.jpg"))
    ccp = sorted((args.shared / "ccp-dev" / "train").glob("*.jpg"))
    sets = {"smoke8": ("iMaterialist-size (real-smoke x8)", smoke * 8), "ccp": ("ccp-dev", ccp)}
    sets = {k: sets[k] for k in args.sets.split(",")}
    if not all(paths for _, paths in sets.values()):
        raise SystemExit(f"photos missing under {args.shared} (real-smoke/train, ccp-dev/train)")
    variants = {}
    for name, path in models.items():
        variants[(name, "fp32")] = path
        if args.int8:
            q, why = int8_model(path, args.shared, ModelSession(path).metadata.image_size)
            print(f"{name} int8: {why}")
            if q is not None:
                variants[(name, "int8")] = q
    torch_note = "PyTorch pipeline: not run (no --torch-python)"
    if args.torch_python and not pathlib.Path(args.torch_python).exists():
        torch_note, args.torch_python = f"PyTorch pipeline: {args.torch_python} is absent", None
    elif args.torch_python and subprocess.run([args.torch_python, "-c", "import torch, torchvision"],
                                              capture_output=True, check=False).returncode != 0:
        torch_note, args.torch_python = f"PyTorch pipeline: torch/torchvision not importable by {args.torch_python}", None
    print(f"{cores} cores, load {os.getloadavg()[0]:.1f} at start; batch {args.batch_size}; fastest of "
          f"{args.repeats}; {torch_note if not args.torch_python else 'PyTorch pipeline: ' + args.torch_python}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for set_key, (set_name, paths) in sets.items():
            n = len(paths)
            folder = photo_folder(paths, tmp / set_key)
            listing = tmp / f"{set_key}.txt"
            listing.write_text("\n".join(str(p) for p in paths))
            decoded = {}
            for (name, kind), model in variants.items():
                size = ModelSession(model).metadata.image_size
                if size not in decoded:
                    t = fastest(lambda size=size, paths=paths: [decode_image(p, size, "stretch") for p in paths], 1)
                    decoded[size] = (np.stack([decode_image(p, size, "stretch") for p in paths[: args.batch_size]]),
                                     t / n)
                sample, t_decode = decoded[size]
                session = one_thread_session(model)
                session.run(sample)  # warm-up (allocations)
                t_model = fastest(lambda session=session, sample=sample: session.run(sample), args.repeats) / len(sample)
                bound = cores / (t_decode + t_model)
                adaptive = Engine(model, batch_size=args.batch_size, progress=False)
                static = Engine(model, batch_size=args.batch_size, decode_threads=1, progress=False)
                adaptive.embed(paths[: args.batch_size])  # warm-up
                embed = n / fastest(lambda e=adaptive, paths=paths: e.embed(paths), args.repeats)
                plan = adaptive.last_result.timings
                embed_static = n / fastest(lambda e=static, paths=paths: e.embed(paths), args.repeats)
                index = n / fastest(lambda m=model, folder=folder: whole_index_command(m, folder, tmp / "index", args.batch_size),
                                    args.repeats)
                row = {"set": set_name, "photos": n, "model": name, "kind": kind, "decode_ms": t_decode * 1e3,
                       "model_ms": t_model * 1e3, "decode_only": 1 / t_decode, "model_only": 1 / t_model,
                       "bound": bound, "embed": embed, "embed_static": embed_static, "index": index,
                       "plan": f"{plan.decode_threads}+{plan.model_threads}", "load": os.getloadavg()[0]}
                if args.torch_python and kind == "fp32":
                    runs = [torch_pipeline(args.torch_python, name, listing, size, args.batch_size)
                            for _ in range(max(1, args.repeats))]
                    row["torch"] = n / min(r["process_s"] for r in runs)
                    row["torch_loop"] = max(r["images_per_s"] for r in runs)
                rows.append(row)
                print(f"  measured {set_key} {name} {kind}: embed {embed:.1f}, index {index:.1f} images/s "
                      f"(load {row['load']:.1f})", flush=True)

    torch_rate = {(r["set"], r["model"]): r.get("torch") for r in rows if r["kind"] == "fp32"}
    print()
    print("| photos | model | decode-only (1 core) | model-only (1 core) | all-cores bound | Engine.embed "
          "(plan) | embed, static 1+rest | whole `imat index` | PyTorch pipeline | index / PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = torch_rate.get((r["set"], r["model"]))
        torch_cells = f"{t:.1f} | {r['index'] / t:.2f}x" if t else "not run | -"
        print(f"| {r['set']} ({r['photos']}) | {r['model']} {r['kind']} | {r['decode_only']:.1f} "
              f"({r['decode_ms']:.2f} ms) | {r['model_only']:.1f} ({r['model_ms']:.2f} ms) | {r['bound']:.1f} | "
              f"{r['embed']:.1f} = {r['embed'] / r['bound']:.2f} ({r['plan']}) | "
              f"{r['embed_static']:.1f} = {r['embed_static'] / r['bound']:.2f} | "
              f"{r['index']:.1f} = {r['index'] / r['bound']:.2f} | {torch_cells} |")
    print(f"\nload {os.getloadavg()[0]:.1f} at the end; ratios after '=' are rate / all-cores bound")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
