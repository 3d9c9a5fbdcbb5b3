"""`imat index`, `imat search`, `imat eval`: thin commands over imat.engine.Engine.

Never imports the training stack. User mistakes (missing model, empty folder, model/index
mismatch) raise ImatError, which `imat.cli.main.main` prints as one line.
"""

from __future__ import annotations

import json
import logging
import pathlib

import click

from imat.constants import RESIZE_MODES
from imat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


def _quiet_faiss() -> None:
    # faiss logs its SIMD-variant probing at INFO; that is noise for a user.
    logging.getLogger("faiss").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def _engine(model: pathlib.Path, batch_size: int, threads: int | None, resize_mode: str | None = None):
    from imat.engine import Engine

    _quiet_faiss()
    return Engine(model, batch_size=batch_size, decode_threads=threads, resize_mode=resize_mode)


def _note_skipped(skipped: list[str], what: str, show: int = 3) -> None:
    if skipped:
        click.echo(f"note: skipped {len(skipped)} {what} (e.g. {', '.join(skipped[:show])})", err=True)


def _note_folder_skips(found) -> int:
    """Say what a folder scan left out (non-image files; image names that are not files); returns the count."""
    _note_skipped(found.skipped, "non-image files")
    _note_skipped(found.not_files, "entries that are not image files", show=5)
    return len(found.skipped) + len(found.not_files)


def _check_output_file(path: pathlib.Path | None, option: str, example: str) -> None:
    """Before any work: an output file option must not name a folder (it would fail only at the end)."""
    if path is not None and path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file path such as {path / example}")


def _summarise_errors(errors, what: str) -> None:
    if errors:
        click.echo(f"skipped {len(errors)} unreadable {what}:", err=True)
        for err in errors[:5]:
            click.echo(f"  {err}", err=True)
        if len(errors) > 5:
            click.echo(f"  ... and {len(errors) - 5} more", err=True)


common_model = click.option(
    "--model", "model", required=True, type=click.Path(path_type=pathlib.Path), help="model.onnx from `imat export`."
)
common_batch = click.option("--batch-size", default=64, show_default=True, help="Images per model call.")
common_threads = click.option(
    "--threads", type=int, default=None,
    help="Decoder threads; the model gets the other cores (default: planned from the decode and model costs "
         "measured on the first batches, re-checked as the run goes).",
)
garment_flag = click.option(
    "--garments", is_flag=True,
    help="Work on garments: one item per mask of the Kaggle folder's train.csv (its box, padded, cropped).")
garment_parts = click.option("--keep-parts", is_flag=True,
                             help="With --garments: keep garment parts (sleeve, neckline, ...), left out by default.")
garment_min_area = click.option("--min-mask-area", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
                                help="With --garments: skip masks below this fraction of the photo [default: 0.001].")


def _garment_options(engine, garments: bool, keep_parts: bool, min_mask_area: float | None):
    """GarmentOptions for --garments (padding: the model's); ConfigError for garment options without it."""
    if not garments:
        if keep_parts or min_mask_area is not None:
            raise ConfigError("--keep-parts and --min-mask-area apply to garments; add --garments")
        return None
    from imat.data_tools.garments import GarmentOptions

    defaults = GarmentOptions()
    return GarmentOptions(padding=engine.garment_padding, keep_parts=keep_parts,
                          min_area_fraction=defaults.min_area_fraction if min_mask_area is None else min_mask_area)


def _garment_root(images: pathlib.Path, option: str = "--images") -> None:
    if not (images / "train.csv").is_file():
        raise DataError(f"{option} {images}: not a Kaggle-layout folder (no train.csv); --garments takes the "
                        "garments from its masks")


@click.command("index")
@common_model
@click.option("--images", "images", type=click.Path(path_type=pathlib.Path), default=None,
              help="A folder of images, or a Kaggle folder (train.csv present: labels are stored).")
@click.option("--out", "out", required=True, type=click.Path(path_type=pathlib.Path), help="Index folder to write.")
@click.option("--index-type", default="auto", show_default=True,
              help="FAISS factory string (Flat, HNSW32,Flat, IVF1024,PQ32, ...) or auto.")
