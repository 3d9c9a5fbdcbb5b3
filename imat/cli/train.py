"""`imat train`: train a model on a prepared dataset (a thin wrapper over train_and_evaluate)."""

from __future__ import annotations

import json
import logging

import click

from imat.constants import DEFAULT_IMAGE_SIZE

logger = logging.getLogger(__name__)


@click.command("train")
@click.option("--objective", type=click.Choice(["bce", "triplet", "rotation"]), default="bce", show_default=True,
              help="bce: multi-label categories; triplet: metric learning; rotation: self-supervised.")
@click.option("--arch", default="resnet18", show_default=True, help="Model architecture (resnet18, resnet34, resnet50, mobilenet_v2, resnet_tiny).")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (printed by `imat data prepare`).")
@click.option("--workdir", required=True, type=click.Path(file_okay=False),
              help="Run folder: config.json, metrics.jsonl, curves.png, checkpoints/. Rerun to resume.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs to train (default 10).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps to train (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=5e-4, show_default=True, help="Adam learning rate.")
@click.option("--image-size", type=click.IntRange(min=8), default=DEFAULT_IMAGE_SIZE, show_default=True,
              help="Must match the prepared dataset.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--init", type=click.Path(dir_okay=False), default=None,
              help="ImageNet weights (.safetensors, torchvision layout) to start from.")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Steps between evaluations (default: each epoch).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Steps between checkpoints (default: each epoch).")
@click.option("--log-every", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--mining", type=click.Choice(["batch_hard", "semi_hard", "offline"]), default="semi_hard", show_default=True,
              help="Triplet mining (triplet objective only).")
@click.option("--margin", type=float, default=0.2, show_default=True, help="Triplet margin (on squared distances of unit vectors).")
@click.option("--embedding-dim", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--width-mult", type=float, default=None, help="MobileNetV2 width multiplier (default 1.0).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--augment/--no-augment", default=False, show_default=True, help="Random resized crop + flip + colour jitter.")
def train(data_dir, workdir, epochs, steps, **options) -> None:
    """Train a model; prints the final validation metrics as JSON."""
    from imat.train_jax.config import TrainConfig
    from imat.train_jax.train import train_and_evaluate

    if epochs is None and steps is None:
        epochs = TrainConfig.epochs
    config = TrainConfig(data_dir=data_dir, epochs=epochs, steps=steps, **options)
    result = train_and_evaluate(config, workdir)
    click.echo(json.dumps({"step": result["step"], "workdir": result["workdir"], "val": result["val"]}, indent=2))
