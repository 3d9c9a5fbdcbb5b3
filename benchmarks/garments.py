"""Garment-level retrieval on ccp-dev: a garment-trained model vs a whole-photo model on the same crops,
a random ranking and an HSV colour histogram of the crop, measured in one run; and crops/s of garment
indexing vs photos/s of whole-photo indexing with the same model.

    python benchmarks/garments.py --garment-model G.onnx --photo-model P.onnx [--root ccp-dev] [--k 10]

Evaluation set: the garments of ccp-dev's held-out photos (the seeded 80/20 photo split that
`imat data prepare` uses, so neither model saw them), leave-one-photo-out: each garment queries the
garments of the other held-out photos; relevance = same category (`imat eval --garments`, the same
function). Every model embeds the same padded crops (the garment model's padding).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ROOT = pathlib.Path(os.environ.get("IMAT_SHARED", REPO.parent / "shared")) / "data" / "ccp-dev"


def hsv_histograms(crops, size: int = 64, bins=(8, 4, 4)) -> tuple[np.ndarray, float]:
    """(Hellinger-normalised HSV histograms of the padded crops [n, prod(bins)], seconds)."""
    from PIL import Image

    from imat.data_tools.garments import decode_crop

    t0 = time.perf_counter()
    out = np.zeros((len(crops), int(np.prod(bins))), np.float32)
    for i, c in enumerate(crops):
        rgb = decode_crop(c.path, c.box, size, "stretch", c.padding)
        hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).reshape(-1, 3).astype(np.int64)
        idx = [(hsv[:, j] * b) // 256 for j, b in enumerate(bins)]
        flat = (idx[0] * bins[1] + idx[1]) * bins[2] + idx[2]
        hist = np.bincount(flat, minlength=out.shape[1]).astype(np.float32)
        out[i] = np.sqrt(hist / hist.sum())       # Hellinger: inner product of sqrt histograms
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=pathlib.Path, default=DEFAULT_ROOT)
    ap.add_argument("--garment-model", type=pathlib.Path, required=True, help="model.onnx of the garment recipe")
    ap.add_argument("--photo-model", type=pathlib.Path, required=True, help="a whole-photo model.onnx")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0, help="seed of the photo split (as `imat data prepare`)")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--baseline-samples", type=int, default=20)
    ap.add_argument("--json", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from imat.data_tools.garments import crops_of, garments_of
    from imat.data_tools.kaggle import read_kaggle
    from imat.data_tools.tfds_builder import split_ids
    from imat.engine import Engine
    from imat.engine.evaluate import evaluate_garment_embeddings

    if not args.root.is_dir():
        print(f"skipped: {args.root} is absent (needs ../shared/data/ccp-dev)")
        return 0
    ds = read_kaggle(args.root)
    gs = garments_of(ds)
    _, val_ids = split_ids([r.image_id for r in ds.records if r.categories], args.seed, args.val_fraction)
    held_out = set(val_ids)
    garment_engine = Engine(args.garment_model, progress=False)
    photo_engine = Engine(args.photo_model, progress=False)
    padding = garment_engine.garment_padding
    val = [g for g in gs.garments if g.image_id in held_out]
    crops = [c for c, g in zip(crops_of(gs, padding), gs.garments) if g.image_id in held_out]
    labels = np.stack([gs.labels.categories_to_multihot([g.category_id]) for g in val])
    attributes = np.stack([gs.labels.attributes_to_multihot(g.attribute_ids) for g in val])
    groups = [g.image_id for g in val]
    attrs = attributes if attributes.any() else None
    rows = {}

    def evaluate(name: str, vectors: np.ndarray, probabilities=None, note: str = "") -> dict:
        m = evaluate_garment_embeddings(vectors, labels, groups, args.k, attributes=attrs, probabilities=probabilities,
                                        baseline_samples=args.baseline_samples)
        rows[name] = {**m, "note": note}
        return m

    for name, engine in (("garment model", garment_engine), ("whole-photo model", photo_engine)):
        result = engine.embed_result(crops)
        assert not result.errors, result.errors[:3]
        probs = result.probabilities
        if probs is not None:
            probs = engine._probabilities_in(gs.labels.category_names, probs)
        meta = engine.metadata
        evaluate(name, result.embeddings, probs,
                 f"{meta.architecture}/{meta.objective} {meta.image_size}px, garment_model="
                 f"{meta.extra.get('garment_model', 'false')}, {result.timings.images_per_s:.0f} crops/s")
    hist, seconds = hsv_histograms(crops)
    evaluate("HSV histogram of the crop", hist, note=f"8x4x4 bins, Hellinger; {len(crops) / seconds:.0f} crops/s")
    base = rows["garment model"]["baseline"]

    # Indexing throughput with the garment model: every garment of ccp-dev vs every photo.
    with tempfile.TemporaryDirectory() as tmp:
        garment_engine.build_garment_index(args.root, pathlib.Path(tmp) / "garments")
        crops_timing = garment_engine.last_result.timings
        photos = [r.path for r in ds.records]
        garment_engine.build_index(photos, pathlib.Path(tmp) / "photos")
        photo_timing = garment_engine.last_result.timings

    k = rows["garment model"]["k"]
    lines = [
        f"ccp-dev garments of the {len(held_out)} held-out photos: {len(val)} garments, leave-one-photo-out, "
        f"relevance = same category, k={k}",
        f"| ranking | mAP@{k} | P@{k} | R@{k} | NDCG@{k} | top-1 category acc. | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        acc = f"{m['f1_micro_model']:.3f}" if "f1_micro_model" in m else "-"
        lines.append(f"| {name} | {m[f'map@{k}']:.3f} | {m[f'precision@{k}']:.3f} | {m[f'recall@{k}']:.3f} | "
                     f"{m[f'ndcg@{k}']:.3f} | {acc} | {m['note']} |")
    lines.append(f"| random ({args.baseline_samples} draws) | {base[f'map@{k}']:.3f} | {base[f'precision@{k}']:.3f} | "
                 f"{base[f'recall@{k}']:.3f} | {base[f'ndcg@{k}']:.3f} | - | |")
    lines.append("")
    lines.append(f"indexing with the garment model: {crops_timing.embedded} garment crops at "
                 f"{crops_timing.images_per_s:.1f} crops/s vs {photo_timing.embedded} whole photos at "
                 f"{photo_timing.images_per_s:.1f} photos/s (ratio {crops_timing.images_per_s / photo_timing.images_per_s:.2f}; "
                 f"decode {crops_timing.decode_s:.1f} s vs {photo_timing.decode_s:.1f} s summed over threads)")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "indexing": {
            "garment_crops_per_s": crops_timing.images_per_s, "photos_per_s": photo_timing.images_per_s}},
            indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
