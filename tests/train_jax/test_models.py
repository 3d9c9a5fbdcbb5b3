"""imat.train_jax.models: registry, output contract, BatchNorm modes, heads, depthwise formulations,
parameter counts (torchvision's numbers)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imat.errors import ConfigError
from imat.train_jax.models import MODELS, count_params, create_model, set_depthwise
from imat.train_jax.models.heads import l2_normalize
from imat.train_jax.models.layers import DepthwiseConv, depthwise_shifted, max_pool_3x3_s2
from imat.train_jax.models.mobilenet_v2 import make_divisible

FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "mobilenet_v2": 1280, "resnet_tiny": 64}


def _images(batch, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


@nnx.jit
def _forward(model, x):
    return model(x)


def test_every_registered_architecture_is_tested_and_unknown_names_are_clear():
    # FEATURES (the pooled width per architecture) is checked by the tests below: a new
    # architecture must say what it is.
    assert set(MODELS) == set(FEATURES)
    with pytest.raises(ConfigError, match="unknown model architecture 'vit'.*resnet18"):
        create_model("vit", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_output_shapes_every_size_and_batch(name):
    # Shapes only: trace without computing (the big models would be slow on CPU).
    def run(x, rotation):
        model = create_model(name, num_classes=7, embedding_dim=16, rotation_head=rotation, rngs=nnx.Rngs(0))
        model.eval()
        return model(x)

    for size in (64, 128):
        for batch in (1, 3):
            x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
            out = jax.eval_shape(lambda x: run(x, True), x)
            assert {k: v.shape for k, v in out.items()} == {
                "pooled": (batch, FEATURES[name]), "logits": (batch, 7), "embedding": (batch, 16),
                "rotation_logits": (batch, 4),
            }
            assert all(v.dtype == jnp.float32 for v in out.values())
    out = jax.eval_shape(lambda x: run(x, False), jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8))
    assert "rotation_logits" not in out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_forward_every_architecture(name):
    model = create_model(name, embedding_dim=32, rngs=nnx.Rngs(1))
    model.eval()
    out = _forward(model, _images(2, 64))
    assert out["pooled"].shape == (2, FEATURES[name]) and out["logits"].shape == (2, 46)
    for v in out.values():
        assert np.isfinite(np.asarray(v)).all()
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["embedding"]), axis=1), 1.0, rtol=1e-5)
    assert "rotation_logits" not in out
    # Different images give different embeddings (no constant output).
    assert np.abs(np.asarray(out["embedding"][0] - out["embedding"][1])).max() > 1e-4


def test_arch_and_config_are_json_able():
    model = nnx.eval_shape(lambda: create_model("mobilenet_v2", num_classes=5, embedding_dim=8, rotation_head=True,
                                                depthwise="grouped", width_mult=0.5, rngs=nnx.Rngs(0)))
    assert model.arch == "mobilenet_v2"
    assert json.loads(json.dumps(model.config)) == {
        "num_classes": 5, "embedding_dim": 8, "rotation_head": True, "depthwise": "grouped", "width_mult": 0.5,
    }
    rebuilt = nnx.eval_shape(lambda: create_model(model.arch, rngs=nnx.Rngs(0), **model.config))
    assert count_params(rebuilt, include_heads=True) == count_params(model, include_heads=True)


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="resnet99"):
        create_model("resnet99", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="depthwise"):
        create_model("resnet_tiny", depthwise="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="width_mult"):
        create_model("resnet_tiny", width_mult=0.5, rngs=nnx.Rngs(0))


def test_rotation_head_only_when_asked():
    x = _images(3, 32)
    with_rot = create_model("resnet_tiny", rotation_head=True, rngs=nnx.Rngs(0))
    without = create_model("resnet_tiny", rngs=nnx.Rngs(0))
    with_rot.eval(), without.eval()
    assert with_rot(x)["rotation_logits"].shape == (3, 4)
    assert "rotation_logits" not in without(x) and without.rotation_head is None
    assert count_params(with_rot, include_heads=True) == count_params(without, include_heads=True) + 64 * 4 + 4


def test_embedding_is_unit_norm_and_zero_safe():
    z = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1e-8, 0.0]])
    out = np.asarray(l2_normalize(z))
    np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
    assert np.isfinite(out).all() and (out[1] == 0).all()
    np.testing.assert_allclose(out[2], [1.0, 0.0], rtol=1e-5)
    grad = jax.grad(lambda z: l2_normalize(z).sum())(jnp.zeros((1, 4)))
    assert np.isfinite(np.asarray(grad)).all()


def test_batchnorm_train_vs_eval():
    model = create_model("resnet_tiny", rngs=nnx.Rngs(0))
    a, b, c = _images(1, 32, 1), _images(1, 32, 2), _images(1, 32, 3)
    mean0 = np.asarray(model.stem_bn.mean[...]).copy()

    # Train mode: the output for image a depends on its batch mates, and running stats move
    # by torch's momentum 0.1: new = 0.9 * old + 0.1 * batch_mean.
    model.train()
    xb = np.concatenate([a, b])
    conv_out = np.asarray(model.stem_conv(
        (jnp.asarray(xb, jnp.float32) / 255 - jnp.asarray([0.485, 0.456, 0.406])) / jnp.asarray([0.229, 0.224, 0.225])
    ), np.float64)
    out_ab = model(xb)["logits"][0]
    np.testing.assert_allclose(model.stem_bn.mean[...], 0.9 * mean0 + 0.1 * conv_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    out_ac = model(np.concatenate([a, c]))["logits"][0]
    assert np.abs(np.asarray(out_ab - out_ac)).max() > 1e-4

    # Eval mode: per-image outputs independent of the batch, running stats untouched.
    model.eval()
    stats = jax.tree.map(lambda v: np.asarray(v).copy(), nnx.state(model, nnx.BatchStat))
    e_ab = model(np.concatenate([a, b]))["logits"][0]
    e_ac = model(np.concatenate([a, c]))["logits"][0]
    np.testing.assert_allclose(e_ab, e_ac, rtol=1e-5, atol=1e-6)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, stats, after)
    assert model.stem_bn.epsilon == 1e-5 and model.stem_bn.momentum == 0.9


def test_dropout_only_in_train_mode():
    model = nnx.eval_shape(lambda: create_model("mobilenet_v2", width_mult=0.35, rngs=nnx.Rngs(0)))
    assert isinstance(model.dropout, nnx.Dropout) and model.dropout.rate == 0.2
    model = create_model("resnet_tiny", rngs=nnx.Rngs(0))  # cheap stand-in for the mode switch
    model.dropout = nnx.Dropout(0.2, rngs=nnx.Rngs(1))
    x = jnp.ones((4, 1000))
    model.train()
    y1, y2 = np.asarray(model.dropout(x)), np.asarray(model.dropout(x))
    assert set(np.unique(y1)) <= {0.0, 1.25} and (y1 == 0).any() and (y1 != y2).any()
    model.eval()
    np.testing.assert_array_equal(model.dropout(x), x)


def test_make_divisible_matches_torchvision():
    # Values of torchvision's _make_divisible (divisor 8).
    assert [make_divisible(v) for v in (32 * 0.5, 1280 * 1.4, 24 * 0.35, 16 * 0.75, 32 * 1.4, 3.0)] == [16, 1792, 8, 16, 48, 8]
    model = nnx.eval_shape(lambda: create_model("mobilenet_v2", width_mult=1.4, rngs=nnx.Rngs(0)))
    assert model.stem_conv.kernel.shape == (3, 3, 3, 48) and model.num_features == 1792


@pytest.mark.parametrize(
    "name,expected",
    [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032), ("mobilenet_v2", 3_504_872)],
)
def test_param_counts_equal_torchvision(name, expected):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=1000, embedding_dim=128, rotation_head=True,
                                                rngs=nnx.Rngs(0)))
    assert count_params(model) == expected
    feats = FEATURES[name]
    assert count_params(model, include_heads=True) == expected + feats * 128 + 128 + feats * 4 + 4


def _depthwise_loop64(x, kernel, stride, pad):
    """Slow float64 reference: explicit loops over output positions and taps."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = np.asarray(kernel, np.float64)
    kh, kw = k.shape[:2]
    ho = (x.shape[1] - kh) // stride + 1
    wo = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for i in range(ho):
        for j in range(wo):
            win = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j, :] = (win * k[:, :, 0, :]).sum(axis=(1, 2))
    return out


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("batch", [4, 5])  # the kernel gradient's scan: 2 chunks of 2 images, 5 of 1
def test_depthwise_formulations_are_equal(stride, size, batch):
    rngs = nnx.Rngs(0)
    grouped = DepthwiseConv(5, 3, stride, impl="grouped", rngs=rngs)
    shifted = DepthwiseConv(5, 3, stride, impl="shifted", rngs=rngs)
    shifted.kernel[...] = grouped.kernel[...]
    x = jax.random.normal(jax.random.key(size), (batch, size, size + 1, 5))
    ref = _depthwise_loop64(x, grouped.kernel[...], stride, 1)
    for out in (grouped(x), shifted(x), depthwise_shifted(x, grouped.kernel[...], stride, 1)):
        out = np.asarray(out)
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    # Training sees the same gradients (w.r.t. the shared kernel and the input) either way.
    r = jax.random.normal(jax.random.key(1), ref.shape)
    def grouped_conv(k, x):
        return jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=5)

    gk_s, gx_s = jax.grad(lambda k, x: jnp.sum(depthwise_shifted(x, k, stride, 1) * r), (0, 1))(grouped.kernel[...], x)
    gk_g, gx_g = jax.grad(lambda k, x: jnp.sum(grouped_conv(k, x) * r), (0, 1))(grouped.kernel[...], x)
    for a, b in ((gk_s, gk_g), (gx_s, gx_g)):
        assert np.abs(np.asarray(a - b)).max() / np.abs(np.asarray(b)).max() <= 1e-5


def test_depthwise_auto_and_switching():
    model = nnx.eval_shape(lambda: create_model("mobilenet_v2", width_mult=0.35, depthwise="auto", rngs=nnx.Rngs(0)))
    expected = "shifted" if jax.default_backend() == "cpu" else "grouped"
    assert model.features[0].dw_conv.impl == expected
    assert model.config["depthwise"] == "auto"
    set_depthwise(model, "grouped")
    assert all(blk.dw_conv.impl == "grouped" for blk in model.features)


def test_max_pool_pads_like_torchvision():
    # A 4x4 map with a large value at the last row/col: torch's pool (pad 1, -inf) gives 2x2
    # windows centred on even positions, so the corner value reaches output[1, 1] only.
    x = np.full((1, 4, 4, 1), -5.0, np.float32)
    x[0, 3, 3, 0] = 9.0
    out = np.asarray(max_pool_3x3_s2(jnp.asarray(x)))[0, :, :, 0]
    np.testing.assert_array_equal(out, [[-5.0, -5.0], [-5.0, 9.0]])
    x2 = np.full((1, 5, 5, 1), -1.0, np.float32)  # -inf padding never wins
    assert (np.asarray(max_pool_3x3_s2(jnp.asarray(x2))) == -1.0).all()