@click.option("--memory-budget-mb", type=float, default=None, help="Memory budget for auto index choice.")
@click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default=None,
              help="Assert the resize mode (default: the model's own, from its metadata); another mode is refused.")
@click.option("--add", "add", is_flag=True, default=False,
              help="Append the --images to the existing index --out instead of building a new one.")
@click.option("--remove", "remove_ids", multiple=True, metavar="ID",
              help="Remove the item with this id from the index --out (repeatable; no --images).")
@common_batch
@common_threads
@garment_flag
@garment_parts
@garment_min_area
def index(model, images, out, index_type, memory_budget_mb, resize_mode, add, remove_ids, batch_size, threads,
          garments=False, keep_parts=False, min_mask_area=None):
    """Embed a folder of images and build a FAISS index (or --add to it, or --remove items from it).

    --garments: one row per garment of a Kaggle folder (id <ImageId>:<k>; path, box, category, attributes).
    """
    from imat.engine.gallery import folder_items

    engine = _engine(model, batch_size, threads, resize_mode)  # a model/resize-mode mismatch fails first
    if remove_ids:
        if images is not None or add:
            raise ConfigError("--remove takes no --images and no --add; run them as two commands")
        gallery = engine.remove_from_index(out, list(remove_ids))
        click.echo(f"removed {len(set(remove_ids))} ids from {out}; {gallery.count} items left")
        return
    if images is None:
        raise ConfigError("give --images FOLDER (to build or --add), or --remove ID to remove items")
    if garments:
        if add:
            raise ConfigError("--garments builds a new garment index; --add with --garments is not supported")
        _garment_root(images)
        options = _garment_options(engine, garments, keep_parts, min_mask_area)
        budget = int(memory_budget_mb * 2**20) if memory_budget_mb else None
        gallery = engine.build_garment_index(images, out, index_type=index_type, options=options,
                                             memory_budget_bytes=budget)
        result = engine.last_result
        _summarise_errors(result.errors, "garments")
        counts = gallery.meta.get("garment_counts", {})
        click.echo(
            f"indexed {gallery.count} garments of {images} into {out} ({gallery.index_type}, dim {gallery.dim}; "
            f"skipped {counts.get('skipped_part_masks', 0)} part masks, {counts.get('skipped_small_masks', 0)} "
            f"small masks) at {result.timings.images_per_s:.1f} crops/s on {engine.provider}"
        )
        return
    _garment_options(None, garments, keep_parts, min_mask_area)   # garment options without --garments: error
    found = folder_items(images)
    if found.problems:
        click.echo(found.problems, err=True)
    _note_folder_skips(found)
    if found.labelled:
        click.echo(f"{images}: Kaggle folder, {len(found.items)} labelled images", err=True)
    items, ids, labels = found.items, found.ids, found.labels
    budget = int(memory_budget_mb * 2**20) if memory_budget_mb else None
    if add:
        before = engine.load_index(out).count
        gallery = engine.add_to_index(out, items, labels=labels, ids=ids)
        result = engine.last_result
        _summarise_errors(result.errors, "images")
        click.echo(f"added {gallery.count - before} images to {out} ({gallery.count} items, {gallery.index_type})")
        return
    gallery = engine.build_index(items, out, index_type=index_type, labels=labels, ids=ids,
                                 memory_budget_bytes=budget)
    result = engine.last_result
    _summarise_errors(result.errors, "images")
    click.echo(
        f"indexed {gallery.count} images into {out} ({gallery.index_type}, dim {gallery.dim}, "
        f"{'labelled' if labels is not None else 'unlabelled'}) at {result.timings.images_per_s:.1f} images/s "
        f"on {engine.provider}"
    )


@click.command("search")
@common_model
@click.option("--index", "index_dir", required=True, type=click.Path(path_type=pathlib.Path), help="Index folder.")
@click.option("--batch", "batch_dir", type=click.Path(path_type=pathlib.Path), default=None,
              help="A folder of query images.")
