"""The ONNX graph builder, op by op, against float64 numpy loops and JAX's own rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from imat.export.graph import BATCH, BatchNormParams, GraphBuilder, fold_batchnorm, resolve_padding


def run(g: GraphBuilder, out: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    g.add_output(out, "y")
    model = g.build("t")
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["y"], feeds)[0]


def conv_loop(x, w_oihw, b, stride, pads, groups):
    """Direct float64 convolution, NCHW, pads (top, left, bottom, right)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w_oihw.shape
    pt, pl, pb, pr = pads
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr))
    xp[:, :, pt:pt + h, pl:pl + wd] = x
    oh = (h + pt + pb - kh) // stride + 1
    ow = (wd + pl + pr - kw) // stride + 1
    y = np.zeros((n, o, oh, ow))
    og = o // groups
    for oc in range(o):
        gi = oc // og
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, gi * cg:(gi + 1) * cg, i * stride:i * stride + kh, j * stride:j * stride + kw]
                y[:, oc, i, j] = np.sum(patch * w_oihw[oc], axis=(1, 2, 3)) + b[oc]
    return y


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("groups,stride,padding", [(1, 2, ((3, 3), (3, 3))), (6, 1, ((1, 1), (1, 1))), (2, 2, "SAME")])
def test_conv_with_batchnorm_matches_float64_loop(fold, groups, stride, padding):
    rng = np.random.default_rng(1)
    c_in, c_out, k = 6, 6, (7 if groups == 1 else 3)
    x = rng.normal(size=(2, c_in, 9, 10)).astype(np.float32)
    kernel = rng.normal(size=(k, k, c_in // groups, c_out)).astype(np.float32)
    bn = BatchNormParams(
        mean=rng.normal(size=c_out).astype(np.float32), var=rng.uniform(0.1, 2, c_out).astype(np.float32),
        scale=rng.normal(size=c_out).astype(np.float32), bias=rng.normal(size=c_out).astype(np.float32), epsilon=1e-5,
    )
    g = GraphBuilder(fold_bn=fold)
    xi = g.add_input("x", TensorProto.FLOAT, (BATCH, c_in, 9, 10))
    y = g.conv(xi, kernel, name="c", strides=stride, padding=padding, groups=groups, bn=bn)
    got = run(g, y, {"x": x})
    ops = [n.op_type for n in g.nodes]
    assert ("BatchNormalization" in ops) is (not fold)

    (pt, pb), (pl, pr) = resolve_padding(padding, (9, 10), (k, k), (stride, stride), (1, 1))
    ref = conv_loop(x.astype(np.float64), np.transpose(kernel, (3, 2, 0, 1)).astype(np.float64),
                    np.zeros(c_out), stride, (pt, pl, pb, pr), groups)
    mult = bn.scale.astype(np.float64) / np.sqrt(bn.var.astype(np.float64) + 1e-5)
    ref = (ref - bn.mean[None, :, None, None]) * mult[None, :, None, None] + bn.bias[None, :, None, None]
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5


def test_fold_batchnorm_keeps_conv_bias():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 1, 1))
    b = rng.normal(size=3)
    bn = BatchNormParams(mean=rng.normal(size=3), var=rng.uniform(0.5, 1, 3), scale=None, bias=None, epsilon=1e-3)
    wf, bf = fold_batchnorm(w, b, bn)
    x = rng.normal(size=2)
    direct = ((w[:, :, 0, 0] @ x + b) - bn.mean) / np.sqrt(bn.var + 1e-3)
    np.testing.assert_allclose(wf[:, :, 0, 0] @ x + bf, direct, rtol=1e-5)


@pytest.mark.parametrize("size,k,s", [(8, 3, 2), (9, 3, 2), (7, 7, 2), (10, 1, 2), (5, 3, 1)])
def test_same_padding_follows_lax(size, k, s):
    pads = resolve_padding("SAME", (size, size), (k, k), (s, s), (1, 1))
    assert list(pads) == [tuple(p) for p in jax.lax.padtype_to_pads((size, size), (k, k), (s, s), "SAME")]


def test_explicit_padding_forms():
    assert resolve_padding(1, (5, 5), (3, 3), (1, 1), (1, 1)) == ((1, 1), (1, 1))
    assert resolve_padding((1, 2), (5, 5), (3, 3), (1, 1), (1, 1)) == ((1, 1), (2, 2))
    assert resolve_padding(((0, 1), (2, 3)), (5, 5), (3, 3), (1, 1), (1, 1)) == ((0, 1), (2, 3))
    assert resolve_padding("VALID", (5, 5), (3, 3), (1, 1), (1, 1)) == ((0, 0), (0, 0))


