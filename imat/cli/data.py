"""`imat data ...`: check, synthesise, explore and prepare Kaggle-layout datasets.

Each subcommand is a thin call into imat.data_tools; the heavier modules (eda, tfds_builder,
synthetic) are imported inside the command so `imat data --help` stays fast and never loads the
training stack.
"""

from __future__ import annotations

import logging
import pathlib

import click

from imat.constants import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE_MODE, RESIZE_MODES
from imat.errors import DataError

logger = logging.getLogger(__name__)

_ROOT = click.Path(file_okay=False, path_type=pathlib.Path)


@click.group("data")
def data() -> None:
    """Synthesise, check, explore and prepare Kaggle-layout datasets.

    A dataset folder has the layout of Kaggle's iMaterialist Fashion 2020:
    train.csv (ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds),
    label_descriptions.json and train/<ImageId>.jpg.
    """


@data.command("check")
@click.argument("root", type=_ROOT)
@click.option("--strict", is_flag=True, help="Fail (exit 1) at the first bad row instead of skipping it.")
@click.option("--no-images", is_flag=True, help="Do not check that train/<ImageId>.jpg exists for each image.")
def check(root: pathlib.Path, strict: bool, no_images: bool) -> None:
    """Read ROOT (a Kaggle-layout folder) and report rows/images read and dropped, by reason."""
    from imat.data_tools.kaggle import read_kaggle

    ds = read_kaggle(root, strict=strict, check_images=not no_images)
    click.echo(ds.summary())


@data.command("synth")
@click.argument("out", type=_ROOT)
@click.option("--images", "num_images", type=click.IntRange(min=1), default=200, show_default=True,
              help="Number of synthetic images to write.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same dataset).")
def synth(out: pathlib.Path, num_images: int, seed: int) -> None:
    """Write a synthetic dataset in the exact Kaggle layout to OUT (for demos and tests)."""
    from imat.data_tools.synthetic import write_synthetic

    path = write_synthetic(out, num_images=num_images, seed=seed)
    click.echo(str(path))


@data.command("stats")
@click.argument("root", type=_ROOT)
@click.option("--out", "out_dir", type=_ROOT, required=True, help="Folder for report.html and its plots.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) at the first bad row instead of skipping it.")
def stats(root: pathlib.Path, out_dir: pathlib.Path, strict: bool) -> None:
    """Statistics and plots of the dataset in ROOT, written as an HTML report to --out."""
    from imat.data_tools import eda
    from imat.data_tools.kaggle import read_kaggle

    ds = read_kaggle(root, strict=strict)
    path = eda.write_report(ds, out_dir)
    format_summary = getattr(eda, "format_summary", None)
    click.echo(format_summary(eda.compute_stats(ds)) if format_summary else ds.summary())
    click.echo(f"report: {path}")


@data.command("prepare")
@click.argument("root", type=_ROOT)
@click.option("--out", "out_dir", type=_ROOT, required=True,
              help="Data dir to write the prepared (TFDS array_record) dataset to; give it to `imat train`.")
@click.option("--image-size", type=click.IntRange(min=8), default=DEFAULT_IMAGE_SIZE, show_default=True,
              help="Images are resized to this square size once, here.")
@click.option("--resize-mode", type=click.Choice(RESIZE_MODES), default=DEFAULT_RESIZE_MODE, show_default=True,
              help="stretch (as the seed report), letterbox (keep aspect, pad black) or center_crop.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Decode processes/threads [default: number of CPUs].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the train/validation split.")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Fraction of images held out for validation.")
@click.option("--strict", is_flag=True, help="Fail (exit 1) at the first bad row instead of skipping it.")
def prepare(root: pathlib.Path, out_dir: pathlib.Path, image_size: int, resize_mode: str, workers: int | None,
            seed: int, val_fraction: float, strict: bool) -> None:
    """Decode, resize and write the dataset in ROOT as a prepared dataset under --out."""
    from imat.data_tools.tfds_builder import prepare as prepare_dataset

    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give a Kaggle-layout dataset folder")
    path = prepare_dataset(root, out_dir, image_size=image_size, resize_mode=resize_mode, workers=workers,
                           seed=seed, val_fraction=val_fraction, strict=strict)
    click.echo(str(path))
