"""`imat embed`: a folder of images -> an embeddings folder (npy + parquet parts, JSON manifest), resumable.

A thin command over imat.engine.embed_run; `--ray` hands the parts to imat.scale (Ray Data),
imported only then, so the engine extra never needs Ray.
"""

from __future__ import annotations

import logging
import pathlib

import click

from imat.cli.engine import _engine, _note_folder_skips, _summarise_errors, common_batch, common_model, common_threads
from imat.errors import ConfigError

logger = logging.getLogger(__name__)


@click.command("embed")
@common_model
@click.option("--images", "images", required=True, type=click.Path(path_type=pathlib.Path),
              help="A folder of images, or a Kaggle folder (train.csv present: labels are stored).")
@click.option("--out", "out", required=True, type=click.Path(path_type=pathlib.Path),
              help="Embeddings folder to write (or to finish: a rerun skips the parts already complete).")
@click.option("--part-size", type=int, default=None,
              help="Images per part [default: 10000, or the folder's own when resuming].")
@common_batch
@common_threads
@click.option("--ray", "use_ray", is_flag=True, help="Run on Ray Data (a local Ray unless --ray-address).")
@click.option("--ray-address", default=None, metavar="ADDRESS",
              help="With --ray: the cluster to join (e.g. ray://head:10001 or auto); default a local Ray.")
@click.option("--actors", type=int, default=2, show_default=True,
              help="With --ray: model actors (one ONNX Runtime session each).")
@click.option("--cpus-per-actor", type=int, default=1, show_default=True,
              help="With --ray: CPUs each model actor holds (its ONNX Runtime threads).")
@click.option("--gpus-per-actor", type=float, default=0.0, show_default=True,
              help="With --ray: GPUs per model actor (> 0 runs the model on CUDA).")
def embed(model, images, out, part_size, batch_size, threads, use_ray, ray_address, actors, cpus_per_actor,
          gpus_per_actor):
    """Embed a folder of images into parts: embeddings/part-NNNNN.npy + metadata/part-NNNNN.parquet + manifest.json.

    A killed run loses at most the parts it was writing: run the same command again to finish.
    Build an index from the folder with `imat index --from-embeddings EMB_DIR --out INDEX_DIR`.
    """
    from imat.engine.embed_run import embed_to_dir, folder_inputs

    if not use_ray and (ray_address or gpus_per_actor):
        raise ConfigError("--ray-address and --gpus-per-actor apply to --ray; add --ray")
    engine = _engine(model, batch_size, threads)
    inputs = folder_inputs(engine, images)
    found = inputs.folder
    if found.problems:
        click.echo(found.problems, err=True)
    _note_folder_skips(found)
    backend, name = None, "local"
    if use_ray:
        from imat.scale.ray_embed import ray_backend

        backend = ray_backend(engine, address=ray_address, actors=actors, cpus_per_actor=cpus_per_actor,
                              gpus_per_actor=gpus_per_actor)
        name = f"ray, {actors} actor{'s' if actors != 1 else ''}"

    def say_what_was_found(writer) -> None:
        note = writer.resume_note()
        if note:
            click.echo(note, err=True)

    summary = embed_to_dir(engine, inputs, out, part_size=part_size, backend=backend, backend_name=name,
                           on_open=say_what_was_found)
    _summarise_errors([f"{path}: {why}" for path, why in summary.errors], "images")
    click.echo(summary.line())