@click.argument("queries", nargs=-1, type=click.Path(path_type=pathlib.Path))
@click.option("--k", "k", default=10, show_default=True, help="Neighbours per query.")
@click.option("--out", "out", required=True, type=click.Path(path_type=pathlib.Path), help="Results JSONL to write.")
@click.option("--html", "html_out", type=click.Path(path_type=pathlib.Path), default=None,
              help="Also write an HTML gallery of the results.")
@click.option("--category", "categories", multiple=True, metavar="NAME",
              help="Return only items of this category (repeatable; see --match).")
@click.option("--match", "match", type=click.Choice(["any", "all"]), default="any", show_default=True,
              help="With several --category: items having any of them, or all of them.")
@common_batch
@common_threads
@click.option("--box", "box", default=None, metavar="X0,Y0,X1,Y1",
              help="Search with this region of the (one) query photo: pixels, x1/y1 exclusive.")
@garment_flag
@garment_parts
@garment_min_area
@click.option("--any-category", is_flag=True,
              help="Garment queries (--box, --garments): search every category, not only the query's "
                   "predicted one (the default when the model has a classifier and no --category is given).")
def search(model, index_dir, batch_dir, queries, k, out, html_out, categories, match, batch_size, threads, box=None,
           garments=False, keep_parts=False, min_mask_area=None, any_category=False):
    """Search an index with one or more images, or a folder of queries (--batch).

    --box X0,Y0,X1,Y1 searches with one region of one photo; --batch KAGGLE_DIR --garments searches
    with every garment of every photo there (query ids <ImageId>:<k>). A garment query searches within
    its predicted category (when the model has a classifier) unless --category or --any-category is given.
    """
    from imat.data_tools.images import is_image_name
    from imat.engine.records import jsonl_text
    from imat.engine.report import write_html_report
    from imat.fileio import atomic_write_text

    if bool(batch_dir) == bool(queries):
        raise ConfigError("give either --batch QUERY_DIR or one or more QUERY_IMAGE paths (not both, not neither)")
    _check_output_file(out, "--out", "results.jsonl")
    _check_output_file(html_out, "--html", "report.html")
    if box is not None or garments:
        items, engine = _garment_queries(model, batch_size, threads, batch_dir, queries, box, garments, keep_parts,
                                         min_mask_area)
        skipped_count = 0
    elif keep_parts or min_mask_area is not None:
        raise ConfigError("--keep-parts and --min-mask-area apply to garments; add --garments")
    elif batch_dir:
        from imat.engine.gallery import plain_folder_items

        found = plain_folder_items(batch_dir)
        items = found.items
        skipped_count = _note_folder_skips(found)
    else:
        # A named query that is not a regular file (a FIFO, a folder) becomes an error record.
        items = [q for q in queries if is_image_name(q.name)]
        skipped = [str(q) for q in queries if not is_image_name(q.name)]
        if not items:
            raise DataError(f"none of the given queries is an image file: {', '.join(skipped[:3])}")
        _note_skipped(skipped, "non-image files")
        skipped_count = len(skipped)
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if box is None and not garments:
        engine = _engine(model, batch_size, threads)
    gallery = engine.load_index(index_dir)  # fingerprint check before any embedding work
    if categories:
        unknown = sorted(set(categories) - set(gallery.category_names()))
        if unknown and gallery.labelled:
            click.echo(f"note: no item of {index_dir} has category {', '.join(unknown)} "
                       f"(known: {', '.join(gallery.category_names()[:10])})", err=True)
    garment_queries = box is not None or garments
    if any_category and not garment_queries:
        raise ConfigError("--any-category applies to garment queries (--box or --garments)")
    if garment_queries and not categories and not any_category:
        records = engine.search_within_predicted(items, k=k, index=gallery)
    else:
        records = engine.search(items, k=k, index=gallery, categories=list(categories) or None, match=match)
    atomic_write_text(out, jsonl_text(records))
    if html_out:
        write_html_report(records, html_out, title=f"imat search: {index_dir}")
    errors = [r for r in records if "error" in r]
    for r in errors[:5]:
        click.echo(f"error: {r['query']}: {r['error']}", err=True)
    click.echo(
        f"searched {len(records) - len(errors)} of {len(records)} queries against {gallery.count} items "
        f"(k={min(k, gallery.count)}); {len(errors)} errors"
        + (f"; {skipped_count} entries skipped" if skipped_count else "")
        + f"; results in {out}"
        + (f", report in {html_out}" if html_out else "")
    )


