"""imat.train_jax.models.layers.Conv: the CPU-only "taps", "im2col" and "winograd" formulations of
a regular conv equal lax.conv (forward and gradients) and "auto" picks them by shape on the CPU
only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imat.errors import ConfigError
from imat.train_jax.models import create_model
from imat.train_jax.models.layers import (
    Conv,
    conv,
    conv_im2col,
    conv_taps,
    conv_winograd,
    cpu_conv_formulation,
    set_conv_impl,
    taps_is_faster,
)


def _lax(x, k, strides, padding):
    return jax.lax.conv_general_dilated(
        x, k, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )


def _taps(x, k, strides, padding):
    return conv_taps(x, k, strides, padding, precision="highest")


def _im2col(x, k, strides, padding):
    return conv_im2col(x, k, strides, padding, precision="highest")


FORMULATIONS = {"taps": _taps, "im2col": _im2col}


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


# (H, W, kernel, stride): odd/even sizes, the 2x2-output case, 1x1 kernels, stride 2 -> 2x2 and 1x1.
CASES = [
    (2, 2, 3, 1), (3, 3, 3, 1), (2, 3, 3, 1), (5, 4, 3, 1), (1, 1, 3, 1), (7, 7, 3, 2), (4, 4, 3, 2),
    (3, 3, 3, 2), (2, 2, 3, 2), (6, 5, 3, 2), (4, 4, 5, 1), (9, 9, 7, 2), (2, 2, 1, 1), (5, 5, 1, 2),
]


@pytest.mark.parametrize("formulation", sorted(FORMULATIONS))
@pytest.mark.parametrize("h,w,k,stride", CASES)
def test_formulation_equals_lax_forward_and_gradients(h, w, k, stride, formulation):
    impl = FORMULATIONS[formulation]
    rng = np.random.default_rng(h * 100 + w * 10 + k + stride)
    x = jnp.asarray(rng.standard_normal((3, h, w, 6)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, 6, 5)), jnp.float32)
    strides, padding = (stride, stride), ((k // 2, k // 2), (k // 2, k // 2))
    ref = _lax(x, kern, strides, padding)
    out = jax.jit(impl, static_argnums=(2, 3))(x, kern, strides, padding)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= 1e-5

    cot = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)

    def loss(f):
        return lambda x, k: jnp.sum(f(x, k, strides, padding) * cot)

    gx_ref, gk_ref = jax.grad(loss(_lax), argnums=(0, 1))(x, kern)
    gx, gk = jax.jit(jax.grad(loss(impl), argnums=(0, 1)))(x, kern)
    assert _rel(gx, gx_ref) <= 1e-5
    assert _rel(gk, gk_ref) <= 1e-5


# Float32 rounding of the Winograd transforms: F(4x4)'s coefficients (up to 8 and 1/24) round
# more than F(2x2)'s adds and halvings; both are compared with XLA's conv at HIGHEST precision.
WINOGRAD_TOLERANCE = {2: 1e-5, 4: 5e-5}


@pytest.mark.parametrize("tile", sorted(WINOGRAD_TOLERANCE))
@pytest.mark.parametrize(
    "b,h,w,cin,cout",
    [(1, 1, 1, 1, 1), (3, 2, 3, 6, 5), (2, 5, 4, 6, 5), (1, 7, 9, 3, 8), (2, 16, 16, 16, 32), (3, 17, 15, 8, 4),
     (2, 4, 4, 64, 48), (1, 6, 10, 5, 3)],
)
def test_winograd_equals_lax_forward_and_gradients(b, h, w, cin, cout, tile):
    """Winograd F(m x m, 3x3), m = 2 and 4: sizes that are not a multiple of the tile (padded to
    whole tiles, cropped), maps smaller than a tile, batch 1, one channel; forward, input and
    kernel gradients within float32 rounding."""
    rng = np.random.default_rng(b * 1000 + h * 100 + w * 10 + cin)
    x = jnp.asarray(rng.standard_normal((b, h, w, cin)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((3, 3, cin, cout)), jnp.float32)
    strides, padding = (1, 1), ((1, 1), (1, 1))
    tol = WINOGRAD_TOLERANCE[tile]
    ref = _lax(x, kern, strides, padding)
    out = jax.jit(conv_winograd, static_argnums=(2, 3))(x, kern, "highest", tile)
    assert out.shape == ref.shape
    assert _rel(out, ref) <= tol
    cot = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    gx_ref, gk_ref = jax.grad(lambda x, k: jnp.sum(_lax(x, k, strides, padding) * cot), argnums=(0, 1))(x, kern)
    gx, gk = jax.jit(jax.grad(lambda x, k: jnp.sum(conv_winograd(x, k, "highest", tile) * cot), argnums=(0, 1)))(x, kern)
    assert _rel(gx, gx_ref) <= tol
    assert _rel(gk, gk_ref) <= tol


def test_winograd_output_consumed_elementwise_keeps_gradients():
    """The conv's output used twice (in the loss and as its own cotangent path through a product
    with the input) must give the same gradients: the case where a fused output transform was
    recomputed per element (a performance bug, but the values must hold either way)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 6)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((3, 3, 6, 6)), jnp.float32)
    strides, padding = (1, 1), ((1, 1), (1, 1))
    ref = jax.grad(lambda x, k: jnp.sum(_lax(x, k, strides, padding) * x), argnums=(0, 1))(x, kern)
    got = jax.jit(jax.grad(lambda x, k: jnp.sum(conv_winograd(x, k, "highest") * x), argnums=(0, 1)))(x, kern)
    for g, r in zip(got, ref):
        assert _rel(g, r) <= WINOGRAD_TOLERANCE[4]


