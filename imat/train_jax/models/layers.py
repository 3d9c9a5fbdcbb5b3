"""Building blocks shared by the imat backbones: explicit-padding convs, BatchNorm, pooling,
the in-model ImageNet normalisation, and two convs with CPU-only formulations: the regular
``Conv`` ("im2col", "taps" and "winograd", for the shapes whose XLA:CPU convolution, or its
gradient, is slow) and ``DepthwiseConv``. Every formulation uses the same parameters and computes the same
function (tests compare forward and gradients with ``lax.conv_general_dilated``).

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

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imat.constants import IMAGENET_MEAN, IMAGENET_STD
from imat.errors import ConfigError

logger = logging.getLogger(__name__)

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # Flax convention; equals torch momentum=0.1
DEPTHWISE_MODES = ("auto", "grouped", "shifted")
CONV_MODES = ("auto", "lax", "taps", "im2col", "winograd")
# Winograd output tile of "auto" on CPU, and the smallest H and W it is used on (resnet18 step,
# 128 px, batch 32, interleaved: im2col below 16 + F(2x2) from 16 23.2 images/s; F(4x4) from 16
# 26.8, from 8 28.4, from 4 29.9; F(2x2) from 4 27.5; benchmarks/RESULTS.md, issue 17).
WINOGRAD_TILE = 4
WINOGRAD_MIN_SIZE = 4
DEPTHWISE_GRAD_CHUNK = 2  # images per step of the depthwise kernel gradient's scan (_depthwise_kernel_grad)

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


def _max_pool_3x3_s2_lax(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def _pool_taps(xp: jax.Array, ho: int, wo: int):
    """The 9 stride-2 slices of the padded input, window position (i, j) in row-major order."""
    b, _, _, c = xp.shape
    for i in range(3):
        for j in range(3):
            yield i, j, jax.lax.slice(xp, (0, i, j, 0), (b, i + 2 * (ho - 1) + 1, j + 2 * (wo - 1) + 1, c), (1, 2, 2, 1))


@jax.custom_vjp
def _max_pool_3x3_s2_cpu(x: jax.Array) -> jax.Array:
    return _max_pool_3x3_s2_lax(x)


def _max_pool_fwd(x):
    y = _max_pool_3x3_s2_lax(x)
    return y, (x, y)


def _max_pool_bwd(residuals, dy):
    """Each output's gradient goes to the first input of its window (row-major) equal to the max,
    as select-and-scatter does: 9 masked, strided scatters written as interior-padded adds."""
    x, y = residuals
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    ho, wo = y.shape[1], y.shape[2]
    zero = jnp.zeros((), dy.dtype)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    for i, j, tap in _pool_taps(xp, ho, wo):
        first = (tap == y) & ~taken
        taken = taken | first
        high = ((0, 0, 0), (i, xp.shape[1] - i - 2 * (ho - 1) - 1, 1), (j, xp.shape[2] - j - 2 * (wo - 1) - 1, 1), (0, 0, 0))
        dxp = dxp + jax.lax.pad(jnp.where(first, dy, zero), zero, high)
    return (dxp[:, 1:-1, 1:-1, :],)


_max_pool_3x3_s2_cpu.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torchvision's MaxPool2d(3, stride=2, padding=1): pads with -inf by (1, 1) on H and W.

    On the CPU backend its gradient is imat's own (``_max_pool_bwd``): XLA:CPU lowers
    select-and-scatter to a variadic reduce-window over four index arrays, ~5x slower; the values
    and the gradient (to the first max of each window) are the same."""
    if jax.default_backend() == "cpu":
        return _max_pool_3x3_s2_cpu(x)
    return _max_pool_3x3_s2_lax(x)


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