def _garment_queries(model, batch_size, threads, batch_dir, queries, box, garments, keep_parts, min_mask_area):
    """(GarmentCrop queries, engine) for --box or --batch KAGGLE_DIR --garments."""
    from imat.data_tools.garments import GarmentCrop, check_box, parse_box, photo_size

    if box is not None and garments:
        raise ConfigError("--box searches with one region of one photo; --garments with every garment of "
                          "--batch KAGGLE_DIR: give one of them")
    if box is not None:
        if batch_dir or len(queries) != 1:
            raise ConfigError("--box needs exactly one QUERY_IMAGE (not --batch)")
        if keep_parts or min_mask_area is not None:
            raise ConfigError("--keep-parts and --min-mask-area apply to --garments, not --box")
        values = parse_box(box)
        width, height = photo_size(queries[0])
        crop_box = check_box(values, width, height, option="--box", where=str(queries[0]))
        engine = _engine(model, batch_size, threads)
        return [GarmentCrop(path=queries[0], box=crop_box, padding=engine.garment_padding)], engine
    if not batch_dir:
        raise ConfigError("--garments searches with the garments of --batch KAGGLE_DIR; give --batch")
    _garment_root(batch_dir, "--batch")
    engine = _engine(model, batch_size, threads)
    options = _garment_options(engine, garments, keep_parts, min_mask_area)
    gs, crops = engine.garment_items(batch_dir, options)
    click.echo(f"{batch_dir}: {gs.summary()}", err=True)
    return crops, engine


def format_eval_table(result: dict) -> str:
    k = result["k"]
    base = result["baseline"]
    what = f"{result['count']} garments of {result['photos']} photos" if "photos" in result else \
        f"{result['count']} images"
    lines = [
        f"leave-one-out on {what} (relevance {result['relevance']}, k={k})",
        f"{'metric':<22}{'model':>10}{'random':>10}{'ratio':>8}",
    ]
    for name in ("map", "precision", "recall", "ndcg"):
        key = f"{name}@{k}"
        v, b = result[key], base[key]
        ratio = f"{v / b:.1f}x" if b > 0 else "-"
        lines.append(f"{key:<22}{v:>10.4f}{b:>10.4f}{ratio:>8}")
    for key in ("f1_macro_neighbours", "f1_micro_neighbours", "f1_macro_model", "f1_micro_model"):
        if key in result:
            lines.append(f"{key:<22}{result[key]:>10.4f}")
    return "\n".join(lines)


@click.command("eval")
@common_model
@click.option("--images", "images", required=True, type=click.Path(path_type=pathlib.Path),
              help="A labelled folder: Kaggle layout (train.csv) or image-level (labels.csv + images/).")
@click.option("--k", "k", default=10, show_default=True, help="Cut-off for the metrics.")
@click.option("--json", "json_out", type=click.Path(path_type=pathlib.Path), default=None, help="Write metrics JSON.")
@common_batch
@common_threads
@garment_flag
@garment_parts
@garment_min_area
def evaluate(model, images, k, json_out, batch_size, threads, garments=False, keep_parts=False, min_mask_area=None):
    """Leave-one-out retrieval evaluation on a labelled folder (--garments: over its garments, never
    counting garments of the query's own photo)."""
    from imat.fileio import atomic_write_text

    _check_output_file(json_out, "--json", "metrics.json")
    from imat.data_tools.sources import detect_kind

    detect_kind(images)  # a labelled folder of either kind, or one clear error naming both layouts
    engine = _engine(model, batch_size, threads)
    options = _garment_options(engine, garments, keep_parts, min_mask_area)
    if garments:
        result = engine.evaluate_garments(images, k=k, options=options)
    else:
        result = engine.evaluate(images, k=k)
    _summarise_errors(result["skipped_images"], "images")
    click.echo(format_eval_table(result))
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
        click.echo(f"metrics written to {json_out}")
