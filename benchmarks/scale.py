"""Scale: `imat embed` in one process vs `--ray`, the cost of resuming a killed run, index from parts vs memory.

    python benchmarks/scale.py [--model model.onnx | --arch mobilenet_v2] [--actors 2] [--part-size 100] [--repeats 2]
                               [--vectors 200000] [--dim 128] [--skip-embed] [--skip-index]

Each measurement runs in its own process (a fresh interpreter, as a user's command would):

1. embed: ccp-dev + ccp-extra photos (shared/data, 1594 real photos, read in place through symlinks)
   with `imat embed` (one process) and `imat embed --ray --actors N` (a local Ray started by the
   command); images/s as imat reports it (Ray's start-up included, since a user waits for it too),
   the command's wall time, and the ratio ray / single: the overhead of Ray on one machine.
2. resume: `imat embed` killed with SIGKILL once half its parts are complete, then rerun; the rerun's
   time against a clean run's, and (killed run + rerun) / clean: what the kill cost.
3. index: an embeddings folder of --vectors synthetic unit vectors (--dim, clustered) indexed with
   `build_index_from_parts` (memory-mapped parts) vs `build_gallery_index` on all vectors loaded in
   RAM, for Flat and IVF{nlist},SQ8; seconds and peak RSS (VmHWM of the child process).

The machine is shared: the load average (uptime) is printed with the figures, and Ray's workers run
at the benchmark's own priority (RAY_worker_niceness=0; Ray's default nice 15 starves them when other
jobs run: 400 photos took 91 s instead of 10 s here).
Without --model an untrained --arch network is exported (needs the train and export extras).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data"
RATE = re.compile(r"at ([0-9.]+) images/s")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def export_untrained(arch: str, out: pathlib.Path) -> pathlib.Path:
    from flax import nnx

    from imat.data_tools.labels import LabelSpace
    from imat.export.onnx_export import export_onnx
    from imat.train_jax.models import create_model

    model = create_model(arch, rngs=nnx.Rngs(0))
    model.eval()
    return export_onnx(model, out, image_size=128, objective="bce", validate=False,
                       category_names=list(LabelSpace.default().category_names))


def photo_folder(shared: pathlib.Path, out: pathlib.Path) -> int:
    """Symlinks to ccp-dev/train and ccp-extra/images photos in one folder (their names do not clash)."""
    out.mkdir(parents=True)
    n = 0
    for sub in ("ccp-dev/train", "ccp-extra/images"):
        for p in sorted((shared / sub).glob("*.jpg")):
            (out / p.name).symlink_to(p)
            n += 1
    return n


def imat_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from imat.cli.main import main; sys.exit(main(sys.argv[1:]))",
            "-q", *args]


def env() -> dict:
    # RAY_worker_niceness=0: Ray runs its workers at nice 15 by default; on this shared machine they would
    # then get the CPU only when nobody else wants it, and the figures would measure other people's jobs.
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "RAY_worker_niceness": "0"}


def run_embed(model, images, out, part_size: int, extra=()) -> tuple[float, float, str]:
    """(wall s, images/s reported by imat, its last line) of one `imat embed` command."""
    t0 = time.perf_counter()
    proc = subprocess.run(imat_argv("embed", "--model", str(model), "--images", str(images), "--out", str(out),
                                    "--part-size", str(part_size), *extra), capture_output=True, text=True,
                          env=env(), timeout=3600, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"imat embed failed:\n{proc.stderr[-3000:]}")
    line = proc.stdout.strip().splitlines()[-1]
    m = RATE.search(line)
    return wall, float(m.group(1)) if m else float("nan"), line


def embed_section(args, tmp: pathlib.Path, model: pathlib.Path) -> None:
    images = tmp / "photos"
    n = photo_folder(args.shared, images)
    print(f"\n## embed: {n} photos (ccp-dev + ccp-extra), part size {args.part_size}, model {model.name}; {load()}")
    runs: dict[str, list] = {"single": [], "ray": []}
    for rep in range(args.repeats):  # alternated, so a change of the machine's load hits both alike
        for kind, extra in (("single", ()), ("ray", ("--ray", "--actors", str(args.actors)))):
            out = tmp / f"emb-{kind}-{rep}"
            runs[kind].append(run_embed(model, images, out, args.part_size, extra))
            wall, rate, line = runs[kind][-1]
            print(f"{kind:<7} run {rep + 1}: {rate:7.1f} images/s, command {wall:6.1f}s  ({line}); {load()}")
    single_wall, single_rate = (statistics.median(r[i] for r in runs["single"]) for i in (0, 1))
    ray_wall, ray_rate = (statistics.median(r[i] for r in runs["ray"]) for i in (0, 1))
    print(f"single process : {single_rate:7.1f} images/s, command {single_wall:6.1f}s (median of {args.repeats})")
    print(f"ray, {args.actors} actors  : {ray_rate:7.1f} images/s, command {ray_wall:6.1f}s (median of {args.repeats})")
    print(f"ratio ray/single: {ray_rate / single_rate:.2f}x images/s, {ray_wall / single_wall:.2f}x wall; {load()}")
    t0 = time.perf_counter()
    ray_alone = "import ray; ray.init(include_dashboard=False, logging_level='ERROR'); ray.shutdown()"
    subprocess.run([sys.executable, "-c", ray_alone], capture_output=True, env=env(), timeout=600, check=True)
    print(f"of which a local Ray's start and stop alone: {time.perf_counter() - t0:.1f}s")
    same = compare_dirs(tmp / "emb-single-0", tmp / "emb-ray-0")
    print(f"same embeddings: max abs diff {same['max_abs_diff']:.2e}, same ids {same['same_ids']}, "
          f"same errors {same['same_errors']}")

    # resume after a kill at 50%
    out = tmp / "emb-killed"
    argv = imat_argv("embed", "--model", str(model), "--images", str(images), "--out", str(out),
                     "--part-size", str(args.part_size))
    total_parts = -(-n // args.part_size)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    done = 0
    while proc.poll() is None:
        try:
            done = json.loads((out / "manifest.json").read_text())["counts"]["parts_complete"]
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= total_parts // 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    killed_wall = time.perf_counter() - t0
    rerun_wall, _, line = run_embed(model, images, out, args.part_size)
    print(f"resume: killed after {killed_wall:.1f}s with {done}/{total_parts} parts complete; rerun {rerun_wall:.1f}s "
          f"({line})")
    print(f"        rerun / clean run = {rerun_wall / single_wall:.2f}; (killed + rerun) / clean = "
          f"{(killed_wall + rerun_wall) / single_wall:.2f}; {load()}")


def compare_dirs(a: pathlib.Path, b: pathlib.Path) -> dict:
    import numpy as np

    from imat.engine.embedding_parts import read_embedding_dir
    from imat.engine.parts_index import gather_rows

    pa, pb = read_embedding_dir(a), read_embedding_dir(b)
    return {"max_abs_diff": float(np.abs(gather_rows(pa, None) - gather_rows(pb, None)).max()),
            "same_ids": pa.items() == pb.items(), "same_errors": pa.errors() == pb.errors()}


CHILD = r"""
import json, sys, time
import numpy as np
mode, emb_dir, index_type, out = sys.argv[1:5]
t0 = time.perf_counter()
if mode == "parts":
    from imat.engine.embedding_parts import read_embedding_dir
    from imat.engine.parts_index import build_index_from_parts
    gallery = build_index_from_parts(read_embedding_dir(emb_dir), index_type, progress=False)
