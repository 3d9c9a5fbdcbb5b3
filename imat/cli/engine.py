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
    "--threads", type=int, default=None, help="Decoder threads (default: half the cores; the model gets the rest)."
)


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
def index(model, images, out, index_type, memory_budget_mb, resize_mode, add, remove_ids, batch_size, threads):
    """Embed a folder of images and build a FAISS index (or --add to it, or --remove items from it)."""
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
def search(model, index_dir, batch_dir, queries, k, out, html_out, categories, match, batch_size, threads):
    """Search an index with one or more images, or a folder of queries (--batch)."""
    from imat.data_tools.images import is_image_name
    from imat.engine.records import jsonl_text
    from imat.engine.report import write_html_report
    from imat.fileio import atomic_write_text

    if bool(batch_dir) == bool(queries):
        raise ConfigError("give either --batch QUERY_DIR or one or more QUERY_IMAGE paths (not both, not neither)")
    _check_output_file(out, "--out", "results.jsonl")
    _check_output_file(html_out, "--html", "report.html")
    if batch_dir:
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
    engine = _engine(model, batch_size, threads)
    gallery = engine.load_index(index_dir)  # fingerprint check before any embedding work
    if categories:
        unknown = sorted(set(categories) - set(gallery.category_names()))
        if unknown and gallery.labelled:
            click.echo(f"note: no item of {index_dir} has category {', '.join(unknown)} "
                       f"(known: {', '.join(gallery.category_names()[:10])})", err=True)
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


def format_eval_table(result: dict) -> str:
    k = result["k"]
    base = result["baseline"]
    lines = [
        f"leave-one-out on {result['count']} images (relevance {result['relevance']}, k={k})",
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
def evaluate(model, images, k, json_out, batch_size, threads):
    """Leave-one-out retrieval evaluation on a labelled folder."""
    from imat.fileio import atomic_write_text

    _check_output_file(json_out, "--json", "metrics.json")
    from imat.data_tools.sources import detect_kind

    detect_kind(images)  # a labelled folder of either kind, or one clear error naming both layouts
    engine = _engine(model, batch_size, threads)
    result = engine.evaluate(images, k=k)
    _summarise_errors(result["skipped_images"], "images")
    click.echo(format_eval_table(result))
    if json_out:
        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
        click.echo(f"metrics written to {json_out}")