@pytest.mark.parametrize("formulation", sorted(FORMULATIONS))
def test_formulation_asymmetric_padding_and_strides(formulation):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 5, 4, 3)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    padding = ((0, 1), (2, 1))
    impl = FORMULATIONS[formulation]
    assert _rel(impl(x, kern, (2, 1), padding), _lax(x, kern, (2, 1), padding)) <= 1e-5


@pytest.mark.parametrize(
    "in_hw,k,stride,expected",
    [
        ((2, 2), 3, 1, True),    # ResNet18 layer4 at 64 px: 2x2 -> 2x2
        ((1, 1), 3, 1, True),
        ((2, 3), 3, 1, True),
        ((1, 4), 3, 1, True),
        ((4, 4), 3, 2, True),    # output 2x2: forward fine, its input gradient is slow
        ((2, 2), 3, 2, True),    # output 1x1
        ((4, 4), 5, 1, True),
        ((3, 3), 3, 1, False),   # ResNet18 layer4 at 96 px
        ((4, 4), 3, 1, False),
        ((6, 6), 3, 2, False),   # 6x6 -> 3x3
        ((8, 8), 3, 2, False),
        ((5, 5), 5, 1, False),
        ((2, 2), 1, 1, False),   # 1x1 convs are never slow
        ((4, 4), 1, 2, False),
    ],
)
def test_taps_rule(in_hw, k, stride, expected):
    p = k // 2
    assert taps_is_faster(in_hw, (k, k), (stride, stride), ((p, p), (p, p))) is expected


@pytest.mark.parametrize(
    "in_hw,k,stride,expected",
    [
        ((32, 32), 1, 1, "im2col"),  # every 1x1 conv: XLA:CPU's 1x1 gradients are 4-7x slower
        ((2, 2), 1, 1, "im2col"),
        ((32, 32), 1, 2, "im2col"),
        ((128, 128), 7, 2, "im2col"),  # the stem
        ((32, 32), 3, 2, "im2col"),
        ((32, 32), 3, 1, "winograd"),  # stride-1 3x3 on maps >= WINOGRAD_MIN_SIZE
        ((16, 17), 3, 1, "winograd"),
        ((8, 8), 3, 1, "winograd"),
        ((4, 4), 3, 1, "winograd"),
        ((3, 32), 3, 1, "im2col"),
        ((2, 2), 3, 1, "taps"),  # the tiny maps taps_is_faster names keep taps
        ((4, 4), 3, 2, "taps"),
    ],
)
def test_cpu_formulation_rule(in_hw, k, stride, expected):
    p = k // 2
    assert cpu_conv_formulation(in_hw, (k, k), (stride, stride), ((p, p), (p, p))) == expected


def _traced_ops(layer, x):
    return str(jax.make_jaxpr(lambda x: layer(x))(x))


def test_auto_dispatch_picks_taps_only_for_slow_shapes_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("the auto rule uses taps only on the CPU backend")
    layer = conv(8, 8, 3, 1, rngs=nnx.Rngs(0))
    assert isinstance(layer, Conv) and layer.impl == "auto"
    small = jnp.zeros((2, 2, 2, 8))
    big = jnp.zeros((2, 5, 5, 8))
    assert layer.uses_taps(small) and not layer.uses_taps(big)
    assert layer.formulation(big) == cpu_conv_formulation((5, 5), (3, 3), (1, 1), ((1, 1), (1, 1)))
    assert "conv_general_dilated" not in _traced_ops(layer, small)
    set_conv_impl(layer, "lax")
    assert "conv_general_dilated" in _traced_ops(layer, big)
    set_conv_impl(layer, "auto")
    strided = conv(8, 8, 3, 2, rngs=nnx.Rngs(0))
    assert strided.uses_taps(jnp.zeros((2, 4, 4, 8))) and not strided.uses_taps(jnp.zeros((2, 6, 6, 8)))
    wide = jnp.zeros((1, 16, 16, 8))
    assert layer.formulation(wide) == "winograd"
    assert "conv_general_dilated" not in _traced_ops(layer, wide)
    set_conv_impl(strided, "winograd")  # forced where it does not apply: the standard conv
    assert strided.formulation(wide) == "lax"
    set_conv_impl(strided, "auto")
    pointwise = conv(8, 8, 1, 1, rngs=nnx.Rngs(0))
    assert not pointwise.uses_taps(small) and pointwise.formulation(big) == "im2col"
    assert "conv_general_dilated" not in _traced_ops(pointwise, big)
    # Forced modes; both give the same values.
    set_conv_impl(layer, "lax")
    assert not layer.uses_taps(small)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 2, 2, 8)), jnp.float32)
    ref = layer(x)
    set_conv_impl(layer, "taps")
    assert layer.uses_taps(big)
    assert _rel(layer(x), ref) <= 1e-5


