"""Retrieval quality on held-out real street photos: one table of systems x (mAP@10, P@10, NDCG@10, minutes).

Every trained system goes through the product: `imat train` / `imat export` (or a recipe script that
uses only imat commands) -> model.onnx -> `imat eval` (ONNX Runtime + FAISS, leave-one-out) on
ccp-dev's validation photos, which no system trains on: multi-source prepare splits each source on
its own, so they are the same 100 photos whether ccp-dev is prepared alone or with ccp-extra.
Relevance: Jaccard of the category sets >= 0.5 (imat.relevance). Rows measured in the same run:

- random ranking (imat eval's baseline) and an HSV colour histogram (8x4x4 bins, cosine);
- untrained: a freshly initialised ResNet18, probabilities as the embedding;
- seed recipe in imat: BCE, Adam 5e-4, batch 32, 9 epochs, 128 px, no augmentation, probabilities as
  the embedding (the seed report's recipe; ResNet18 instead of its ResNet50, which is 3x slower on CPU);
- each recipe under benchmarks/recipes/ given with --recipes (e.g. street_cpu), timed as a whole.

With ``--seeds 0,1,...`` every trained row is trained once per seed (``imat train --seed``; a recipe
reads ``$SEED``) and the table gives the mean and the spread (min-max) over the seeds: one from-scratch
run on ~1300 photos moves by 0.01-0.03 mAP@10 with the seed, as much as most recipe changes. Beside
the held-out figure, each trained row also gives the run's own last validation mAP@10 (the whole
validation split of DATA, ccp-extra's validation photos included; from metrics.jsonl).

    imat data prepare ../shared/data/ccp-dev ../shared/data/ccp-extra --out DATA --image-size 128
    python benchmarks/quality.py --data DATA --out runs/quality [--recipes street_cpu] [--skip seed] [--seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data"
K = 10


def heldout_folder(data_dir: pathlib.Path, dev_root: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """An image-level folder (labels.csv + images/) of the dataset's validation photos that come from ccp-dev."""
    from imat.data_tools.kaggle import read_kaggle
    from imat.data_tools.prepared import PreparedSplit

    val = set(PreparedSplit.open(data_dir, "validation", cache=False).image_ids)
    dev = read_kaggle(dev_root)
    rows = [(r.image_id, r.path, r.categories) for r in dev.records if r.image_id in val]
    if len(rows) < 10:
        raise SystemExit(f"only {len(rows)} ccp-dev photos in {data_dir}'s validation split; prepare with ccp-dev")
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = ["ImageId,ClassIds"]
    for image_id, path, cats in rows:
        link = out / "images" / f"{image_id}.jpg"
        if not link.exists():
            link.symlink_to(pathlib.Path(path).resolve())
        lines.append(f"{image_id},{' '.join(str(c) for c in sorted(cats))}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return out


def imat(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "imat.cli.main", "-q", *args], check=True)


def evaluate(model: pathlib.Path, heldout: pathlib.Path, out_json: pathlib.Path) -> dict:
    imat("eval", "--model", str(model), "--images", str(heldout), "--k", str(K), "--json", str(out_json))
    return json.loads(out_json.read_text())


def row(name: str, metrics: dict, minutes: float | None, note: str = "", val: float | None = None) -> dict:
    return {"system": name, "map@10": metrics[f"map@{K}"], "precision@10": metrics[f"precision@{K}"],
            "ndcg@10": metrics[f"ndcg@{K}"], "minutes": None if minutes is None else round(minutes, 1), "note": note,
            "val_map@10": val}


