"""imat.contract: one parser and one writer of model.onnx metadata, light to import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from imat import __version__, contract
from imat.contract import TensorSpec, check_graph, metadata_props, parse_metadata
from imat.errors import ConfigError, ModelError


def _props(**change) -> dict:
    props = {
        "imat_version": "0", "architecture": "a", "objective": "bce", "image_size": "32",
        "resize_mode": "stretch", "embedding_dim": "16", "category_names": json.dumps(["x", "y"]),
        "fingerprint": "ab", "outputs": json.dumps(["embedding", "probabilities"]),
    }
    props.update(change)
    return props


def test_importable_without_jax_or_onnx():
    code = ("import sys, imat.contract; bad = [m for m in ('jax', 'flax', 'onnx', 'onnxruntime', 'tensorflow') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_parse_decodes_every_kind():
    meta = parse_metadata(_props(model_config=json.dumps({"width": 8}), checkpoint_step="2", custom="raw"), "f.onnx")
    assert (meta.image_size, meta.embedding_dim, meta.category_names) == (32, 16, ("x", "y"))
    assert meta.outputs == ("embedding", "probabilities") and meta.has_probabilities
    assert meta.extra == {"model_config": {"width": 8}, "checkpoint_step": "2", "custom": "raw"}
    assert meta.path == "f.onnx"


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("image_size", "big", "f.onnx: metadata 'image_size' must be an integer"),
        ("embedding_dim", "0", "'embedding_dim' must be positive"),
        ("resize_mode", "squash", "'resize_mode' is 'squash'"),
        ("category_names", "[1, 2", "'category_names' is not valid JSON"),
        ("category_names", "[1, 2]", "'category_names' must be a JSON list of strings"),
        ("outputs", '["probabilities"]', "lacks 'embedding'"),
        ("fingerprint", "  ", "'fingerprint' is empty"),
        ("model_config", "[1]", "'model_config' must be a JSON object"),
    ],
)
def test_bad_metadata_values(key, value, message):
    with pytest.raises(ModelError, match=message):
        parse_metadata(_props(**{key: value}), "f.onnx")


def test_missing_required_keys_are_named():
    props = _props()
    del props["fingerprint"], props["image_size"]
    with pytest.raises(ModelError, match=r"f.onnx: not an imat model .*image_size, fingerprint"):
        parse_metadata(props, "f.onnx")


def test_writer_round_trips_and_keeps_the_encoding():
    props = metadata_props(
        architecture="resnet18", objective="bce", image_size=64, resize_mode="letterbox", embedding_dim=128,
        category_names=["shirt", "shoe"], fingerprint="f" * 64, outputs=["embedding", "probabilities"],
        embedding_source="embedding_head", model_config={"arch": "resnet18"}, extra={"source_run": "r", "n": 3},
    )
    assert all(isinstance(v, str) for v in props.values())
    # The encoding existing model.onnx files use: decimal ints, JSON lists, sorted-key JSON config.
    assert props["image_size"] == "64" and props["category_names"] == '["shirt", "shoe"]'
    assert props["model_config"] == '{"arch": "resnet18"}' and props["n"] == "3"
    meta = parse_metadata(props, "m.onnx")
    assert (meta.resize_mode, meta.embedding_source, meta.extra["source_run"]) == ("letterbox", "embedding_head", "r")
    assert set(contract.REQUIRED_KEYS) <= set(props)


def test_writer_refuses_reserved_extra_keys_and_bad_values():
    base = dict(architecture="a", objective="bce", image_size=32, resize_mode="stretch", embedding_dim=8,
                category_names=[], fingerprint="ab", outputs=["embedding"])
    with pytest.raises(ConfigError, match="'image_size' is reserved"):
        metadata_props(**base, extra={"image_size": "9"})
    with pytest.raises(ConfigError, match="'resize_mode' is 'squash'"):
        metadata_props(**{**base, "resize_mode": "squash"})


def _graph(h=32, w=32, d=16, c=2, probabilities=True):
    inputs = [TensorSpec("images", "tensor(uint8)", ("batch", h, w, 3))]
    outputs = [TensorSpec("embedding", "tensor(float)", ("batch", d))]
    if probabilities:
        outputs.append(TensorSpec("probabilities", "tensor(float)", ("batch", c)))
    return inputs, outputs


def test_graph_check_accepts_matching_and_dynamic_dims():
    meta = parse_metadata(_props(), "f.onnx")
    check_graph(meta, *_graph())
    check_graph(meta, *_graph(h="H", w=None, d="D", c=None))


@pytest.mark.parametrize(
    "graph,message",
    [
        (dict(h=48), "f.onnx: metadata 'image_size' is 32 but the graph input 'images' has height 48"),
        (dict(w=24), "'image_size' is 32 but the graph input 'images' has width 24"),
        (dict(d=8), "'embedding_dim' gives 16 but the graph output 'embedding' has last dimension 8"),
        (dict(c=46), "'category_names' gives 2 names but the graph output 'probabilities' has last dimension 46"),
        (dict(probabilities=False), "metadata lists 'probabilities' but the graph has no such output"),
    ],
)
def test_graph_check_names_the_key_and_both_values(graph, message):
    meta = parse_metadata(_props(), "f.onnx")
    with pytest.raises(ModelError, match=message):
        check_graph(meta, *_graph(**graph))


def test_writer_output_equals_what_the_exporter_wrote_before_the_contract():
    # Frozen: the metadata_props of a model exported before imat/contract.py existed (same order too).
    before = [
        ("imat_version", __version__), ("architecture", "resnet_tiny"), ("objective", "bce"),
        ("image_size", "32"), ("resize_mode", "stretch"), ("embedding_dim", "24"),
        ("category_names", '["shirt, blouse", "shoe"]'), ("fingerprint", "ab" * 32),
        ("outputs", '["embedding", "probabilities"]'), ("embedding_source", "embedding_head"),
        ("input", "images: uint8 [batch, height, width, 3] RGB, normalisation inside the graph"),
        ("model_config", '{"arch": "resnet_tiny", "embedding_dim": 24}'), ("source_run", "r"), ("checkpoint_step", "3"),
    ]
    props = metadata_props(
        architecture="resnet_tiny", objective="bce", image_size=32, resize_mode="stretch", embedding_dim=24,
        category_names=["shirt, blouse", "shoe"], fingerprint="ab" * 32, outputs=["embedding", "probabilities"],
        embedding_source="embedding_head", model_config={"embedding_dim": 24, "arch": "resnet_tiny"},
        extra={"source_run": "r", "checkpoint_step": "3"},
    )
    assert list(props.items()) == before
    assert parse_metadata(dict(before), "old.onnx").embedding_dim == 24
