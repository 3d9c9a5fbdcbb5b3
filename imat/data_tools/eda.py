"""Statistics and plots of a source dataset, Kaggle-layout or image-level (exploratory data analysis).

`compute_stats(ds)` returns a JSON-able dict (counts, frequencies, histograms, size outliers,
category co-occurrence); `format_summary(stats)` renders it for a terminal; `write_report(ds, out)`
writes the plots, stats.json and a one-page report.html that shows them.

Plots use matplotlib's Agg canvas directly (a `Figure` + `FigureCanvasAgg`), so neither importing
imat nor writing a report touches pyplot's global backend state. Example images are decoded
downscaled (JPEG draft mode) and masks are subsampled to the display size right after decoding,
so a 6000x4000 photo never reaches the plot at full resolution.

An image-level source (labels.csv) has no masks and no attributes: its report leaves out the
attribute and mask-example plots (with a note saying so), and its image sizes are read from the
image headers (labels.csv gives none).
"""

from __future__ import annotations

import collections
import html
import io
import json
import logging
import pathlib

import numpy as np

from imat.fileio import atomic_write_bytes
from imat.data_tools.images import decode_image, read_image_size
from imat.data_tools.kaggle import SourceDataset, rle_decode
from imat.errors import DataError, ImatError

logger = logging.getLogger(__name__)

TOP_ATTRIBUTES = 40
LARGE_SIDE = 2000       # sides above this are "very large" (the draft-mode decoder matters)
IQR_FACTOR = 3.0        # size outliers: beyond Q1 - 3 IQR or Q3 + 3 IQR ...
MIN_OUTLIER_DEVIATION = 0.25  # ... and at least 25% of the median beyond the quartile
MAX_LISTED_OUTLIERS = 50
EXAMPLE_LONG_SIDE = 320  # display size of example images

PLOTS = (
    ("category_frequency.png", "Images and mask instances per category."),
    ("attribute_frequency.png", f"The {TOP_ATTRIBUTES} most frequent attributes (mask rows carrying each)."),
    ("categories_per_image.png", "How many distinct categories an image has."),
    ("image_sizes.png", "Image width against height; size outliers in red."),
    ("cooccurrence.png", "Images in which two categories appear together (log colour scale); "
                         "the diagonal is each category's image count."),
    ("examples.png", "Example images with their masks overlaid in category colours."),
)
MASK_PLOTS = ("attribute_frequency.png", "examples.png")   # need masks / attributes


# ---- statistics ---------------------------------------------------------------------------------------

def _histogram(values) -> dict[str, int]:
    counts = collections.Counter(int(v) for v in values)
    return {str(k): counts[k] for k in sorted(counts)}


def _describe(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"min": None, "q1": None, "median": None, "q3": None, "max": None, "mean": None}
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"min": int(values.min()), "q1": float(q1), "median": float(med), "q3": float(q3),
            "max": int(values.max()), "mean": round(float(values.mean()), 2)}


