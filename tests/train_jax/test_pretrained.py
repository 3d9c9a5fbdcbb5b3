"""imat.train_jax.pretrained: torchvision/timm state dicts -> flax models, checked against the
torchvision reference outputs in ../shared/reference/torchvision."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from imat.errors import ModelError
from imat.train_jax.models import create_model, set_depthwise
from imat.train_jax.pretrained import (
    load_torchvision_state_dict,
    model_to_torchvision_state_dict,
    timm_mobilenetv2_to_torchvision,
    torchvision_state_dict_shapes,
)


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@nnx.jit
def _forward(model, x):
    return model(x)


def _check_parity(model, expected, label):
    out = _forward(model, expected["images_uint8_nhwc"])
    errs = {k: _rel_err(out[k], expected[k]) for k in ("logits", "pooled")}
    print(f"parity {label}: logits rel err {errs['logits']:.3e}, pooled rel err {errs['pooled']:.3e}")
    assert errs["logits"] <= 1e-4 and errs["pooled"] <= 1e-4, errs
    return out


def test_resnet18_matches_torchvision(torchvision_ref):
    model = create_model("resnet18", num_classes=1000, pretrained=torchvision_ref / "resnet18_random.safetensors",
                         rngs=nnx.Rngs(0))
    model.eval()
    _check_parity(model, load_file(torchvision_ref / "resnet18_expected.safetensors"), "resnet18")


def test_mobilenet_v2_matches_torchvision_both_depthwise_formulations(torchvision_ref):
    model = create_model("mobilenet_v2", num_classes=1000, depthwise="grouped", rngs=nnx.Rngs(0))
    load_torchvision_state_dict(model, torchvision_ref / "mobilenet_v2_random.safetensors")
    model.eval()
    expected = load_file(torchvision_ref / "mobilenet_v2_expected.safetensors")
    grouped = _check_parity(model, expected, "mobilenet_v2 (grouped depthwise)")
    set_depthwise(model, "shifted")
    shifted = _check_parity(model, expected, "mobilenet_v2 (shifted depthwise)")
    for k in ("logits", "pooled", "embedding"):
        assert _rel_err(shifted[k], grouped[k]) <= 1e-5


def test_resnet50_mapping_is_complete(torchvision_ref):
    want = {k: tuple(v) for k, v in json.loads((torchvision_ref / "resnet50_state_dict_shapes.json").read_text()).items()}
    abstract = nnx.eval_shape(lambda: create_model("resnet50", num_classes=1000, rngs=nnx.Rngs(0)))
    assert torchvision_state_dict_shapes(abstract) == want
    # A random state dict of exactly those keys and shapes loads without error, into the right places.
    rng = np.random.default_rng(0)
    state = {k: (np.asarray(3, np.int64) if k.endswith("num_batches_tracked") else rng.standard_normal(s).astype(np.float32))
             for k, s in want.items()}
    model = create_model("resnet50", num_classes=1000, rngs=nnx.Rngs(0))
    load_torchvision_state_dict(model, state)
    np.testing.assert_array_equal(model.layers[3][2].conv3.kernel[...], state["layer4.2.conv3.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.layers[1][0].downsample.bn.var[...], state["layer2.0.downsample.1.running_var"])
    np.testing.assert_array_equal(model.layers[1][0].conv2.kernel.shape, (3, 3, 128, 128))  # v1.5: stride on the 3x3
    assert model.layers[1][0].stride == 2
    np.testing.assert_array_equal(model.fc.kernel[...], state["fc.weight"].T)


def _tiny_state(num_classes=46, seed=0):
    return model_to_torchvision_state_dict(create_model("resnet_tiny", num_classes=num_classes, rngs=nnx.Rngs(seed)))


def test_round_trip_reproduces_the_model(tmp_path):
    source = create_model("resnet_tiny", rngs=nnx.Rngs(3))
    path = tmp_path / "tiny.safetensors"
    save_file(model_to_torchvision_state_dict(source), str(path))
    loaded = create_model("resnet_tiny", pretrained=path, rngs=nnx.Rngs(4))
    backbone = lambda m: {k: v for k, v in nnx.to_flat_state(nnx.state(m))
                          if k[0] not in ("embedding_head", "rotation_head")}
    a, b = backbone(source), backbone(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k][...], b[k][...], err_msg=str(k))


@pytest.mark.parametrize(
    "mutate,key",
    [
        (lambda s: s.pop("layer2.0.bn1.running_var"), "layer2.0.bn1.running_var"),
        (lambda s: s.__setitem__("layer3.0.conv2.weight", np.zeros((32, 32, 5, 5), np.float32)), "layer3.0.conv2.weight"),
        (lambda s: s.__setitem__("layer9.0.conv1.weight", np.zeros((1,), np.float32)), "layer9.0.conv1.weight"),
        (lambda s: s.pop("layer1.0.conv1.weight"), "layer1.0.conv1.weight"),
    ],
    ids=["missing", "wrong-shape", "unexpected", "missing-conv"],
)
def test_bad_state_dicts_name_the_key_and_change_nothing(mutate, key):
    state = _tiny_state()
    mutate(state)
    model = create_model("resnet_tiny", rngs=nnx.Rngs(5))
    before = np.asarray(model.stem_conv.kernel[...]).copy()
    with pytest.raises(ModelError, match=key.replace(".", r"\.")):
        load_torchvision_state_dict(model, state)
    np.testing.assert_array_equal(model.stem_conv.kernel[...], before)  # validated before writing


def test_mismatched_classifier_is_skipped_and_fresh(caplog):
    state = _tiny_state(num_classes=1000)
    model = create_model("resnet_tiny", num_classes=46, rngs=nnx.Rngs(7))
    fresh_fc = np.asarray(model.fc.kernel[...]).copy()
    with caplog.at_level(logging.INFO, logger="imat.train_jax.pretrained"):
        load_torchvision_state_dict(model, state)
    assert "fc.weight" in caplog.text and "freshly initialised" in caplog.text
    np.testing.assert_array_equal(model.fc.kernel[...], fresh_fc)
    np.testing.assert_array_equal(model.stem_conv.kernel[...], state["conv1.weight"].transpose(2, 3, 1, 0))
    # A matching classifier is loaded.
    same = _tiny_state(num_classes=46, seed=1)
    load_torchvision_state_dict(model, same)
    np.testing.assert_array_equal(model.fc.kernel[...], same["fc.weight"].T)
    np.testing.assert_array_equal(model.fc.bias[...], same["fc.bias"])


def test_file_errors_name_the_path(tmp_path):
    model = create_model("resnet_tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ModelError, match="nope.safetensors"):
        load_torchvision_state_dict(model, tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="bad.safetensors"):
        load_torchvision_state_dict(model, bad)


def test_timm_mobilenetv2_names_map_to_torchvision():
    # Known timm mobilenetv2_100 names and their torchvision counterparts.
    pairs = {
        "conv_stem.weight": "features.0.0.weight",
        "bn1.running_mean": "features.0.1.running_mean",
        "blocks.0.0.conv_dw.weight": "features.1.conv.0.0.weight",
        "blocks.0.0.bn2.bias": "features.1.conv.2.bias",
        "blocks.0.0.conv_pw.weight": "features.1.conv.1.weight",
        "blocks.1.0.conv_pw.weight": "features.2.conv.0.0.weight",
        "blocks.1.1.conv_dw.weight": "features.3.conv.1.0.weight",
        "blocks.3.3.bn3.weight": "features.10.conv.3.weight",
        "blocks.6.0.conv_pwl.weight": "features.17.conv.2.weight",
        "conv_head.weight": "features.18.0.weight",
        "bn2.running_var": "features.18.1.running_var",
        "classifier.weight": "classifier.1.weight",
        "blocks.9.0.conv_pw.weight": "blocks.9.0.conv_pw.weight",  # unknown: kept, reported as unexpected
    }
    assert timm_mobilenetv2_to_torchvision({k: k for k in pairs}) == {v: k for k, v in pairs.items()}


def test_timm_mobilenetv2_state_dict_loads():
    model = nnx.eval_shape(lambda: create_model("mobilenet_v2", num_classes=10, rngs=nnx.Rngs(0)))
    tv_shapes = torchvision_state_dict_shapes(model, include_num_batches_tracked=False)
    # Every timm mobilenetv2_100 key (DepthwiseSeparable first block, InvertedResidual after).
    candidates = ["conv_stem.weight", "conv_head.weight", "classifier.weight", "classifier.bias"]
    bn = ("weight", "bias", "running_mean", "running_var")
    candidates += [f"bn{i}.{f}" for i in (1, 2) for f in bn]
    for s, n in enumerate((1, 2, 3, 4, 3, 3, 1)):
        for b in range(n):
            layers = ("conv_dw", "conv_pw") if s == 0 else ("conv_pw", "conv_dw", "conv_pwl")
            candidates += [f"blocks.{s}.{b}.{layer}.weight" for layer in layers]
            candidates += [f"blocks.{s}.{b}.bn{i}.{f}" for i in range(1, len(layers) + 1) for f in bn]
    to_tv = timm_mobilenetv2_to_torchvision({k: k for k in candidates})
    assert set(to_tv) == set(tv_shapes)  # a bijection onto the torchvision keys
    rng = np.random.default_rng(0)
    tv_state = {k: rng.standard_normal(s).astype(np.float32) for k, s in tv_shapes.items()}
    timm_state = {timm: tv_state[tv] for tv, timm in to_tv.items()}
    a = create_model("mobilenet_v2", num_classes=10, rngs=nnx.Rngs(0))
    b = create_model("mobilenet_v2", num_classes=10, rngs=nnx.Rngs(1))
    load_torchvision_state_dict(a, tv_state)
    load_torchvision_state_dict(b, timm_state)
    fa, fb = model_to_torchvision_state_dict(a), model_to_torchvision_state_dict(b)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    assert jax.tree.structure(fa) == jax.tree.structure(fb)
