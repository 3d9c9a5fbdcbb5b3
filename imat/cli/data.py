"""`imat data ...`: check, synthesise, explore and prepare dataset folders (Kaggle-layout or image-level).

Each subcommand is a thin call into imat.data_tools; the heavier modules (eda, tfds_builder,
synthetic) are imported inside the command so `imat data --help` stays fast and never loads the
training stack.
"""

from __future__ import annotations

import json
import logging
import pathlib

import click

from imat.constants import DEFAULT_IMAGE_SIZE, DEFAULT_RESIZE_MODE, RESIZE_MODES
from imat.errors import DataError

logger = logging.getLogger(__name__)

_ROOT = click.Path(file_okay=False, path_type=pathlib.Path)


@click.group("data")
def data() -> None:
    """Synthesise, check, explore and prepare dataset folders.

    A dataset folder is either Kaggle-layout (iMaterialist Fashion 2020):
    train.csv (ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds),
    label_descriptions.json and train/<ImageId>.jpg; or image-level:
    labels.csv (ImageId,ClassIds; category ids 0..45, space-separated, may
    be empty) and images/<ImageId>.jpg.
    """


@data.command("check")
@click.argument("root", type=_ROOT)
@click.option("--strict", is_flag=True, help="Fail (exit 1) at the first bad row instead of skipping it.")
@click.option("--no-images", is_flag=True,
              help="Do not check the image of each row (that it exists and, for train.csv, its size).")
def check(root: pathlib.Path, strict: bool, no_images: bool) -> None:
    """Read ROOT (Kaggle-layout or image-level) and report rows/images read and dropped, by reason."""
    from imat.data_tools.sources import read_source

    ds = read_source(root, strict=strict, check_images=not no_images)
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
    """Statistics and plots of the dataset in ROOT (either kind), written as an HTML report to --out."""
    from imat.data_tools import eda
    from imat.data_tools.sources import read_source

    ds = read_source(root, strict=strict)
    path = eda.write_report(ds, out_dir)
    click.echo(eda.format_summary(json.loads((out_dir / "stats.json").read_text())))
    if not eda.has_masks(ds):
        click.echo("note: image-level source (no masks, no attributes): attribute and mask-example plots "
                   "left out of the report")
    click.echo(f"report: {path}")


@data.command("prepare")
@click.argument("sources", nargs=-1, required=True, type=_ROOT)
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
@click.option("--garments", is_flag=True,
              help="One example per garment (its mask's box plus context, cropped and resized), split by photo.")
@click.option("--crop-padding", type=click.FloatRange(0.0, 2.0), default=None,
              help="With --garments: context around each box, as a fraction of its width/height [default: 0.1].")
@click.option("--min-mask-area", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help="With --garments: skip masks below this fraction of the photo [default: 0.001].")
@click.option("--keep-parts", is_flag=True,
              help="With --garments: keep garment parts (sleeve, neckline, zipper, ...), left out by default.")
def prepare(sources: tuple[pathlib.Path, ...], out_dir: pathlib.Path, image_size: int, resize_mode: str,
            workers: int | None, seed: int, val_fraction: float, strict: bool, garments: bool = False,
            crop_padding: float | None = None, min_mask_area: float | None = None, keep_parts: bool = False) -> None:
    """Decode, resize and write SOURCES as one prepared dataset under --out.

    Each source is a Kaggle-layout or an image-level folder; several are merged (an ImageId in two
    sources is an error). Labelled photos are split into train/validation by id; photos without
    labels go to an "unlabelled" split, for self-supervised training.
    """
    from imat.data_tools.tfds_builder import prepare as prepare_dataset

    for root in sources:
        if not root.is_dir():
            raise DataError(f"{root}: not a folder; give Kaggle-layout (train.csv) or image-level "
                            "(labels.csv) dataset folders")
    garment_options = None
    if garments:
        from imat.data_tools.garments import GarmentOptions

        defaults = GarmentOptions()
        garment_options = GarmentOptions(
            padding=defaults.padding if crop_padding is None else crop_padding,
            min_area_fraction=defaults.min_area_fraction if min_mask_area is None else min_mask_area,
            keep_parts=keep_parts)
    elif crop_padding is not None or min_mask_area is not None or keep_parts:
        from imat.errors import ConfigError

        raise ConfigError("--crop-padding, --min-mask-area and --keep-parts apply to garments; add --garments")
    path = prepare_dataset(list(sources), out_dir, image_size=image_size, resize_mode=resize_mode,
                           workers=workers, seed=seed, val_fraction=val_fraction, strict=strict,
                           garments=garments, garment_options=garment_options)
    click.echo(str(path))