def size_outliers(widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Boolean mask of images whose width or height lies far outside the quartiles, or a side > LARGE_SIDE.

    "Far" is max(IQR_FACTOR x IQR, MIN_OUTLIER_DEVIATION x median) beyond Q1 or Q3.
    """
    out = np.zeros(widths.shape, bool)
    for v in (widths, heights):
        if v.size == 0:
            continue
        q1, med, q3 = np.percentile(v, [25, 50, 75])
        # A floor of 25% of the median keeps near-constant sizes (tiny IQR) from flagging a few pixels.
        margin = max(IQR_FACTOR * (q3 - q1), MIN_OUTLIER_DEVIATION * med)
        out |= (v < q1 - margin) | (v > q3 + margin)
    return out | (np.maximum(widths, heights) > LARGE_SIDE)


def has_masks(ds: SourceDataset) -> bool:
    """Does this kind of source carry masks and attributes (Kaggle) or only image-level labels?"""
    return ds.has_masks


def record_sizes(ds: SourceDataset) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(widths, heights, record indices) of the records whose size is known: from the CSV, else from
    the image header (cheap: nothing is decoded). Unreadable images are left out, with a log line."""
    widths, heights, index = [], [], []
    for i, r in enumerate(ds.records):
        if r.width is not None and r.height is not None:
            w, h = r.width, r.height
        else:
            try:
                w, h = read_image_size(r.path)
            except ImatError as e:
                logger.warning("image size of %s unknown: %s", r.image_id, e)
                continue
        widths.append(w)
        heights.append(h)
        index.append(i)
    return np.array(widths, np.int64), np.array(heights, np.int64), index


def compute_stats(ds: SourceDataset, sizes: tuple[np.ndarray, np.ndarray, list[int]] | None = None) -> dict:
    """JSON-able statistics of a read dataset (counts agree with ds.category_matrix() etc.).

    sizes: record_sizes(ds), when the caller has it already.
    """
    labels = ds.labels
    records = ds.records
    n = len(records)
    cat_matrix = ds.category_matrix()
    attr_matrix = ds.attribute_matrix()

    inst_per_cat = collections.Counter(m.class_id for r in records for m in r.masks)
    rows_per_attr = collections.Counter(a for r in records for m in r.masks for a in m.attribute_ids)
    images_per_cat = cat_matrix.sum(axis=0).astype(int)
    images_per_attr = attr_matrix.sum(axis=0).astype(int)

    categories = [
        {"id": cid, "name": name, "supercategory": sup, "images": int(images_per_cat[i]),
         "instances": int(inst_per_cat.get(cid, 0))}
        for i, (cid, name, sup) in enumerate(zip(labels.category_ids, labels.category_names,
                                                  labels.category_supercategories))
    ]
    attributes = [
        {"id": aid, "name": name, "images": int(images_per_attr[i]), "rows": int(rows_per_attr.get(aid, 0))}
        for i, (aid, name) in enumerate(zip(labels.attribute_ids, labels.attribute_names))
    ]
    used_attrs = [a for a in attributes if a["rows"] > 0]
    top_attrs = sorted(used_attrs, key=lambda a: (-a["rows"], a["id"]))[:TOP_ATTRIBUTES]

    widths, heights, sized = sizes if sizes is not None else record_sizes(ds)
    outliers = size_outliers(widths, heights)
    outlier_ids = [records[sized[i]].image_id for i in np.flatnonzero(outliers)]
    rows_without_attrs = sum(1 for r in records for m in r.masks if not m.attribute_ids)
    cooc = (cat_matrix.T.astype(np.int64) @ cat_matrix.astype(np.int64)) if n else \
        np.zeros((labels.num_categories,) * 2, np.int64)
    cats_per_image = cat_matrix.sum(axis=1).astype(int)
    attrs_per_image = attr_matrix.sum(axis=1).astype(int)
    problem_kinds = collections.Counter(p.kind for p in ds.problems)

    return {
        "root": str(ds.root),
        "kind": ds.kind,
        "csv": ds.csv_name,
        "has_masks": has_masks(ds),
        "images": n,
        "unlabelled": int(sum(1 for r in records if not r.categories)),
        "mask_rows": int(sum(len(r.masks) for r in records)),
        "rows_read": int(getattr(ds, "num_rows_read", 0)),
        "images_seen": int(getattr(ds, "num_images_seen", n)),
        "num_categories": labels.num_categories,
        "num_attributes": labels.num_attributes,
        "categories": categories,
        "categories_unused": [c["name"] for c in categories if c["images"] == 0],
        "attributes_top": top_attrs,
        "attributes_used": len(used_attrs),
        "attributes_unused": labels.num_attributes - len(used_attrs),
        "rows_without_attributes": rows_without_attrs,
        "categories_per_image": {"histogram": _histogram(cats_per_image), **_describe(cats_per_image)},
        "attributes_per_image": {"histogram": _histogram(attrs_per_image), **_describe(attrs_per_image)},
        "masks_per_image": _describe(np.array([len(r.masks) for r in records], np.int64)),
        "image_sizes": {
            "width": _describe(widths),
            "height": _describe(heights),
            "portrait": int((heights > widths * 1.05).sum()),
            "landscape": int((widths > heights * 1.05).sum()),
            "square": int(widths.size - (heights > widths * 1.05).sum() - (widths > heights * 1.05).sum()),
            "known": int(widths.size),
            "larger_than_%d" % LARGE_SIDE: int((np.maximum(widths, heights) > LARGE_SIDE).sum()),
            "outlier_rule": f"width or height beyond max({IQR_FACTOR:g} IQR, {MIN_OUTLIER_DEVIATION:g} median) "
                            f"of the quartiles, or a side > {LARGE_SIDE}",
            "outliers": len(outlier_ids),
            "outlier_ids": outlier_ids[:MAX_LISTED_OUTLIERS],
        },
        "cooccurrence": {"names": list(labels.category_names), "matrix": cooc.astype(int).tolist()},
        "problems": {"count": len(ds.problems), "by_kind": dict(problem_kinds.most_common()),
                     "first": [str(p) for p in ds.problems[:10]]},
    }


def format_summary(stats: dict, *, top: int = 10) -> str:
    """A readable multi-line summary of compute_stats() output, for stdout."""
    s = stats
    masks = s.get("has_masks", True)
    cpi, api, mpi = s["categories_per_image"], s["attributes_per_image"], s["masks_per_image"]
    if masks:
        lines = [f"dataset: {s['root']}",
                 f"  {s['images']} labelled images, {s['mask_rows']} mask rows "
                 f"({s['images_seen']} images / {s['rows_read']} rows in train.csv; "
                 f"{s['problems']['count']} problems)"]
    else:
        lines = [f"dataset: {s['root']} (image-level labels: no masks, no attributes)",
                 f"  {s['images']} images, {s['unlabelled']} without labels "
                 f"({s['images_seen']} images / {s['rows_read']} rows in {s['csv']}; "
                 f"{s['problems']['count']} problems)"]
    for kind, count in s["problems"]["by_kind"].items():
        lines.append(f"    {kind}: {count}")
    if masks:
        lines.append(f"  categories per image: mean {cpi['mean']}, median {cpi['median']}, max {cpi['max']}; "
                     f"masks per image: mean {mpi['mean']}, max {mpi['max']}")
        lines.append(f"  attributes per image: mean {api['mean']}, max {api['max']}; "
                     f"mask rows without attributes: {s['rows_without_attributes']} of {s['mask_rows']}")
    else:
        lines.append(f"  categories per image: mean {cpi['mean']}, median {cpi['median']}, max {cpi['max']}")
    cats = sorted(s["categories"], key=lambda c: (-c["images"], c["id"]))
    lines.append(f"top {min(top, len(cats))} categories (images{' / instances' if masks else ''}):")
    n = max(s["images"], 1)
    for c in cats[:top]:
        lines.append(f"  {c['id']:>3} {c['name'][:34]:<34} {c['images']:>7} ({100 * c['images'] / n:5.1f}%)"
                     + (f" {c['instances']:>8}" if masks else ""))
    unused = s["categories_unused"]
    listed = f" ({', '.join(unused[:8])}{', ...' if len(unused) > 8 else ''})" if unused else ""
    lines.append(f"categories never seen: {len(unused)}{listed}")
    if masks:
        lines.append(f"attributes used: {s['attributes_used']} of {s['num_attributes']} "
                     f"({s['attributes_unused']} unused)")
        for a in s["attributes_top"][:min(top, 5)]:
            lines.append(f"  {a['id']:>3} {a['name'][:34]:<34} {a['rows']:>8} rows")
    sz = s["image_sizes"]
    if sz.get("known", s["images"]):
        wd, ht = sz["width"], sz["height"]
        lines.append(f"image sizes: width {wd['min']}..{wd['max']} (median {wd['median']:g}), "
                     f"height {ht['min']}..{ht['max']} (median {ht['median']:g})")
        lines.append(f"  portrait {sz['portrait']}, landscape {sz['landscape']}, square {sz['square']}; "
                     f"sides > {LARGE_SIDE}: {sz['larger_than_%d' % LARGE_SIDE]}")
        shown = ", ".join(sz["outlier_ids"][:5])
        lines.append(f"  size outliers: {sz['outliers']}" + (f" (e.g. {shown})" if shown else ""))
    pairs = _top_pairs(s["cooccurrence"], 5)
    if pairs:
        lines.append("most frequent category pairs (images):")
        for a, b, count in pairs:
            lines.append(f"  {a[:28]} + {b[:28]}: {count}")
    return "\n".join(lines)


def _top_pairs(cooc: dict, k: int) -> list[tuple[str, str, int]]:
    m = np.asarray(cooc["matrix"], np.int64)
    if m.size == 0:
        return []
    iu = np.triu_indices_from(m, k=1)
    vals = m[iu]
    order = np.argsort(-vals, kind="stable")[:k]
    names = cooc["names"]
    return [(names[iu[0][i]], names[iu[1][i]], int(vals[i])) for i in order if vals[i] > 0]


# ---- writing helpers ----------------------------------------------------------------------------------


def _save_figure(fig, path: pathlib.Path, dpi: int = 100) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # attaches the Agg canvas; no pyplot, no global backend switch
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def category_colours(n: int) -> np.ndarray:
    """n distinct RGB colours in [0, 1] (tab20 / tab20b / tab20c), for mask overlays and legends."""
    from matplotlib import colormaps

    cols = [colormaps[name](i)[:3] for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    return np.array([cols[i % len(cols)] for i in range(n)], np.float64)


# ---- plots --------------------------------------------------------------------------------------------

def _plot_category_frequency(stats: dict, path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    cats = stats["categories"]
    names = [f"{c['name'][:30]} ({c['id']})" for c in cats]
    images = np.array([c["images"] for c in cats])
    inst = np.array([c["instances"] for c in cats])
    y = np.arange(len(cats))
    fig = Figure(figsize=(9, 0.22 * len(cats) + 1.5))
    ax = fig.add_subplot()
    if stats.get("has_masks", True):
        ax.barh(y - 0.2, inst, height=0.4, label="instances (mask rows)", color="#9ecae1")
        ax.barh(y + 0.2, images, height=0.4, label="images", color="#08519c")
    else:   # image-level labels: no instances to count
        ax.barh(y, images, height=0.6, label="images", color="#08519c")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("count")
    ax.set_title(f"Category frequency ({stats['images']} images"
                 + (f", {stats['mask_rows']} mask rows)" if stats.get("has_masks", True) else ", image-level labels)"))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    _save_figure(fig, path)


def _plot_attribute_frequency(stats: dict, path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    top = stats["attributes_top"]
    fig = Figure(figsize=(9, 0.22 * max(len(top), 1) + 1.5))
    ax = fig.add_subplot()
    if top:
        y = np.arange(len(top))
        ax.barh(y, [a["rows"] for a in top], color="#31a354")
        ax.set_yticks(y, [f"{a['name'][:34]} ({a['id']})" for a in top], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("mask rows with the attribute")
        ax.grid(axis="x", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no attributes in this dataset", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    ax.set_title(f"Top {len(top)} attributes ({stats['attributes_used']} used, "
                 f"{stats['attributes_unused']} of {stats['num_attributes']} unused)")
    _save_figure(fig, path)


def _plot_categories_per_image(stats: dict, path: pathlib.Path) -> None:
    from matplotlib.figure import Figure

    hist = stats["categories_per_image"]["histogram"]
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    ks = [int(k) for k in hist]
    ax.bar(ks, [hist[k] for k in hist], color="#756bb1")
    ax.set_xlabel("distinct categories in the image")
    ax.set_ylabel("images")
    if ks:
        ax.set_xticks(range(min(ks), max(ks) + 1))
    ax.set_title(f"Categories per image (mean {stats['categories_per_image']['mean']})")
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)


def _plot_image_sizes(ds: SourceDataset, stats: dict, path: pathlib.Path, sizes) -> None:
    from matplotlib.figure import Figure

    widths, heights, sized = sizes
    out = size_outliers(widths, heights)
    fig = Figure(figsize=(6.5, 6))
    ax = fig.add_subplot()
    ax.scatter(widths[~out], heights[~out], s=10, alpha=0.5, color="#3182bd", label="images")
    if out.any():
        ax.scatter(widths[out], heights[out], s=22, color="#de2d26", label=f"outliers ({int(out.sum())})")
        if out.sum() <= 12:
            for i in np.flatnonzero(out):
                ax.annotate(ds.records[sized[i]].image_id[:8], (widths[i], heights[i]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
    top = max(int(widths.max(initial=1)), int(heights.max(initial=1))) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="square")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title(f"Image sizes ({stats['image_sizes']['portrait']} portrait, "
                 f"{stats['image_sizes']['landscape']} landscape)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    _save_figure(fig, path)


def _plot_cooccurrence(stats: dict, path: pathlib.Path) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    m = np.asarray(stats["cooccurrence"]["matrix"], np.float64)
    names = [f"{n[:24]} ({i})" for i, n in enumerate(stats["cooccurrence"]["names"])]
    fig = Figure(figsize=(12, 11))
    ax = fig.add_subplot()
    shown = np.ma.masked_less_equal(m, 0)  # log scale: zero cells stay blank
    vmax = max(float(m.max(initial=1)), 1.0)
    im = ax.imshow(shown, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(vmax, 1.0 + 1e-9)),
                   interpolation="nearest")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title("Category co-occurrence (images containing both; log scale)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="images")
    _save_figure(fig, path)


def _example_overlay(rec, colours: np.ndarray, long_side: int = EXAMPLE_LONG_SIDE):
    """(image float[h,w,3] in [0,1] with masks blended in, category ids shown) at display size."""
    scale = min(1.0, long_side / max(rec.height, rec.width))
    h, w = max(1, round(rec.height * scale)), max(1, round(rec.width * scale))
    try:
        img = decode_image(rec.path, (h, w), "stretch").astype(np.float64) / 255.0
    except ImatError as e:
        logger.warning("example %s: %s", rec.image_id, e)
        img = np.full((h, w, 3), 0.5)
    # Nearest-neighbour subsampling of full-size masks (pixel centres).
    rows = np.minimum(((np.arange(h) + 0.5) * (rec.height / h)).astype(np.intp), rec.height - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * (rec.width / w)).astype(np.intp), rec.width - 1)
    shown = []
    for m in rec.masks:
        try:
            mask = rle_decode(m.encoded_pixels, rec.height, rec.width)[rows[:, None], cols[None, :]].astype(bool)
        except DataError as e:
            logger.warning("example %s line %d: %s", rec.image_id, m.line, e)
            continue
        img[mask] = 0.45 * img[mask] + 0.55 * colours[m.class_id % len(colours)]
        shown.append(m.class_id)
    return img, sorted(set(shown))


def _plot_examples(ds: SourceDataset, path: pathlib.Path, examples: int, seed: int) -> None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    labels = ds.labels
    colours = category_colours(labels.num_categories)
    candidates = [i for i, r in enumerate(ds.records) if r.masks]
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(candidates), size=min(examples, len(candidates)), replace=False).tolist()) \
        if candidates and examples > 0 else []
    chosen = [candidates[i] for i in chosen]
    ncols = min(3, max(len(chosen), 1))
    nrows = max(1, -(-len(chosen) // ncols))
    fig = Figure(figsize=(4 * ncols + 3.2, 4.4 * nrows))
    used: set[int] = set()
    for k, i in enumerate(chosen):
        rec = ds.records[i]
        img, cats = _example_overlay(rec, colours)
        used.update(cats)
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.imshow(img, interpolation="bilinear")
        ax.set_title(f"{rec.image_id[:12]}  {rec.width}x{rec.height}", fontsize=8)
        ax.set_axis_off()
    if not chosen:
        ax = fig.add_subplot()
        ax.text(0.5, 0.5, "no examples to show", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    pos = {c: i for i, c in enumerate(labels.category_ids)}
    handles = [Patch(color=colours[c % len(colours)], label=f"{labels.category_names[pos[c]][:26]} ({c})")
               for c in sorted(used) if c in pos]
    if handles:
        fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
        fig.subplots_adjust(right=1 - 3.0 / (4 * ncols + 3.2))
    fig.suptitle("Examples with masks", fontsize=10)
    _save_figure(fig, path, dpi=90)


# ---- report -------------------------------------------------------------------------------------------

def _html(stats: dict) -> str:
    e = html.escape
    n = max(stats["images"], 1)
    cats = sorted(stats["categories"], key=lambda c: (-c["images"], c["id"]))[:15]
    rows = "\n".join(
        f"<tr><td>{c['id']}</td><td>{e(c['name'])}</td><td>{e(c['supercategory'])}</td>"
        f"<td>{c['images']}</td><td>{100 * c['images'] / n:.1f}%</td><td>{c['instances']}</td></tr>"
        for c in cats)
    sz = stats["image_sizes"]
    problems = "".join(f"<li>{e(k)}: {v}</li>" for k, v in stats["problems"]["by_kind"].items())
    masks = stats.get("has_masks", True)
    figures = "\n".join(
        f'<figure><img src="{name}" alt="{e(name)}"><figcaption>{e(caption)}</figcaption></figure>'
        for name, caption in PLOTS if masks or name not in MASK_PLOTS)
    if not masks:
        figures += ("\n<p>No attribute or mask-example plots: this is an image-level source "
                    f"({e(stats['csv'])}), which has neither masks nor attributes.</p>")
    width, height = sz["width"], sz["height"]
    size_line = (f"width {width['min']}&ndash;{width['max']} (median {width['median']:g}), "
                 f"height {height['min']}&ndash;{height['max']} (median {height['median']:g}); "
                 f"{sz['outliers']} size outliers") if stats["images"] else "no images"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imat dataset report: {e(stats['root'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; border: 1px solid #eee; }}
figcaption {{ color: #555; font-size: 14px; }}
</style></head><body>
<h1>Dataset report</h1>
<p><code>{e(stats['root'])}</code></p>
<ul>
<li>{stats['images']} {'labelled images' if masks else 'images'}, {stats['mask_rows']} mask rows
 ({stats['images_seen']} images and {stats['rows_read']} rows in {e(stats.get('csv', 'train.csv'))}){
 '' if masks else f"; image-level labels, {stats['unlabelled']} photos without labels"}</li>
<li>categories per image: mean {stats['categories_per_image']['mean']}, max {stats['categories_per_image']['max']};
 {len(stats['categories_unused'])} of {stats['num_categories']} categories never seen</li>
<li>attributes: {stats['attributes_used']} of {stats['num_attributes']} used;
 {stats['rows_without_attributes']} mask rows have none</li>
<li>image sizes: {size_line}</li>
<li>problems: {stats['problems']['count']}{f'<ul>{problems}</ul>' if problems else ''}</li>
</ul>
<h2>Top categories</h2>
<table><tr><th>id</th><th>name</th><th>supercategory</th><th>images</th><th>% images</th><th>instances</th></tr>
{rows}
</table>
<h2>Plots</h2>
{figures}
<p>All numbers are also in <a href="stats.json">stats.json</a>.</p>
</body></html>
"""


def write_report(ds: SourceDataset, out_dir, *, examples: int = 6, seed: int = 0) -> pathlib.Path:
    """Write the PNG plots, stats.json and report.html to out_dir; returns the path of report.html."""
    out = pathlib.Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{out}: cannot create the report folder ({e.strerror or e})") from None
    sizes = record_sizes(ds)
    stats = compute_stats(ds, sizes)
    atomic_write_bytes(out / "stats.json", (json.dumps(stats, indent=1) + "\n").encode("utf-8"))
    _plot_category_frequency(stats, out / "category_frequency.png")
    _plot_categories_per_image(stats, out / "categories_per_image.png")
    _plot_image_sizes(ds, stats, out / "image_sizes.png", sizes)
    _plot_cooccurrence(stats, out / "cooccurrence.png")
    if has_masks(ds):
        _plot_attribute_frequency(stats, out / "attribute_frequency.png")
        _plot_examples(ds, out / "examples.png", examples, seed)
    else:
        logger.info("%s: image-level source (no masks, no attributes): attribute and mask-example plots "
                    "left out", ds.root)
    report = out / "report.html"
    atomic_write_bytes(report, _html(stats).encode("utf-8"))
    logger.info("wrote dataset report to %s", report)
    return report