def _im2col_patches(x: jax.Array, kh: int, kw: int, strides, padding) -> jax.Array:
    """[B, Ho, Wo, kh*kw*C]: the taps (strided slices of the zero-padded input), tap-major as HWIO."""
    sh, sw = strides
    b, h, w, c = x.shape
    ho = _conv_out_size(h, kh, sh, padding[0])
    wo = _conv_out_size(w, kw, sw, padding[1])
    if any(p for pair in padding for p in pair):
        x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    taps = [
        jax.lax.slice(x, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _lax_conv(x, kernel, strides, padding, precision):
    return jax.lax.conv_general_dilated(
        x, kernel, tuple(strides), tuple(tuple(p) for p in padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_im2col(x: jax.Array, kernel: jax.Array, strides, padding, precision=None) -> jax.Array:
    """A regular conv as one matrix product: the kh*kw taps (strided slices of the padded input)
    concatenated on the channel axis ([B*Ho*Wo, kh*kw*Cin], tap-major like HWIO) @ the kernel
    reshaped to [kh*kw*Cin, Cout]. A 1x1 conv is a (strided) slice and a product, no copy.

    Why: XLA:CPU computes a conv's kernel gradient (and, for 1x1 and strided convs, the input
    gradient) 2-7x slower than the forward conv. Here the kernel gradient is one product over the
    patch matrix the forward pass built (kept as the residual), and the input gradient is the
    product ``dy @ kernel^T`` folded back onto the input (col2im), except for stride-1 kxk convs,
    whose input gradient XLA computes fast itself. ``strides`` (sh, sw); ``padding`` ((top,
    bottom), (left, right)); same arguments and result as ``conv_taps`` and ``lax.conv``.
    """
    return _conv_im2col_fwd(x, kernel, strides, padding, precision)[0]


def _conv_im2col_fwd(x, kernel, strides, padding, precision):
    kh, kw, _, cout = kernel.shape
    patches = _im2col_patches(x, kh, kw, strides, padding)
    b, ho, wo, k = patches.shape
    out = jnp.dot(patches.reshape(b * ho * wo, k), kernel.reshape(k, cout), precision=precision)
    return out.reshape(b, ho, wo, cout), (patches, kernel, jnp.zeros((0,) + x.shape[1:], x.dtype))


def _conv_im2col_bwd(strides, padding, precision, residuals, dy):
    patches, kernel, x_like = residuals
    kh, kw, _, cout = kernel.shape
    b, ho, wo, k = patches.shape
    x_shape = (b,) + x_like.shape[1:]
    dy2 = dy.reshape(b * ho * wo, cout)
    dkernel = jax.lax.dot_general(patches.reshape(b * ho * wo, k), dy2, (((0,), (0,)), ((), ())), precision=precision)
    zeros = jnp.zeros(x_shape, dy.dtype)
    if kh * kw > 1 and tuple(strides) == (1, 1):
        _, vjp = jax.vjp(lambda x: _lax_conv(x, kernel, strides, padding, precision), zeros)
        (dx,) = vjp(dy)
    else:
        dpatches = jnp.dot(dy2, kernel.reshape(k, cout).T, precision=precision).reshape(b, ho, wo, k)
        _, vjp = jax.vjp(lambda x: _im2col_patches(x, kh, kw, strides, padding), zeros)
        (dx,) = vjp(dpatches)
    return dx, dkernel.reshape(kernel.shape)


conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


# Winograd F(m x m, 3x3) for output tile m: (B^T [n, n], G [n, 3], A^T [m, n]), n = m + 2 (Lavin &
# Gray 2016; interpolation points 0, +-1 for m = 2 and 0, +-1, +-2 for m = 4, plus infinity).
WINOGRAD_MATRICES = {
    2: (
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float32),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float32),
    ),
    4: (
        np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float32),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float32),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float32),
    ),
}
_EXACT = jax.lax.Precision.HIGHEST  # the transforms are f32 products on every backend


def _combine(matrix: np.ndarray, parts: list) -> list:
    """``matrix @ parts`` for a small constant matrix over a list of arrays, as adds (a +-1
    coefficient is an add or a subtract, zeros are skipped) so XLA fuses it into one pass."""
    out = []
    for row in matrix:
        acc = None
        for coef, part in zip(row.tolist(), parts):
            if coef == 0:
                continue
            term = part if coef in (1, -1) else part * coef
            if acc is None:
                acc = -term if coef == -1 else term
            else:
                acc = acc - term if coef == -1 else acc + term
        out.append(acc)
    return out


def winograd_applies(kernel_hw, strides, padding) -> bool:
    """Whether ``conv_winograd`` computes this conv: 3x3, stride 1, padding 1 on every side."""
    return tuple(kernel_hw) == (3, 3) and tuple(strides) == (1, 1) and \
        tuple(tuple(p) for p in padding) == ((1, 1), (1, 1))


