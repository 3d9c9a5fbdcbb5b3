"""Building blocks shared by the imat backbones: explicit-padding convs, BatchNorm, pooling,
the in-model ImageNet normalisation, and two convs with a CPU-only second formulation: the
regular ``Conv`` ("taps" for the small spatial sizes XLA:CPU handles badly) and ``DepthwiseConv``.

Every conv here is an ``nnx.Conv`` subclass (``Conv`` or ``DepthwiseConv``) with *explicit*
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
CONV_MODES = ("auto", "lax", "taps")

# torchvision inits convs with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def resolve_depthwise(depthwise: str) -> str:
    """"auto" -> "shifted" on the CPU backend (XLA:CPU grouped convs are slow), else "grouped"."""
    if depthwise not in DEPTHWISE_MODES:
        raise ConfigError(f"depthwise={depthwise!r} is not one of {DEPTHWISE_MODES}; pick one of them")
    if depthwise == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "grouped"
    return depthwise


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, rngs: nnx.Rngs) -> Conv:
    """A bias-free kxk conv with torchvision's padding k//2 on every side."""
    p = kernel // 2
    return Conv(
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


def normalize_images(images: jax.Array, pool: int = 1) -> jax.Array:
    """uint8 (or any numeric) NHWC -> float32 ``(x / 255 - mean) / std`` with ImageNet statistics,
    then (``pool`` > 1) averaged over pool x pool blocks: the network sees an image ``pool`` times
    smaller than its input, at that smaller image's cost, while the input (and the prepared data
    and the engine's decode) stays at full size: identical pixels everywhere."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = (x - mean) / std
    if pool > 1:
        b, h, w, c = x.shape
        x = x.reshape(b, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4))
    return x


def global_avg_pool(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=(1, 2))


def _conv_out_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - k) // stride + 1


def taps_is_faster(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides, padding) -> bool:
    """Whether XLA:CPU's conv (or its gradient) hits its slow path for these shapes.

    Measured (jax 0.10, XLA:CPU, batch 32, 64..512 channels): a kxk conv (k > 1) whose input
    *or* output is smaller than the kernel in H or W runs at 1-8 GFLOP/s instead of 70-190
    (e.g. 3x3 on a 2x2 map: 275 ms instead of ~5 ms; 5x5 on 4x4: 10 s), and so does its input
    gradient (a conv over the output-sized cotangent: a stride-2 3x3 conv 4x4 -> 2x2 is fast
    forward but 10x slower to differentiate). Sizes >= the kernel run at full speed, and there
    the taps formulation is no faster (up to 2x slower), so it is not used.
    """
    kh, kw = kernel_hw
    if kh == 1 and kw == 1:
        return False
    out_hw = tuple(_conv_out_size(n, k, s, p) for n, k, s, p in zip(in_hw, kernel_hw, strides, padding))
    return any(n < k for n, k in zip(in_hw, kernel_hw)) or any(n < k for n, k in zip(out_hw, kernel_hw))


def conv_taps(x: jax.Array, kernel: jax.Array, strides, padding, precision=None) -> jax.Array:
    """A regular conv as a sum over the kh*kw taps of (strided slice of the padded input) @ kernel tap.

    x: [B, H, W, Cin]; kernel: HWIO [kh, kw, Cin, Cout] (nnx.Conv's own parameter); ``strides``
    (sh, sw); ``padding`` ((top, bottom), (left, right)) zeros. Equal to
    ``lax.conv_general_dilated`` (NHWC/HWIO, no dilation, one group), forward and gradients.
    """
    kh, kw = kernel.shape[0], kernel.shape[1]
    sh, sw = strides
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho = _conv_out_size(h, kh, sh, padding[0])
    wo = _conv_out_size(w, kw, sw, padding[1])
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = jax.lax.slice(
                xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)
            )
            term = jnp.einsum("bhwc,cd->bhwd", patch, kernel[i, j], precision=precision)
            out = term if out is None else out + term
    return out


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


def _explicit_pairs(padding) -> tuple[tuple[int, int], ...] | None:
    """((top, bottom), (left, right)) from an explicit padding, else None (strings, ints)."""
    if isinstance(padding, str) or not isinstance(padding, (tuple, list)) or len(padding) != 2:
        return None
    try:
        return tuple((int(a), int(b)) for a, b in padding)
    except (TypeError, ValueError):
        return None


class Conv(nnx.Conv):
    """``nnx.Conv`` (same parameters, attributes and param paths) with a CPU-only "taps" formulation.

    ``impl``: "lax" always ``lax.conv_general_dilated``; "taps" always ``conv_taps`` (when the
    conv is a plain 2-D NHWC conv: one group, no dilation, explicit padding, no mask); "auto"
    (default) uses "taps" on the CPU backend only for the shapes ``taps_is_faster`` names, else
    "lax". The choice is static: made at trace time from shapes and ``jax.default_backend()``.
    """

    def __init__(self, *args, impl: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if impl not in CONV_MODES:
            raise ConfigError(f"conv impl={impl!r} is not one of {CONV_MODES}; pick one of them")
        self.impl = impl

    def _taps_padding(self, x: jax.Array):
        """The explicit padding when ``conv_taps`` can compute this call, else None."""
        if x.ndim != 4 or len(self.kernel_size) != 2 or self.feature_group_count != 1 or self.mask is not None:
            return None
        for d in (self.input_dilation, self.kernel_dilation):
            if d not in (None, 1) and tuple(d) != (1, 1):
                return None
        return _explicit_pairs(self.padding)

    def uses_taps(self, x: jax.Array) -> bool:
        if self.impl == "lax":
            return False
        padding = self._taps_padding(x)
        if padding is None:
            return False
        if self.impl == "taps":
            return True
        return jax.default_backend() == "cpu" and taps_is_faster(
            x.shape[1:3], tuple(self.kernel_size), self._strides(), padding
        )

    def _strides(self) -> tuple[int, int]:
        s = self.strides
        return (s, s) if isinstance(s, int) else tuple(s) if s is not None else (1, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.uses_taps(x):
            return super().__call__(x)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        y = conv_taps(x, kernel, self._strides(), _explicit_pairs(self.padding), self.precision)
        return y if bias is None else y + bias


def set_conv_impl(model: nnx.Module, impl: str) -> None:
    """Switch every ``Conv`` of ``model`` to ``impl`` ("auto" | "lax" | "taps") in place."""
    if impl not in CONV_MODES:
        raise ConfigError(f"conv impl={impl!r} is not one of {CONV_MODES}; pick one of them")
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Conv):
            module.impl = impl


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
