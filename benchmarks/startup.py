"""Start-up of `imat search one.jpg` and `imat index` of a small folder: wall time and import time, fresh processes.

    python benchmarks/startup.py --model model.onnx [--baseline-tree /path/to/other/checkout] [--repeats 7]

Each command runs `--repeats` times in a new interpreter (minimum wall time reported: the machine
is shared, the minimum is the least disturbed run) and once under `python -X importtime` (sum of
the top-level imports, and the slowest imat modules). With `--baseline-tree` the same commands run
with that checkout first on PYTHONPATH in the same run, and the ratios are printed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data"


def run(tree: pathlib.Path, argv: list[str], *, importtime: bool = False) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "imat.cli.main", "-q", *argv]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, proc.stderr


def import_profile(stderr: str) -> tuple[float, list[tuple[float, str]]]:
    """(seconds of top-level imports, the slowest imat modules by cumulative time)."""
    total, imat = 0.0, []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        try:
            us = int(cumulative)
        except ValueError:
            continue
        if not name.startswith("  "):
            total += us / 1e6
        if name.strip().startswith("imat"):
            imat.append((us / 1e6, name.strip()))
    return total, sorted(imat, reverse=True)[:5]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=pathlib.Path, required=True)
    ap.add_argument("--shared", type=pathlib.Path, default=DEFAULT_SHARED)
    ap.add_argument("--baseline-tree", type=pathlib.Path, default=None, help="another checkout, e.g. main")
    ap.add_argument("--photos", type=int, default=8, help="photos in the small folder")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    photos = sorted((args.shared / "ccp-dev" / "train").glob("*.jpg"))[: args.photos]
    if not photos:
        raise SystemExit(f"no photos under {args.shared}/ccp-dev/train")
    trees = {"this tree": REPO}
    if args.baseline_tree:
        trees = {"baseline": args.baseline_tree.resolve(), **trees}
    print(f"{len(photos)} ccp-dev photos, model {args.model.name}, min of {args.repeats} fresh processes; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp) / "photos"
        folder.mkdir()
        for p in photos:
            shutil.copy(p, folder / p.name)
        results = {}
        for label, tree in trees.items():
            index_dir = pathlib.Path(tmp) / f"index-{label.replace(' ', '_')}"
            commands = {
                "imat index (small folder)": ["index", "--model", str(args.model), "--images", str(folder),
                                              "--out", str(index_dir)],
                "imat search one.jpg": ["search", "--model", str(args.model), "--index", str(index_dir),
                                        str(photos[0]), "--out", str(pathlib.Path(tmp) / "results.jsonl")],
                "imat search --help": ["search", "--help"],
            }
            for name, cmd in commands.items():
                walls = []
                for _ in range(args.repeats):
                    walls.append(run(tree, cmd)[0])
                imports, slowest = import_profile(run(tree, cmd, importtime=True)[1])
                results[(label, name)] = (min(walls), imports, slowest)
        print(f"{'command':<28}{'tree':<11}{'wall s':>8}{'imports s':>11}  slowest imat imports (cumulative s)")
        for (label, name), (wall, imports, slowest) in results.items():
            top = ", ".join(f"{n} {s:.3f}" for s, n in slowest[:3])
            print(f"{name:<28}{label:<11}{wall:>8.3f}{imports:>11.3f}  {top}")
        if args.baseline_tree:
            for name in {n for _, n in results}:
                base, new = results[("baseline", name)], results[("this tree", name)]
                print(f"{name}: wall {base[0] / new[0]:.2f}x faster, imports {base[1] / new[1]:.2f}x")


if __name__ == "__main__":
    main()
