"""MobileNetV2 (torchvision layout, ``width_mult`` with torchvision's ``_make_divisible``) in flax.nnx.

Module structure (walked by the ONNX exporter; torchvision key in brackets):

``MobileNetV2``
  - ``stem_conv``  nnx.Conv 3x3, stride 2, padding ((1,1),(1,1)), no bias          [features.0.0]
  - ``stem_bn``    nnx.BatchNorm, then ReLU6                                        [features.0.1]
  - ``features``   nnx.List of 17 ``InvertedResidual``; ``features[i]`` is [features.{i+1}]
  - ``head_conv``  nnx.Conv 1x1, stride 1, padding ((0,0),(0,0)), no bias          [features.18.0]
  - ``head_bn``    nnx.BatchNorm, then ReLU6                                        [features.18.1]
  - global average pool over H, W -> ``pooled`` [B, last_channel] (1280 at width 1.0)
  - ``dropout``    nnx.Dropout(0.2) (identity in eval mode)                         [classifier.0]
  - ``classifier`` nnx.Linear(last_channel, num_classes) -> ``logits``              [classifier.1]
  - ``embedding_head`` heads.EmbeddingHead (``.proj`` Linear on ``pooled``, then L2 normalisation)
  - ``rotation_head``  nnx.Linear(last_channel, 4) or None

``InvertedResidual`` fields: ``stride`` (1|2), ``expand_ratio`` (int), ``use_residual``
(bool: stride == 1 and in == out channels), and
  - ``expand_conv`` 1x1/1 pad 0 no bias, ``expand_bn``, ReLU6 — both None when expand_ratio == 1
  - ``dw_conv``  ``layers.DepthwiseConv`` (an nnx.Conv subclass, kernel [3,3,1,hidden],
                 feature_group_count=hidden, stride ``stride``, padding ((1,1),(1,1)), no bias),
                 ``dw_bn``, ReLU6
  - ``project_conv`` 1x1/1 pad 0 no bias, ``project_bn``, NO activation (linear bottleneck)
  - output = input + project_bn(...) when ``use_residual``
torchvision keys: expand_ratio != 1: conv.0.0/conv.0.1 (expand), conv.1.0/conv.1.1 (dw),
conv.2 (project conv), conv.3 (project bn); expand_ratio == 1: conv.0.0/conv.0.1 (dw),
conv.1 (project conv), conv.2 (project bn).

Every activation is ReLU6 (``min(max(x, 0), 6)``) except after the project BN (none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from imat.train_jax.models import heads
from imat.train_jax.models.layers import DepthwiseConv, batch_norm, conv, global_avg_pool, normalize_images

# torchvision's setting: expand ratio t, output channels c, repeats n, first stride s.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's ``_make_divisible``: round to the nearest multiple of divisor, never below 90% of v."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def relu6(x: jax.Array) -> jax.Array:
    return jnp.minimum(jnp.maximum(x, 0.0), 6.0)


class InvertedResidual(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, *, depthwise: str, rngs: nnx.Rngs):
        hidden = int(round(in_ch * expand_ratio))
        self.stride = stride
        self.expand_ratio = expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        if expand_ratio != 1:
            self.expand_conv = conv(in_ch, hidden, 1, 1, rngs=rngs)
            self.expand_bn = batch_norm(hidden, rngs=rngs)
        else:
            self.expand_conv = None
            self.expand_bn = None
        self.dw_conv = DepthwiseConv(hidden, 3, stride, impl=depthwise, rngs=rngs)
        self.dw_bn = batch_norm(hidden, rngs=rngs)
        self.project_conv = conv(hidden, out_ch, 1, 1, rngs=rngs)
        self.project_bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        if self.expand_conv is not None:
            y = relu6(self.expand_bn(self.expand_conv(y)))
        y = relu6(self.dw_bn(self.dw_conv(y)))
        y = self.project_bn(self.project_conv(y))
        return x + y if self.use_residual else y


class MobileNetV2(nnx.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        rotation_head: bool,
        width_mult: float = 1.0,
        depthwise: str = "auto",
        dropout: float = 0.2,
        rngs: nnx.Rngs,
        input_pool: int = 1,
    ):
        self.arch = "mobilenet_v2"
        self.width_mult = width_mult
        self.input_pool = int(input_pool)
        in_ch = make_divisible(32 * width_mult)
        last_channel = make_divisible(1280 * max(1.0, width_mult))
        self.stem_conv = conv(3, in_ch, 3, 2, rngs=rngs)
        self.stem_bn = batch_norm(in_ch, rngs=rngs)
        blocks = []
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out_ch = make_divisible(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t, depthwise=depthwise, rngs=rngs))
                in_ch = out_ch
        self.features = nnx.List(blocks)
        self.head_conv = conv(in_ch, last_channel, 1, 1, rngs=rngs)
        self.head_bn = batch_norm(last_channel, rngs=rngs)
        self.num_features = last_channel
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        # torchvision: classifier Linear weight ~ N(0, 0.01), bias 0.
        self.classifier = nnx.Linear(
            last_channel, num_classes, kernel_init=nnx.initializers.normal(0.01), rngs=rngs
        )
        self.embedding_head = heads.EmbeddingHead(last_channel, embedding_dim, rngs=rngs)
        self.rotation_head = heads.rotation_head(last_channel, rngs=rngs) if rotation_head else None

    def forward_features(self, images: jax.Array) -> jax.Array:
        """uint8 NHWC -> pooled features [B, last_channel]."""
        x = normalize_images(images, self.input_pool)
        x = relu6(self.stem_bn(self.stem_conv(x)))
        for blk in self.features:
            x = blk(x)
        x = relu6(self.head_bn(self.head_conv(x)))
        return global_avg_pool(x)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        pooled = self.forward_features(images)
        return heads.head_outputs(self, pooled, self.classifier(self.dropout(pooled)))
