"""TrainConfig: seed-report defaults, JSON round trip, validation naming the bad option."""

from __future__ import annotations

import pytest

from imat.errors import ConfigError
from imat.train_jax.config import TrainConfig


def test_defaults_follow_the_seed_report():
    c = TrainConfig(data_dir="d")
    assert (c.optimizer, c.learning_rate, c.batch_size, c.image_size, c.objective) == ("adam", 5e-4, 32, 128, "bce")
    assert c.margin > 0 and c.mining == "semi_hard" and c.embedding_dim == 128 and c.seed == 0
    assert c.validate() is c


def test_json_round_trip(tmp_path):
    c = TrainConfig(data_dir="d", objective="rotation", steps=7, margin=0.3)
    (tmp_path / "c.json").write_text(c.to_json())
    back = TrainConfig.from_json(tmp_path / "c.json")
    assert back == c and back.rotation_head and c.to_dict()["rotation_head"] is True
    assert TrainConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize(
    "change, option",
    [
        ({"objective": "softmax"}, "--objective"),
        ({"objective": "triplet", "mining": "hardest"}, "--mining"),
        ({"objective": "triplet", "margin": -0.1}, "--margin"),
        ({"embedding_source": "embedding"}, "--embedding-source"),
        ({"lr_schedule": "step"}, "--lr-schedule"),
        ({"weight_decay": -1.0}, "--weight-decay"),
        ({"init_from": "/nonexistent/run"}, "--init-from"),
        ({"batch_size": 0}, "--batch-size"),
        ({"learning_rate": -1.0}, "--lr"),
        ({"epochs": None, "steps": None}, "--epochs/--steps"),
        ({"data_dir": ""}, "--data"),
        ({"init": "/nonexistent/w.safetensors"}, "--init"),
        ({"mixup": -0.2}, "--mixup"),
        ({"objective": "triplet", "mixup": 0.2}, "--mixup"),
        ({"objective": "rotation", "mixup": 0.2}, "--mixup"),
        ({"conv": "fast"}, "conv"),
    ],
)
def test_validation_names_the_option(change, option):
    with pytest.raises(ConfigError, match=option.replace("/", ".")):
        TrainConfig(**{"data_dir": "d", **change}).validate()


def test_unknown_json_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown option.*colour"):
        TrainConfig.from_dict({"data_dir": "d", "colour": 1})
