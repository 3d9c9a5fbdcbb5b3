"""Building blocks shared by the imat backbones: explicit-padding convs, BatchNorm, pooling,
the in-model ImageNet normalisation and the depthwise convolution with two formulations.

Every conv here is an ``nnx.Conv`` (or the ``DepthwiseConv`` subclass) with *explicit*
symmetric padding ``((k//2, k//2), (k//2, k//2))`` exactly as torchvision, never "SAME"
(XLA's SAME pads (0, 1) for an even input and stride 2, torchvision pads (1, 1)).
Conv kernels are HWIO (Flax); torchvision's OIHW maps by ``transpose(2, 3, 1, 0)``.

BatchNorm follows torchvision: epsilon 1e-5, momentum 0.1 in torch terms, which is
``momentum=0.9`` in Flax (``ra = 0.9 * ra + 0.1 * batch``). One difference that cannot be
removed without a custom BatchNorm: Flax updates the running variance with the biased batch
variance, torch with the unbiased one; it only matters during training.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from imat.constants import IMAGENET_MEAN, IMAGENET_STD
from imat.errors import ConfigError

logger = logging.getLogger(__name__)

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention; equals torch momentum=0.1
DEPTHWISE_MODES = ("auto", "grouped", "shifted")

# torchvision inits convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_depthwise(depthwise: str) -> str:
    """"auto" -> "shifted" on the CPU backend (XLA:CPU grouped convs are slow), else "grouped"."""
    if depthwise not in DEPTHWISE_MODES:
        raise ConfigError(f"depthwise={depthwise!r} is not one of {DEPTHWISE_MODES}; pick one of them")
    if depthwise == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "grouped"
    return depthwise


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs) -> nnx.Conv:
    """A bias-free kxk conv with torchvision's padding k//2 on every side."""
    p = kernel // 2
    return nnx.Conv(
        in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
        use_bias=False, kernel_init=conv_init, rngs=rngs,
    )


def batch_norm(features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torchvision's MaxPool2d(3, stride=2, padding=1): pads with -inf by (1, 1) on H and W."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 (or any numeric) NHWC -> float32 ``(x / 255 - mean) / std`` with ImageNet statistics."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (x - mean) / std


def global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


def depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise conv as kh*kw shifted multiply-adds; equal to the grouped conv.

    x: [B, H, W, C]; kernel: HWIO [kh, kw, 1, C] (the grouped conv's own parameter);
    symmetric zero padding ``padding`` and stride ``stride`` on H and W, as torchvision.
    XLA:CPU lowers ``feature_group_count=C`` to a slow generic loop; elementwise
    multiply-adds over strided slices vectorise well instead.
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = jax.lax.slice(
                xp, (0, i, j, 0), (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c), (1, stride, stride, 1)
            )
            term = patch * kernel[i, j, 0, :]
            out = term if out is None else out + term
    return out


class DepthwiseConv(nnx.Conv):
    """A depthwise kxk conv (``feature_group_count == channels``, kernel HWIO [k, k, 1, C], no bias).

    ``impl`` picks the formulation: "grouped" (``lax.conv_general_dilated`` with
    ``feature_group_count=C``, fast on GPU/TPU) or "shifted" (``depthwise_shifted``, fast on
    CPU). Both use the same ``kernel`` parameter, so checkpoints and export do not care.
    Padding is explicit ``k//2`` on every side (torchvision), stride is ``self.stride``.
    """

    def __init__(self, channels: int, kernel: int = 3, stride: int = 1, *, impl: str = "auto", rngs: nnx.Rngs):
        p = kernel // 2
        super().__init__(
            channels, channels, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
            feature_group_count=channels, use_bias=False, kernel_init=conv_init, rngs=rngs,
        )
        self.stride = stride
        self.pad = p
        self.impl = resolve_depthwise(impl)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl == "shifted":
            return depthwise_shifted(x, self.kernel[...], self.stride, self.pad)
        return super().__call__(x)


def set_depthwise(model: nnx.Module, depthwise: str) -> None:
    """Switch every DepthwiseConv of ``model`` to ``depthwise`` ("auto" | "grouped" | "shifted") in place."""
    impl = resolve_depthwise(depthwise)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, DepthwiseConv):
            module.impl = impl
