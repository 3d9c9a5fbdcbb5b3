"""Real-data result: train each objective on ccp-dev (500 real photos) and compare validation mAP@10
with an untrained network of the same architecture and with a random ranking.

Relevance is Jaccard(category sets) >= 0.5, leave-one-out over the validation split (100 photos),
the same definition as training's validation and `imat eval`. Features: `embedding` for bce and
triplet, `pooled` for rotation (its backbone is what retrieval uses).

    python benchmarks/ccp_dev_training.py --out runs/ccp-dev [--arch mobilenet_v2] [--image-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ROOT = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data" / "ccp-dev"


def untrained_map(config, data_dir: str, k: int) -> float:
    """Validation mAP@k of the freshly initialised network (same seed as the run), eval mode."""
    import jax
    from flax import nnx

    from imat.data_tools.pipelines import PreparedSplit
    from imat.train_jax.checkpoint import build_model
    from imat.train_jax.metrics import retrieval_map_at_k
    from imat.train_jax.train import RETRIEVAL_FEATURE

    split = PreparedSplit.open(data_dir, "validation")
    model = build_model(config.to_dict())
    model.eval()
    graphdef, state = nnx.split(model)
    feature = RETRIEVAL_FEATURE[config.objective]
    forward = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)[feature])
    feats = [np.asarray(forward(state, split.images(np.arange(s, min(s + 50, split.num_examples)))))
             for s in range(0, split.num_examples, 50)]
    return retrieval_map_at_k(np.concatenate(feats), split.categories, k=k)


def random_map(data_dir: str, k: int) -> float:
    from imat.data_tools.pipelines import PreparedSplit
    from imat.engine.evaluate import random_ranking_metrics

    split = PreparedSplit.open(data_dir, "validation")
    return random_ranking_metrics(split.categories, k, samples=20)["map"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=pathlib.Path, default=DEFAULT_ROOT)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/ccp-dev"))
    ap.add_argument("--arch", default="mobilenet_v2")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--objectives", default="bce,triplet,rotation")
    ap.add_argument("--steps", default="bce=300,triplet=300,rotation=120",
                    help="steps per objective (rotation batches hold 4 rotations of each image)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        print(f"ccp-dev not found at {args.root}; pass --root")
        return 1

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from imat.data_tools.tfds_builder import prepare
    from imat.train_jax.config import TrainConfig
    from imat.train_jax.train import train_and_evaluate

    steps = dict(item.split("=") for item in args.steps.split(","))
    data_dir = str(prepare(args.root, args.out / "prepared", image_size=args.image_size, seed=args.seed))
    k = 10
    rows = []
    baseline = random_map(data_dir, k)
    for objective in args.objectives.split(","):
        n = int(steps[objective])
        config = TrainConfig(
            data_dir=data_dir, arch=args.arch, objective=objective, learning_rate=args.lr,
            image_size=args.image_size, epochs=None, steps=n, eval_every=max(1, n // 4),
            checkpoint_every=max(1, n // 4), log_every=max(1, n // 10), seed=args.seed,
        )
        before = untrained_map(config, data_dir, k)
        t0 = time.perf_counter()
        result = train_and_evaluate(config, args.out / objective)
        minutes = (time.perf_counter() - t0) / 60
        val = result["val"]
        row = {
            "objective": objective, "arch": args.arch, "image_size": args.image_size, "steps": n,
            "train_minutes": round(minutes, 1), "map@10": val[f"map@{k}"], "untrained_map@10": before,
            "random_map@10": baseline,
            **{key: val[key] for key in ("f1_macro", "f1_micro", "triplet_accuracy", "rotation_accuracy",
                                        f"map@{k}_pooled") if key in val},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    print("\n| objective | steps | train min | val mAP@10 | untrained | random | objective metric |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        extra = ", ".join(f"{key} {r[key]:.3f}" for key in ("f1_macro", "f1_micro", "triplet_accuracy",
                                                            "rotation_accuracy") if key in r)
        print(f"| {r['objective']} | {r['steps']} | {r['train_minutes']} | {r['map@10']:.3f} | "
              f"{r['untrained_map@10']:.3f} | {r['random_map@10']:.3f} | {extra} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
