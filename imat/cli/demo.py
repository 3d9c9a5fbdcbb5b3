"""`imat demo`: the built-in default main job, end to end on synthetic data."""

from __future__ import annotations

import click

from imat.demo import DemoConfig

_D = DemoConfig()


@click.command("demo")
@click.option("--workdir", default=_D.workdir, show_default=True, help="Where every stage writes (reruns resume).")
@click.option("--arch", default=_D.arch, show_default=True, help="Model architecture.")
@click.option("--objective", default=_D.objective, show_default=True,
              help="Training objective (see `imat train --help`).")
@click.option("--steps", default=_D.steps, show_default=True, help="Training steps.")
@click.option("--images", "gallery_images", default=_D.gallery_images, show_default=True,
              help="Synthetic training/gallery images.")
@click.option("--image-size", default=_D.image_size, show_default=True, help="Training and model input size.")
@click.option("--seed", default=_D.seed, show_default=True)
def demo(workdir, arch, objective, steps, gallery_images, image_size, seed):
    """Synthesise data, prepare, train, export, index, search and evaluate (a few minutes on CPU)."""
    from imat.cli.engine import format_eval_table
    from imat.demo import run_demo

    result = run_demo(DemoConfig(workdir=workdir, arch=arch, objective=objective, steps=steps,
                                 gallery_images=gallery_images, image_size=image_size, seed=seed))
    click.echo("")
    click.echo(format_eval_table(result.metrics))
    click.echo("")
    click.echo("stage times (s): " + ", ".join(f"{k} {v}" for k, v in result.seconds.items()))
    for label, path in (
        ("EDA report", result.eda_report),
        ("training curves", result.curves),
        ("model", result.model),
        ("index", result.index),
        ("search results", result.results),
        ("evaluation", result.eval_json),
        ("HTML report", result.report),
    ):
        click.echo(f"{label + ':':<17} {path}")
