"""A run's log: metrics.jsonl rows (train every ``log_every`` steps, val at each evaluation) and
curves.png, written by process 0, each to a temp file then renamed."""

from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any

from imat.fileio import atomic_write_text
from imat.train_jax.curves import plot_curves

logger = logging.getLogger(__name__)


def read_rows(path: pathlib.Path, up_to_step: float = math.inf) -> list[dict]:
    """metrics.jsonl rows with step <= up_to_step (later ones belong to a run that was interrupted);
    unreadable lines are skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", math.inf) <= up_to_step:
            rows.append(row)
    return rows


def _round(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}


class RunLog:
    """metrics.jsonl rows and curves.png of a run (written by process 0)."""

    def __init__(self, workdir: pathlib.Path, config, start_step: int, is_main: bool):
        self.path = workdir / "metrics.jsonl"
        self.curves = workdir / "curves.png"
        self.metrics = config.spec.curve_metrics
        self.is_main = is_main
        self.rows = read_rows(self.path, start_step)

    def add(self, row: dict) -> dict:
        row = _round(row)
        self.rows.append(row)
        return row

    def last(self, split: str) -> dict:
        return next((r for r in reversed(self.rows) if r["split"] == split), {})

    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.rows if r["split"] == "train" and "loss" in r]

    def write(self) -> None:
        if not self.is_main:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        try:
            plot_curves(self.rows, self.curves, self.metrics)
        except Exception as e:  # a plotting problem must not kill a training run
            logger.warning("could not draw curves.png: %s", e)