else:
    from imat.engine.embedding_parts import read_embedding_dir
    from imat.engine.gallery_index import build_gallery_index
    parts = read_embedding_dir(emb_dir)
    x = np.concatenate([np.load(parts.directory / "embeddings" / f"part-{p['part']:05d}.npy") for p in parts.parts])
    gallery = build_gallery_index(x, parts.items(), index_type, model_fingerprint="f" * 64,
                                  model_architecture="synthetic")
gallery.save(out)
seconds = time.perf_counter() - t0
# VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across exec, so it would report the parent's peak
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "count": gallery.count,
                  "index_type": gallery.index_type}))
"""


def synthetic_parts(out: pathlib.Path, n: int, dim: int, part_size: int) -> None:
    import numpy as np

    from imat.engine.embedding_parts import PartOutput, open_for_writing

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, dim)).astype(np.float32)
    records = [{"id": f"v{r}", "path": f"/gallery/{r}.jpg"} for r in range(n)]
    model = {"model_fingerprint": "f" * 64, "model_architecture": "synthetic", "model_objective": "bce",
             "image_size": 128, "resize_mode": "stretch"}
    with open_for_writing(out, records, model=model, dim=dim, part_size=part_size) as writer:
        for plan in writer.pending:
            x = centres[rng.integers(0, 200, plan.rows)] + 0.5 * rng.standard_normal((plan.rows, dim)).astype(
                np.float32)
            writer.write_part(PartOutput(plan.index, x / np.linalg.norm(x, axis=1, keepdims=True), {}))


def index_section(args, tmp: pathlib.Path) -> None:
    from imat.engine.index_choice import ivf_nlist

    emb = tmp / "synthetic-emb"
    synthetic_parts(emb, args.vectors, args.dim, args.index_part_size)
    raw_mb = args.vectors * args.dim * 4 / 2**20
    print(f"\n## index: {args.vectors} synthetic vectors, dim {args.dim} ({raw_mb:.0f} MB float32), parts of "
          f"{args.index_part_size}; {load()}")
    print(f"{'index type':<16}{'from':<8}{'seconds':>9}{'peak RSS MB':>13}")
    for index_type in ("Flat", f"IVF{ivf_nlist(args.vectors)},SQ8"):
        results = {}
        for mode in ("memory", "parts"):
            proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(emb), index_type, str(tmp / f"idx-{mode}")],
                                  capture_output=True, text=True, env=env(), timeout=3600, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"index child failed:\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[mode]
            print(f"{index_type:<16}{mode:<8}{r['seconds']:>9.1f}{r['peak_rss_mb']:>13.0f}")
        m, p = results["memory"], results["parts"]
        print(f"{index_type:<16}{'ratio':<8}{p['seconds'] / m['seconds']:>8.2f}x{p['peak_rss_mb'] / m['peak_rss_mb']:>12.2f}x"
              f"  (parts / memory); {load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, default=None, help="model.onnx (default: export an untrained --arch)")
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--part-size", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2, help="embed runs of each kind (median reported)")
    ap.add_argument("--vectors", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--index-part-size", type=int, default=10_000)
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--skip-index", action="store_true")
    args = ap.parse_args()
    print(f"# benchmarks/scale.py on {os.cpu_count()} cores; {load()}")
    with tempfile.TemporaryDirectory(prefix="imat-scale-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        if not args.skip_embed:
            if not (args.shared / "ccp-dev" / "train").is_dir():
                raise SystemExit(f"{args.shared}/ccp-dev is absent: the embed benchmark needs the real photos")
            model = args.model or export_untrained(args.arch, tmp / "model.onnx")
            embed_section(args, tmp, model)
        if not args.skip_index:
            index_section(args, tmp)


if __name__ == "__main__":
    main()
