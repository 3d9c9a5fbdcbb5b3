"""The built-in main job: synthetic data -> prepare -> train -> export -> index -> search -> eval.

Each stage is the library call behind one CLI command and writes to its own
folder under the work dir, so the demo is just the stages composed (as the
CLI tour runs them one by one). A rerun skips finished stages: synthetic data
and the prepared dataset are reused, training resumes from its last checkpoint,
export/index/search/eval are redone (they take seconds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DemoConfig:
    """Sized to finish in a few minutes on 2 CPU cores while still learning something real."""

    workdir: str = "imat-demo"
    gallery_images: int = 400  # synthetic training set, also the search gallery
    query_images: int = 16  # separate synthetic photos used as queries
    eval_images: int = 150  # held-out synthetic set for leave-one-out evaluation
    seed: int = 0
    # ResNet18 at 64 px: 300 steps in about 2 minutes on 2 cores (imat's CPU conv formulation
    # avoids XLA:CPU's slow path on its 2x2 layer4 maps) and a clearly better index than MobileNetV2.
    arch: str = "resnet18"
    objective: str = "bce"
    image_size: int = 64
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    k: int = 10


@dataclasses.dataclass
class DemoResult:
    workdir: pathlib.Path
    model: pathlib.Path
    index: pathlib.Path
    results: pathlib.Path
    report: pathlib.Path
    eval_json: pathlib.Path
    eda_report: pathlib.Path
    curves: pathlib.Path
    metrics: dict
    train_metrics: dict
    seconds: dict


def _stage(name: str, seconds: dict):
    class _Timer:
        def __enter__(self):
            logger.info("demo: %s ...", name)
            self.t0 = time.perf_counter()

        def __exit__(self, *exc):
            seconds[name] = round(time.perf_counter() - self.t0, 1)
            if exc[0] is None:
                logger.info("demo: %s done in %.1f s", name, seconds[name])

    return _Timer()


def _synthetic(out: pathlib.Path, num_images: int, seed: int) -> pathlib.Path:
    from imat.data_tools.synthetic import write_synthetic

    if (out / "train.csv").is_file() and len(list((out / "train").glob("*.jpg"))) >= num_images:
        logger.info("demo: reusing synthetic data in %s", out)
        return out
    return write_synthetic(out, num_images=num_images, seed=seed)


def run_demo(config: DemoConfig) -> DemoResult:
    """Run every stage; returns where everything is and the evaluation metrics."""
    from imat.data_tools.eda import write_report
    from imat.data_tools.kaggle import read_kaggle
    from imat.data_tools.tfds_builder import prepare
    from imat.engine import Engine
    from imat.engine.gallery import folder_items, plain_folder_items
    from imat.engine.report import write_html_report
    from imat.fileio import atomic_write_text
    from imat.export.onnx_export import export_run
    from imat.train_jax.config import TrainConfig
    from imat.train_jax.train import train_and_evaluate

    work = pathlib.Path(config.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict = {}

    with _stage("synthesise data", seconds):
        gallery_root = _synthetic(work / "data" / "gallery", config.gallery_images, config.seed)
        query_root = _synthetic(work / "data" / "queries", config.query_images, config.seed + 1)
        eval_root = _synthetic(work / "data" / "eval", config.eval_images, config.seed + 2)

    with _stage("explore data", seconds):
        eda_report = write_report(read_kaggle(gallery_root), work / "eda")

    with _stage("prepare dataset", seconds):
        data_dir = prepare(gallery_root, work / "prepared", image_size=config.image_size, seed=config.seed)

    with _stage("train", seconds):
        train_config = TrainConfig(
            data_dir=str(data_dir),
            arch=config.arch,
            objective=config.objective,
            learning_rate=config.learning_rate,
            batch_size=config.batch_size,
            image_size=config.image_size,
            epochs=None,
            steps=config.steps,
            eval_every=max(1, config.steps // 3),
            checkpoint_every=max(1, config.steps // 3),
            log_every=max(1, config.steps // 15),
            seed=config.seed,
        )
        run_dir = work / "run"
        train_metrics = train_and_evaluate(train_config, run_dir)

    with _stage("export", seconds):
        model_path = export_run(run_dir, work / "model.onnx")

    engine = Engine(model_path)
    with _stage("index", seconds):
        gallery = folder_items(gallery_root)
        index_dir = work / "index"
        engine.build_index(gallery.items, index_dir, labels=gallery.labels, ids=gallery.ids)

    with _stage("search", seconds):
        queries = plain_folder_items(query_root / "train")
        records = engine.search(queries.items, k=config.k, index=index_dir)
        results_path = work / "results.jsonl"
        atomic_write_text(results_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        report_path = write_html_report(records, work / "report.html", title="imat demo: synthetic queries")

    with _stage("evaluate", seconds):
        metrics = engine.evaluate(eval_root, k=config.k)
        eval_json = work / "eval.json"
        atomic_write_text(eval_json, json.dumps(metrics, indent=2) + "\n")

    return DemoResult(
        workdir=work,
        model=model_path,
        index=index_dir,
        results=results_path,
        report=pathlib.Path(report_path),
        eval_json=eval_json,
        eda_report=pathlib.Path(eda_report),
        curves=run_dir / "curves.png",
        metrics=metrics,
        train_metrics=train_metrics,
        seconds=seconds,
    )