def last_validation_map(run: pathlib.Path) -> float | None:
    """The last validation mAP@10 a run logged (its whole validation split), None when it logged none."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    vals = [r[f"map@{K}"] for r in rows if r.get("split") == "val" and f"map@{K}" in r]
    return vals[-1] if vals else None


def summarise(rows: list[dict]) -> list[dict]:
    """One row per system: the mean over its seeds, with the min-max spread of mAP@10 (and of val)."""
    by_system: dict[str, list[dict]] = {}
    for r in rows:
        by_system.setdefault(r["system"], []).append(r)
    table = []
    for system, runs in by_system.items():
        mean = {key: float(np.mean([r[key] for r in runs])) for key in ("map@10", "precision@10", "ndcg@10")}
        vals = [r["val_map@10"] for r in runs if r.get("val_map@10") is not None]
        minutes = [r["minutes"] for r in runs if r["minutes"] is not None]
        table.append({"system": system, **mean, "seeds": len(runs),
                      "map@10 range": (min(r["map@10"] for r in runs), max(r["map@10"] for r in runs)),
                      "val_map@10": float(np.mean(vals)) if vals else None,
                      "val range": (min(vals), max(vals)) if vals else None,
                      "minutes": round(float(np.mean(minutes)), 1) if minutes else None})
    return table


def colour_histogram_metrics(heldout: pathlib.Path) -> dict:
    from PIL import Image

    from imat.data_tools.sources import read_source
    from imat.engine.evaluate import evaluate_embeddings

    ds = read_source(heldout)
    feats = []
    for rec in ds.records:
        hsv = np.asarray(Image.open(rec.path).convert("RGB").resize((128, 192)).convert("HSV")).reshape(-1, 3)
        hist, _ = np.histogramdd(hsv.astype(np.float64), bins=(8, 4, 4), range=((0, 256),) * 3)
        feats.append(hist.reshape(-1) / max(np.linalg.norm(hist), 1e-12))
    return evaluate_embeddings(np.asarray(feats, np.float32), ds.category_matrix(), K)


def untrained_model(data_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    from imat.data_tools.labels import LabelSpace
    from imat.data_tools.prepared import PreparedSplit
    from imat.export.onnx_export import export_onnx
    from imat.train_jax.checkpoint import build_model
    from imat.train_jax.config import TrainConfig

    split = PreparedSplit.open(data_dir, "validation", cache=False)
    config = TrainConfig(data_dir=str(data_dir), image_size=split.image_size)
    model = build_model(config.to_dict())
    return export_onnx(model, out, image_size=split.image_size, objective="bce", resize_mode=split.resize_mode or "stretch",
                       category_names=LabelSpace.default().category_names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=pathlib.Path, required=True, help="prepared dataset (ccp-dev [+ ccp-extra])")
    ap.add_argument("--dev-root", type=pathlib.Path, default=SHARED / "ccp-dev")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/quality"))
    ap.add_argument("--recipes", default="street_cpu", help="comma-separated scripts in benchmarks/recipes/ ('' for none)")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: seed, untrained, colour")
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds: each trained row once per seed")
    args = ap.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    if not args.dev_root.is_dir():
        print(f"ccp-dev not found at {args.dev_root}; pass --dev-root")
        return 1
    skip = set(filter(None, args.skip.split(",")))
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    heldout = heldout_folder(args.data, args.dev_root, out / "heldout")
    rows = []

    def add(r: dict) -> None:
        rows.append(r)
        print(json.dumps(r), flush=True)

    if "untrained" not in skip:
        m = evaluate(untrained_model(args.data, out / "untrained.onnx"), heldout, out / "untrained.json")
        add(row("random ranking", m["baseline"], None, f"mean of {m['baseline'].get('samples', 5)} seeded rankings"))
        add(row("untrained resnet18 (probabilities)", m, 0.0))
    if "colour" not in skip:
        add(row("colour histogram (HSV 8x4x4)", colour_histogram_metrics(heldout), None))
    for seed in seeds:
        tag = "" if seeds == [0] else f"-seed{seed}"
        if "seed" not in skip:
            run = out / f"seed{tag}"
            t0 = time.perf_counter()
            imat("train", "--objective", "bce", "--arch", "resnet18", "--data", str(args.data), "--workdir", str(run),
                 "--epochs", "9", "--lr", "5e-4", "--batch-size", "32", "--image-size", "128", "--seed", str(seed))
            imat("export", str(run), "--out", str(run / "model.onnx"))
            minutes = (time.perf_counter() - t0) / 60
            add(row("seed recipe in imat (bce, resnet18, 9 epochs, probabilities)",
                    evaluate(run / "model.onnx", heldout, out / f"seed{tag}.json"), minutes, f"seed {seed}",
                    last_validation_map(run)))
        for recipe in filter(None, args.recipes.split(",")):
            work = out / f"{recipe}{tag}"
            t0 = time.perf_counter()
            subprocess.run(["bash", str(REPO / "benchmarks" / "recipes" / f"{recipe}.sh"), str(args.data), str(work)],
                           check=True, env={**os.environ, "SEED": str(seed)})
            minutes = (time.perf_counter() - t0) / 60
            add(row(f"recipe {recipe}", evaluate(work / "model.onnx", heldout, out / f"{recipe}{tag}.json"), minutes,
                    f"seed {seed}", last_validation_map(work / "run")))

    n = len((heldout / "labels.csv").read_text().splitlines()) - 1
    print(f"\nheld-out: {n} ccp-dev validation photos (never trained on); relevance Jaccard >= 0.5; leave-one-out\n")
    print("| system | mAP@10 (range over seeds) | P@10 | NDCG@10 | val mAP@10 (whole split) | seeds | minutes |")
    print("|---|---|---|---|---|---|---|")
    table = summarise(rows)
    for r in table:
        lo, hi = r["map@10 range"]
        spread = f" ({lo:.3f}-{hi:.3f})" if r["seeds"] > 1 else ""
        val = "" if r["val_map@10"] is None else f"{r['val_map@10']:.3f}"
        print(f"| {r['system']} | {r['map@10']:.3f}{spread} | {r['precision@10']:.3f} | {r['ndcg@10']:.3f} | {val} | "
              f"{r['seeds']} | {'' if r['minutes'] is None else r['minutes']} |")
    (out / "results.json").write_text(json.dumps({"runs": rows, "table": table}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
