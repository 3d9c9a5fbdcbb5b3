"""`imat train`: train a model on a prepared dataset (a thin wrapper over train_and_evaluate).

Objective names and help come from the objective registry (``imat.train_jax.objectives``).
"""

from __future__ import annotations

import json
import logging
import os

import click

from imat.constants import DEFAULT_IMAGE_SIZE
from imat.train_jax.config import LR_SCHEDULES, TrainConfig
from imat.train_jax.objectives import EMBEDDING_SOURCES, get_objective, objective_names
from imat.train_jax.objectives.triplet import MINING

logger = logging.getLogger(__name__)
_D = TrainConfig()
_OBJECTIVES_HELP = "; ".join(f"{n}: {get_objective(n).help}" for n in objective_names())


@click.command("train")
@click.option("--objective", type=click.Choice(objective_names()), default=_D.objective, show_default=True,
              help=_OBJECTIVES_HELP)
@click.option("--arch", default=_D.arch, show_default=True, help="Model architecture (resnet18, resnet34, resnet50, mobilenet_v2, resnet_tiny).")
@click.option("--data", "data_dir", required=True, type=click.Path(file_okay=False),
              help="Prepared dataset folder (printed by `imat data prepare`).")
@click.option("--workdir", required=True, type=click.Path(file_okay=False),
              help="Run folder: config.json, metrics.jsonl, curves.png, checkpoints/. Rerun to resume.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help=f"Epochs to train (default {_D.epochs}).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Steps to train (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(min=1), default=_D.batch_size, show_default=True)
@click.option("--lr", "learning_rate", type=float, default=_D.learning_rate, show_default=True, help="Peak learning rate.")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=_D.lr_schedule, show_default=True,
              help="constant (the seed's Adam) or cosine decay after a short warm-up.")
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=_D.weight_decay, show_default=True,
              help="> 0: AdamW with this decoupled weight decay.")
@click.option("--image-size", type=click.IntRange(min=8), default=DEFAULT_IMAGE_SIZE, show_default=True,
              help="Must match the prepared dataset.")
@click.option("--seed", type=int, default=_D.seed, show_default=True)
@click.option("--init", type=click.Path(dir_okay=False), default=None,
              help="ImageNet weights (.safetensors, torchvision or timm names) to start the backbone from.")
@click.option("--init-from", type=click.Path(file_okay=False), default=None,
              help="Another run's folder: start from its latest checkpoint (backbone; heads whose shapes match; "
                   "fresh optimizer). E.g. rotation pre-training, then bce/triplet fine-tuning.")
@click.option("--freeze-backbone/--no-freeze-backbone", default=False, show_default=True,
              help="Train only the heads (a linear probe on a pre-trained backbone).")
@click.option("--embedding-source", type=click.Choice(EMBEDDING_SOURCES), default=None,
              help="Model output served as model.onnx's embedding (default: the objective's; must be one it trains).")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="Steps between evaluations (default: each epoch).")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help="Steps between checkpoints (default: each epoch).")
@click.option("--log-every", type=click.IntRange(min=1), default=_D.log_every, show_default=True)
@click.option("--mining", type=click.Choice(MINING), default=_D.mining, show_default=True,
              help="Triplet mining (triplet objective only).")
@click.option("--margin", type=float, default=_D.margin, show_default=True, help="Triplet margin (on squared distances of unit vectors).")
@click.option("--embedding-dim", type=click.IntRange(min=1), default=_D.embedding_dim, show_default=True)
@click.option("--width-mult", type=float, default=None, help="MobileNetV2 width multiplier (default 1.0).")
@click.option("--input-pool", type=click.IntRange(min=1), default=_D.input_pool, show_default=True,
              help="Average the input over NxN blocks inside the model: train and serve at 1/N the resolution's "
                   "cost from the same prepared data (e.g. 2: a 128 px dataset is seen at 64 px).")
@click.option("--keep-checkpoints", type=click.IntRange(min=1), default=_D.keep_checkpoints, show_default=True)
@click.option("--augment/--no-augment", default=False, show_default=True,
              help="Random resized crop (60-100%% of the area) + horizontal flip; no colour changes.")
@click.option("--ema", type=click.FloatRange(min=0.0, max=1.0, max_open=True), default=_D.ema, show_default=True,
              help="Keep an exponential moving average of the weights with this decay per step (e.g. 0.99); "
                   "validation, export and --init-from use the averaged weights. 0: off.")
@click.option("--mixup", type=click.FloatRange(min=0.0), default=_D.mixup, show_default=True,
              help="Beta(a, a) mixup of training photo pairs and their labels (classification objectives; 0: off). "
                   "Blends photos, keeps their colours.")
@click.option("--data-shards", type=click.IntRange(min=1), default=None,
              help="Shards the global batch is drawn from, a multiple of the processes (default: one per process; "
                   "a resumed run keeps its own, so it sees the same batches on another number of hosts).")
@click.option("--coordinator", default=None, metavar="HOST:PORT",
              help="Multi-host: process 0's address, the same on every host (or JAX_COORDINATOR_ADDRESS).")
@click.option("--num-processes", type=click.IntRange(min=1), default=None,
              help="Multi-host: how many processes join (or JAX_NUM_PROCESSES).")
@click.option("--process-id", type=click.IntRange(min=0), default=None,
              help="Multi-host: this process's index, 0 on the host that writes (or JAX_PROCESS_ID).")
def train(data_dir, workdir, epochs, steps, coordinator, num_processes, process_id, **options) -> None:
    """Train a model; prints the final validation metrics as JSON.

    Multi-host: run the same command on every host with --coordinator/--num-processes/--process-id
    (or the JAX_* variables); process 0 writes the run folder, the others write nothing.
    """
    from imat.train_jax.train import train_and_evaluate

    # The flags are the environment variables imat.train_jax.sharding reads.
    for name, value in (("JAX_COORDINATOR_ADDRESS", coordinator), ("JAX_NUM_PROCESSES", num_processes),
                        ("JAX_PROCESS_ID", process_id)):
        if value is not None:
            os.environ[name] = str(value)
    if epochs is None and steps is None:
        epochs = TrainConfig.epochs
    config = TrainConfig(data_dir=data_dir, epochs=epochs, steps=steps, **options)
    result = train_and_evaluate(config, workdir)
    click.echo(json.dumps({"step": result["step"], "workdir": result["workdir"], "val": result["val"]}, indent=2))