def test_auto_dispatch_keeps_lax_off_cpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    layer = conv(8, 8, 3, 1, rngs=nnx.Rngs(0))
    assert not layer.uses_taps(jnp.zeros((2, 2, 2, 8)))
    assert conv(8, 8, 1, 1, rngs=nnx.Rngs(0)).formulation(jnp.zeros((2, 8, 8, 8))) == "lax"


def test_conv_impl_validation_and_unchanged_state():
    with pytest.raises(ConfigError, match="impl"):
        Conv(4, 4, (3, 3), impl="fast", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="conv"):
        create_model("resnet_tiny", conv="fast", rngs=nnx.Rngs(0))
    # create_model(conv=...) (TrainConfig.conv) sets every regular conv's formulation.
    forced = create_model("resnet_tiny", conv="lax", rngs=nnx.Rngs(0))
    impls = {m.impl for _, m in nnx.iter_graph(forced) if isinstance(m, Conv)}
    assert impls == {"lax"}
    m = create_model("resnet_tiny", rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="impl"):
        set_conv_impl(m, "fast")
    keys = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert "stem_conv/kernel" in keys and "layers/3/0/conv1/kernel" in keys
    assert not any(k.endswith("bias") and "conv" in k for k in keys)


def test_resnet_tiny_same_outputs_with_taps_and_lax():
    # resnet_tiny at 32 px reaches 1x1 in layer4, so "auto" uses taps there on CPU.
    m = create_model("resnet_tiny", rngs=nnx.Rngs(0))
    m.eval()
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    set_conv_impl(m, "lax")
    ref = m(images)["logits"]
    set_conv_impl(m, "taps")
    out = m(images)["logits"]
    assert _rel(out, ref) <= 1e-4


@pytest.mark.parametrize("arch,size,batch,impl", [
    ("resnet_tiny", 32, 4, "auto"), ("mobilenet_v2", 64, 8, "auto"), ("resnet_tiny", 64, 2, "winograd"),
])
def test_train_gradients_equal_across_conv_formulations(arch, size, batch, impl):
    """The whole model in train mode (BatchNorm batch statistics): loss and every parameter
    gradient with the CPU "auto" formulations (or Winograd wherever it applies) equal the
    standard convolution's."""
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    grads = {}
    for variant in ("lax", impl):
        m = create_model(arch, rngs=nnx.Rngs(0), **({"width_mult": 0.25} if arch == "mobilenet_v2" else {}))
        set_conv_impl(m, variant)
        m.train()

        def loss(m):
            return jnp.mean(m(images)["logits"] ** 2)

        value, g = nnx.value_and_grad(loss)(m)
        grads[variant] = (float(value), {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(g, nnx.Param))})
    ref_value, ref = grads["lax"]
    value, g = grads[impl]
    # float32 sums in another order, amplified through a dozen BatchNorms: ~1e-5 on the loss,
    # <= 1e-3 of each gradient. Gradients that are 0 in exact arithmetic (a BN bias right before
    # another BN) are float noise either way, hence the floor relative to the largest gradient.
    assert value == pytest.approx(ref_value, rel=1e-4)
    assert g.keys() == ref.keys()
    floor = 1e-6 * max(np.linalg.norm(v) for v in ref.values())
    for k in ref:
        assert np.linalg.norm(g[k] - ref[k]) <= 1e-3 * np.linalg.norm(ref[k]) + floor, k


def test_max_pool_gradient_equals_select_and_scatter():
    """imat's CPU max-pool gradient sends each output's gradient to the first max of its window,
    exactly as XLA's select-and-scatter, also with ties (post-ReLU zeros) and odd sizes."""
    from imat.train_jax.models.layers import _max_pool_3x3_s2_cpu, _max_pool_3x3_s2_lax

    rng = np.random.default_rng(0)
    for shape in [(2, 8, 8, 3), (2, 7, 9, 4), (1, 2, 2, 2)]:
        x = jnp.asarray(np.maximum(rng.standard_normal(shape), 0).round(1), jnp.float32)  # many ties
        y_ref, vjp_ref = jax.vjp(_max_pool_3x3_s2_lax, x)
        y, vjp = jax.vjp(_max_pool_3x3_s2_cpu, x)
        assert np.array_equal(np.asarray(y), np.asarray(y_ref))
        dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        np.testing.assert_allclose(np.asarray(vjp(dy)[0]), np.asarray(vjp_ref(dy)[0]), rtol=1e-6, atol=1e-6)