def _winograd_input(x: jax.Array, tile: int) -> jax.Array:
    """[B, H, W, C] -> [n*n, B*tiles, C]: ``B^T d B`` of every n x n tile of the 1-padded input
    (tiles at stride ``tile``; sizes that are not a multiple are padded to whole tiles). Two
    passes: the row transform of all tile rows into one [n, B, tiles_h, W', C] array, then the
    column transform of all n of those at once, each from strided views of the one before.

    Why: with one column expression per tile row (36 outputs built as 6 x 6 small ones) the
    transform took ~9x a copy of its output; as one expression over all n rows, after an
    optimization barrier that keeps the rows as their own pass, it is 1.6-2.7x faster on every
    ResNet map at 128 px (batch 32, 32x32x64: 7.3-9.7 -> 3.6 ms; 4x4x512: 0.8 -> 0.5 ms, 0.7
    without the barrier; benchmarks/RESULTS.md, issue 17), same values bit for bit."""
    bt = WINOGRAD_MATRICES[tile][0]
    n = tile + 2
    b, h, w, c = x.shape
    nh, nw = -(-h // tile), -(-w // tile)
    xp = jnp.pad(x, ((0, 0), (1, tile * nh + tile - 1 - h), (1, tile * nw + tile - 1 - w), (0, 0)))
    # Tile t covers padded rows tile*t .. tile*t + n - 1: row k of it is row k % tile of block t + k // tile.
    r = xp.reshape(b, nh + 1, tile, tile * nw + tile, c)
    rows = jnp.stack(_combine(bt, [r[:, k // tile:nh + k // tile, k % tile] for k in range(n)]))
    q = jax.lax.optimization_barrier(rows).reshape(n, b, nh, nw + 1, tile, c)
    v = _combine(bt, [q[:, :, :, k // tile:nw + k // tile, k % tile] for k in range(n)])
    return jnp.stack(v, axis=1).reshape(n * n, b * nh * nw, c)


def _kron(matrix: np.ndarray) -> np.ndarray:
    """The 2-D transform ``M t M^T`` of a flattened tile as one matrix: ``kron(M, M)``."""
    return np.kron(matrix, matrix).astype(np.float32)


def _winograd_kernel(kernel: jax.Array, tile: int) -> jax.Array:
    """HWIO [3, 3, Cin, Cout] -> [n*n, Cin, Cout]: ``G g G^T`` as one product."""
    gg = _kron(WINOGRAD_MATRICES[tile][1])
    return jnp.dot(gg, kernel.reshape(9, -1), precision=_EXACT).reshape(gg.shape[0], *kernel.shape[2:])


def _winograd_kernel_transpose(du: jax.Array, tile: int) -> jax.Array:
    """[n*n, Cin, Cout] -> [3, 3, Cin, Cout]: the transpose of ``_winograd_kernel`` (``G^T du G``)."""
    gg = _kron(WINOGRAD_MATRICES[tile][1])
    return jnp.dot(gg.T, du.reshape(gg.shape[0], -1), precision=_EXACT).reshape(3, 3, *du.shape[1:])


def _winograd_output(m: jax.Array, tile: int, b: int, h: int, w: int) -> jax.Array:
    """[n*n, B*tiles, Cout] -> [B, H, W, Cout]: ``A^T m A`` (tile x tile outputs per tile), cropped.

    One product with ``kron(A^T, A^T)`` and a transpose: XLA cannot fuse a product into its
    consumers, whereas the same transform as adds was fused into whatever consumed the conv's
    output and recomputed there per output element (a 7x slower gradient, F(4x4) at 32x32)."""
    n = tile + 2
    nh, nw = -(-h // tile), -(-w // tile)
    cout = m.shape[-1]
    aa = _kron(WINOGRAD_MATRICES[tile][2])
    y = jnp.dot(aa, m.reshape(n * n, -1), precision=_EXACT).reshape(tile, tile, b, nh, nw, cout)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(b, tile * nh, tile * nw, cout)[:, :h, :w, :]


def _winograd_output_transpose(dy: jax.Array, tile: int) -> jax.Array:
    """[B, H, W, Cout] -> [n*n, B*tiles, Cout]: the transpose of ``_winograd_output`` (``A dy A^T``
    per output tile; output tiles do not overlap, so this is a transpose and one product)."""
    n = tile + 2
    b, h, w, cout = dy.shape
    nh, nw = -(-h // tile), -(-w // tile)
    d = jnp.pad(dy, ((0, 0), (0, tile * nh - h), (0, tile * nw - w), (0, 0)))
    d = d.reshape(b, nh, tile, nw, tile, cout).transpose(2, 4, 0, 1, 3, 5).reshape(tile * tile, -1)
    aa = _kron(WINOGRAD_MATRICES[tile][2])
    return jnp.dot(aa.T, d, precision=_EXACT).reshape(n * n, b * nh * nw, cout)


def _winograd_products(v: jax.Array, u: jax.Array, precision, transposed_kernel: bool = False) -> jax.Array:
    """The n*n independent products [B*tiles, Cin] @ [Cin, Cout] (``u[t]^T`` if ``transposed_kernel``)."""
    return jax.lax.dot_general(v, u, (((2,), (2 if transposed_kernel else 1,)), ((0,), (0,))), precision=precision)


def _winograd_conv(x, u, tile, precision, transposed_kernel=False):
    b, h, w, _ = x.shape
    return _winograd_output(_winograd_products(_winograd_input(x, tile), u, precision, transposed_kernel), tile, b, h, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_winograd(x: jax.Array, kernel: jax.Array, precision=None, tile: int = WINOGRAD_TILE) -> jax.Array:
    """A 3x3, stride-1, padding-1 conv by Winograd's minimal filtering F(m x m, 3x3), m = ``tile``
    (4 or 2).

    x: [B, H, W, Cin] (any H, W: sizes that are not a multiple of m are padded to whole tiles and
    cropped); kernel: HWIO [3, 3, Cin, Cout]. The padded input is cut into n x n tiles (n = m + 2)
    at stride m; each tile d becomes ``B^T d B``, the kernel ``G g G^T`` (n*n values per channel
    pair), and the conv is n*n independent products [B*tiles, Cin] @ [Cin, Cout] followed by
    ``A^T m A`` (m x m outputs per tile): n^2 / (9 m^2) of a direct conv's multiply-adds, 1/4 for
    F(4x4) and 1/2.25 for F(2x2), with transformed activations (n/m)^2 = 2.25x resp. 4x the
    activation. The gradient is written out (``_conv_winograd_bwd``), both parts in the Winograd
    domain too: the input gradient of a stride-1 "same" conv is the same conv of the output
    gradient with the kernel flipped and its channels swapped (autodiff would instead transpose
    the overlapping-tile input transform into one padded full-size add per tile position); the
    kernel gradient is ``G^T (V^T (A dy A^T)) G`` with the forward's transformed input V as
    residual. The transforms are exact up to float32 rounding; F(4x4)'s larger coefficients
    round a little more (relative error ~1e-5 at 512 channels, vs ~1e-6 for F(2x2); tests compare
    forward and gradients with ``lax.conv_general_dilated``).
    """
    return _winograd_conv(x, _winograd_kernel(kernel, tile), tile, precision)


def _conv_winograd_fwd(x, kernel, precision, tile):
    b, h, w, _ = x.shape
    v = _winograd_input(x, tile)
    y = _winograd_output(_winograd_products(v, _winograd_kernel(kernel, tile), precision), tile, b, h, w)
    return y, (v, kernel)


def _conv_winograd_bwd(precision, tile, residuals, dy):
    v, kernel = residuals
    dm = _winograd_output_transpose(dy, tile)
    du = jax.lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))), precision=precision)
    dkernel = _winograd_kernel_transpose(du, tile)
    # The flipped kernel's channel swap is folded into the products (contracting u's last axis):
    # a transposed kernel materialised per call was fused into the transform and cost 20x it.
    dx = _winograd_conv(dy, _winograd_kernel(kernel[::-1, ::-1], tile), tile, precision, transposed_kernel=True)
    return dx, dkernel


conv_winograd.defvjp(_conv_winograd_fwd, _conv_winograd_bwd)


def cpu_conv_formulation(in_hw: tuple[int, int], kernel_hw: tuple[int, int], strides, padding) -> str:
    """The fastest of "lax" | "taps" | "im2col" | "winograd" on XLA:CPU for a conv's forward *and*
    gradients.

    Measured (jax 0.10, 2-core Xeon, batch 32; benchmarks/train_speed.py): XLA:CPU computes a
    1x1 conv's gradients 4-7x slower than the same product, and the kernel gradient of a kxk conv
    2-5x slower than its forward conv; as im2col the three products of a step (forward, input and
    kernel gradient) share one patch matrix, and the whole ResNet train step is faster. Tiny maps
    (``taps_is_faster``) keep taps, whose per-tap products need no patch matrix. Stride-1 3x3
    convs on maps of at least ``WINOGRAD_MIN_SIZE`` use Winograd F(4x4, 3x3) (4x fewer
    multiply-adds than a direct conv; its transforms are passes over 2.25x the activation; per
    layer, forward + both gradients, it beat im2col and XLA's conv on every ResNet map from 32x32
    to 4x4, benchmarks/RESULTS.md).
    """
    if kernel_hw[0] * kernel_hw[1] > 1 and taps_is_faster(in_hw, kernel_hw, strides, padding):
        return "taps"
    if winograd_applies(kernel_hw, strides, padding) and min(in_hw) >= WINOGRAD_MIN_SIZE:
        return "winograd"
    return "im2col"


def _depthwise_taps_sum(xp: jax.Array, kernel: jax.Array, stride: int, ho: int, wo: int) -> jax.Array:
    """sum over taps (i, j) of (stride-``stride`` slice of the padded ``xp`` at (i, j)) * kernel[i, j, 0, :]."""
    kh, kw = kernel.shape[0], kernel.shape[1]
    b, c = xp.shape[0], xp.shape[3]
    out = None
    for i in range(kh):
        for j in range(kw):
            patch = jax.lax.slice(
                xp, (0, i, j, 0), (b, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c), (1, stride, stride, 1)
            )
            term = patch * kernel[i, j, 0, :]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_shifted(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """Depthwise conv as kh*kw shifted multiply-adds; equal to the grouped conv.

    x: [B, H, W, C]; kernel: HWIO [kh, kw, 1, C] (the grouped conv's own parameter);
    symmetric zero padding ``padding`` and stride ``stride`` on H and W, as torchvision.
    XLA:CPU lowers ``feature_group_count=C`` to a slow generic loop; elementwise
    multiply-adds over strided slices vectorise well instead. The gradient is written out
    (``_depthwise_bwd``) rather than left to autodiff, whose transposed slices become one
    padded full-size copy per tap: the input gradient is this same formulation applied to the
    (stride-dilated) output gradient with the flipped kernel, one fused pass.
    """
    return _depthwise_fwd(x, kernel, stride, padding)[0]


def _depthwise_fwd(x, kernel, stride, padding):
    kh, kw = kernel.shape[0], kernel.shape[1]
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    # The padded input is the residual: the kernel gradient reads it as it is.
    return _depthwise_taps_sum(xp, kernel, stride, ho, wo), (xp, kernel)


def _depthwise_kernel_grad(xp: jax.Array, dy: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """[kh*kw, C]: per tap, sum over batch and positions of (shifted padded input ``xp``) * dy.

    One variadic ``lax.reduce`` of the kh*kw tap products per chunk of ``DEPTHWISE_GRAD_CHUNK``
    images, accumulated in a ``lax.scan``. As kh*kw separate sums, XLA:CPU ran each tap as its
    own pass (a materialised shifted slice, then a multiply-reduce), streaming x and dy again per
    tap; the variadic reduce is one fused loop with kh*kw accumulators that reads each chunk once
    (per layer, mobilenet_v2's 128 px shapes, batch 32: 1.4-2.9x faster). The scan keeps each
    chunk in cache (the whole batch at once was 1.7-4.6x slower) and makes dy one materialised array:
    an unrolled loop over chunks let XLA fuse dy's producer (the BatchNorm and ReLU6 backward)
    into every chunk's reduce, and the step was no faster. The chunks are dynamic slices of the
    whole ``xp`` and ``dy``, not scanned-over reshapes: a reshaped ``xp`` made XLA recompute it
    (BatchNorm, ReLU6, pad) once more. Whole steps: benchmarks/RESULTS.md, issue 17."""
    b, c = xp.shape[0], xp.shape[3]
    ho, wo = dy.shape[1], dy.shape[2]
    chunk = math.gcd(b, DEPTHWISE_GRAD_CHUNK)
    dtype = jnp.result_type(xp, dy)

    def add_chunk(acc, index):
        xc = jax.lax.dynamic_slice_in_dim(xp, index * chunk, chunk, 0).astype(dtype)
        dc = jax.lax.dynamic_slice_in_dim(dy, index * chunk, chunk, 0).astype(dtype)
        products = [
            jax.lax.slice(xc, (0, i, j, 0), (chunk, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                          (1, stride, stride, 1)) * dc
            for i in range(kh) for j in range(kw)
        ]
        sums = jax.lax.reduce(products, [jnp.zeros((), dtype)] * len(products),
                              lambda a, b: [p + q for p, q in zip(a, b)], (0, 1, 2))
        return acc + jnp.stack(sums), None

    dkernel, _ = jax.lax.scan(add_chunk, jnp.zeros((kh * kw, c), dtype), jnp.arange(b // chunk))
    return dkernel


def _depthwise_bwd(stride, padding, residuals, dy):
    xp, kernel = residuals
    kh, kw = kernel.shape[0], kernel.shape[1]
    b, hp, wp, c = xp.shape
    h, w = hp - 2 * padding, wp - 2 * padding
    ho, wo = dy.shape[1], dy.shape[2]
    dkernel = _depthwise_kernel_grad(xp, dy, kh, kw, stride).reshape(kh, kw, 1, c)
    # d xp[m] = sum_i dyd[m - i] k[i], dyd = dy dilated by the stride: a stride-1 correlation of
    # dyd padded by k-1 (plus the rows the forward never reached) with the flipped kernel.
    zero = jnp.zeros((), dy.dtype)
    dyd = jax.lax.pad(dy, zero, (
        (0, 0, 0),
        (kh - 1, kh - 1 + hp - stride * (ho - 1) - kh, stride - 1),
        (kw - 1, kw - 1 + wp - stride * (wo - 1) - kw, stride - 1),
        (0, 0, 0),
    ))
    dxp = _depthwise_taps_sum(dyd, kernel[::-1, ::-1], 1, hp, wp)
    return dxp[:, padding:padding + h, padding:padding + w, :], dkernel.astype(kernel.dtype)


depthwise_shifted.defvjp(_depthwise_fwd, _depthwise_bwd)


def _explicit_pairs(padding) -> tuple[tuple[int, int], ...] | None:
    """((top, bottom), (left, right)) from an explicit padding, else None (strings, ints)."""
    if isinstance(padding, str) or not isinstance(padding, (tuple, list)) or len(padding) != 2:
        return None
    try:
        return tuple((int(a), int(b)) for a, b in padding)
    except (TypeError, ValueError):
        return None


class Conv(nnx.Conv):
    """``nnx.Conv`` (same parameters, attributes and param paths) with CPU-only formulations.

    ``impl``: "lax" always ``lax.conv_general_dilated``; "taps" always ``conv_taps``, "im2col"
    always ``conv_im2col`` (when the conv is a plain 2-D NHWC conv: one group, no dilation,
    explicit padding, no mask), "winograd" ``conv_winograd`` for 3x3 stride-1 padding-1 convs
    ("lax" for the others); "auto" (default) asks ``cpu_conv_formulation`` on the CPU
    backend and uses "lax" elsewhere (GPUs/TPUs have fast convolutions and their gradients).
    The choice is static: made at trace time from shapes and ``jax.default_backend()``.
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

    def formulation(self, x: jax.Array) -> str:
        """"lax" | "taps" | "im2col" | "winograd" for this call (static: from shapes, ``impl`` and the backend)."""
        if self.impl == "lax":
            return "lax"
        padding = self._taps_padding(x)
        if padding is None:
            return "lax"
        if self.impl == "winograd" and not winograd_applies(self.kernel_size, self._strides(), padding):
            return "lax"
        if self.impl != "auto":
            return self.impl
        if jax.default_backend() != "cpu":
            return "lax"
        return cpu_conv_formulation(x.shape[1:3], tuple(self.kernel_size), self._strides(), padding)

    def uses_taps(self, x: jax.Array) -> bool:
        return self.formulation(x) == "taps"

    def _strides(self) -> tuple[int, int]:
        s = self.strides
        return (s, s) if isinstance(s, int) else tuple(s) if s is not None else (1, 1)

    def __call__(self, x: jax.Array) -> jax.Array:
        formulation = self.formulation(x)
        if formulation == "lax":
            return super().__call__(x)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = self.promote_dtype((x, kernel, bias), dtype=self.dtype)
        if formulation == "winograd":
            y = conv_winograd(x, kernel, self.precision)
        else:
            fn = conv_taps if formulation == "taps" else conv_im2col
            y = fn(x, kernel, self._strides(), _explicit_pairs(self.padding), self.precision)
        return y if bias is None else y + bias


def set_conv_impl(model: nnx.Module, impl: str) -> None:
    """Switch every ``Conv`` of ``model`` to ``impl`` ("auto" | "lax" | "taps" | "im2col" |
    "winograd", the last where it applies and "lax" elsewhere) in place."""
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