@pytest.mark.parametrize("size", [8, 9])
def test_maxpool_padding_never_wins_like_reduce_window(size):
    from imat.train_jax.models.layers import max_pool_3x3_s2

    rng = np.random.default_rng(0)
    # All values negative: a zero-padded pool would return 0 at the borders.
    x = -rng.uniform(1, 2, size=(2, 4, size, size)).astype(np.float32)
    g = GraphBuilder()
    xi = g.add_input("x", TensorProto.FLOAT, (BATCH, 4, size, size))
    got = run(g, g.maxpool(xi), {"x": x})
    ref = np.asarray(max_pool_3x3_s2(jnp.asarray(x.transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    assert got.max() < 0


def test_l2_normalize_matches_model_rule_and_keeps_zero_rows():
    from imat.train_jax.models.heads import EMBED_EPSILON, l2_normalize

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16)).astype(np.float32) * np.array([[1], [1e-3], [1e3], [0]], np.float32)
    g = GraphBuilder()
    xi = g.add_input("x", TensorProto.FLOAT, (BATCH, 16))
    got = run(g, g.l2_normalize(xi, eps=EMBED_EPSILON, mode="add"), {"x": x})
    ref = np.asarray(l2_normalize(jnp.asarray(x)))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(got)) and np.all(got[3] == 0)
    np.testing.assert_allclose(np.linalg.norm(got[:3], axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("mode", ["max", "add_norm"])
def test_l2_normalize_other_modes(mode):
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    g = GraphBuilder()
    xi = g.add_input("x", TensorProto.FLOAT, (BATCH, 2))
    got = run(g, g.l2_normalize(xi, eps=1e-6, mode=mode), {"x": x})
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-5)


def test_relu6_dense_sigmoid_pool():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=5, size=(3, 4, 5, 5)).astype(np.float32)
    k = rng.normal(size=(4, 2)).astype(np.float32)
    b = rng.normal(size=2).astype(np.float32)
    g = GraphBuilder()
    xi = g.add_input("x", TensorProto.FLOAT, (BATCH, 4, 5, 5))
    y = g.sigmoid(g.dense(g.global_avg_pool(g.relu6(xi)), k, b, name="fc"))
    got = run(g, y, {"x": x})
    pooled = np.clip(x.astype(np.float64), 0, 6).mean(axis=(2, 3))
    # ORT's Sigmoid is a fast approximation: ~1e-7 absolute near saturation.
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-(pooled @ k + b))), rtol=1e-5, atol=1e-6)


def test_preprocess_matches_model_normalisation():
    from imat.constants import IMAGENET_MEAN, IMAGENET_STD
    from imat.train_jax.models.layers import normalize_images

    images = np.random.default_rng(0).integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
    g = GraphBuilder()
    xi = g.add_input("images", TensorProto.UINT8, (BATCH, 4, 5, 3))
    got = run(g, g.preprocess_uint8_nhwc(xi, IMAGENET_MEAN, IMAGENET_STD), {"images": images})
    ref = np.asarray(normalize_images(images)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_names_are_unique_and_fingerprint_tracks_weights():
    g = GraphBuilder()
    assert [g.unique("a"), g.unique("a"), g.unique("a")] == ["a", "a_1", "a_2"]
    assert g.scalar("six", 6.0) == g.scalar("six", 6.0)
    g1, g2 = GraphBuilder(), GraphBuilder()
    w = np.ones((2, 2), np.float32)
    g1.initializer("w", w)
    g2.initializer("w", w)
    assert g1.fingerprint() == g2.fingerprint()
    w2 = w.copy()
    w2[0, 0] = np.nextafter(np.float32(1), np.float32(2))
    g3 = GraphBuilder()
    g3.initializer("w", w2)
    assert g3.fingerprint() != g1.fingerprint()


def test_conv_rejects_kernel_that_does_not_fit():
    g = GraphBuilder()
    xi = g.add_input("x", TensorProto.FLOAT, (BATCH, 4, 5, 5))
    with pytest.raises(ValueError, match="does not fit"):
        g.conv(xi, np.zeros((3, 3, 3, 8), np.float32), name="bad")
