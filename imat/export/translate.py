"""Model -> ONNX graph: walks an imat nnx model's modules and emits the same computation.

One function per architecture family, reading the module attributes documented in
``imat/train_jax/models/resnet.py`` and ``mobilenet_v2.py``. Parameters are read from the
model as numpy arrays; nothing is traced, so every padding, stride and epsilon comes from
the module itself (and a model whose layers we do not recognise fails loudly here).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from flax import nnx
from onnx import TensorProto

from imat.constants import IMAGENET_MEAN, IMAGENET_STD
from imat.errors import ModelError
from imat.export.graph import BATCH, BatchNormParams, GraphBuilder

logger = logging.getLogger(__name__)

INPUT_NAME = "images"


@dataclasses.dataclass(frozen=True)
class Tensors:
    """Names of the graph tensors every imat model produces (before choosing outputs)."""

    pooled: str
    logits: str | None
    embedding: str  # the embedding head's L2-normalised output


def _array(variable) -> np.ndarray:
    return np.asarray(variable.get_value())


def _bn(module: nnx.BatchNorm) -> BatchNormParams:
    return BatchNormParams(
        mean=_array(module.mean),
        var=_array(module.var),
        scale=_array(module.scale) if module.scale is not None else None,
        bias=_array(module.bias) if module.bias is not None else None,
        epsilon=float(module.epsilon),
    )


def conv_bn(g: GraphBuilder, x: str, conv: nnx.Conv, bn: nnx.BatchNorm | None, *, name: str) -> str:
    """One nnx.Conv (any subclass, e.g. DepthwiseConv: same parameters) plus its BatchNorm."""
    if any(d != 1 for d in np.atleast_1d(conv.input_dilation or 1)):
        raise ModelError(f"{name}: input dilation is not supported by the ONNX exporter")
    if getattr(conv, "mask", None) is not None:
        raise ModelError(f"{name}: masked convs are not supported by the ONNX exporter")
    kernel = _array(conv.kernel)
    if kernel.ndim != 4:
        raise ModelError(f"{name}: expected a 2-D conv kernel (kh, kw, in, out), got shape {kernel.shape}")
    bias = _array(conv.bias) if conv.bias is not None else None
    return g.conv(
        x, kernel, name=name, bias=bias, strides=conv.strides, padding=conv.padding,
        dilations=conv.kernel_dilation, groups=int(conv.feature_group_count),
        bn=_bn(bn) if bn is not None else None,
    )


def _linear(g: GraphBuilder, x: str, lin: nnx.Linear, *, name: str) -> str:
    return g.dense(x, _array(lin.kernel), _array(lin.bias) if lin.bias is not None else None, name=name)


def _resnet_features(g: GraphBuilder, model, x: str) -> str:
    from imat.train_jax.models.resnet import BasicBlock, Bottleneck

    x = g.relu(conv_bn(g, x, model.stem_conv, model.stem_bn, name="conv1"), name="conv1.relu")
    x = g.maxpool(x, name="maxpool", kernel=3, strides=2, padding=((1, 1), (1, 1)))
    for i, stage in enumerate(model.layers):
        for j, blk in enumerate(stage):
            p = f"layer{i + 1}.{j}"
            if blk.downsample is not None:
                identity = conv_bn(g, x, blk.downsample.conv, blk.downsample.bn, name=f"{p}.downsample")
            else:
                identity = x
            if isinstance(blk, BasicBlock):
                y = g.relu(conv_bn(g, x, blk.conv1, blk.bn1, name=f"{p}.conv1"), name=f"{p}.relu1")
                y = conv_bn(g, y, blk.conv2, blk.bn2, name=f"{p}.conv2")
            elif isinstance(blk, Bottleneck):
                y = g.relu(conv_bn(g, x, blk.conv1, blk.bn1, name=f"{p}.conv1"), name=f"{p}.relu1")
                y = g.relu(conv_bn(g, y, blk.conv2, blk.bn2, name=f"{p}.conv2"), name=f"{p}.relu2")
                y = conv_bn(g, y, blk.conv3, blk.bn3, name=f"{p}.conv3")
            else:
                raise ModelError(f"{p}: unknown ResNet block type {type(blk).__name__}")
            x = g.relu(g.add(y, identity, name=f"{p}.add"), name=f"{p}.relu")
    return g.global_avg_pool(x, name="avgpool")


def _mobilenet_v2_features(g: GraphBuilder, model, x: str) -> str:
    x = g.relu6(conv_bn(g, x, model.stem_conv, model.stem_bn, name="features.0"), name="features.0.relu6")
    for i, blk in enumerate(model.features):
        p = f"features.{i + 1}"
        y = x
        if blk.expand_conv is not None:
            y = g.relu6(conv_bn(g, y, blk.expand_conv, blk.expand_bn, name=f"{p}.expand"), name=f"{p}.expand.relu6")
        # DepthwiseConv may compute a "shifted" formulation in JAX; its parameters are those of the
        # grouped conv (kernel [3, 3, 1, C], feature_group_count=C), which ONNX runs natively.
        y = g.relu6(conv_bn(g, y, blk.dw_conv, blk.dw_bn, name=f"{p}.dw"), name=f"{p}.dw.relu6")
        y = conv_bn(g, y, blk.project_conv, blk.project_bn, name=f"{p}.project")
        x = g.add(x, y, name=f"{p}.add") if blk.use_residual else y
    x = g.relu6(conv_bn(g, x, model.head_conv, model.head_bn, name="features.18"), name="features.18.relu6")
    # Dropout is the identity in eval mode.
    return g.global_avg_pool(x, name="avgpool")


def build_backbone(g: GraphBuilder, model, image_size: int) -> Tensors:
    """Input `images` (uint8 [batch, S, S, 3]) -> pooled, logits, embedding tensors in g."""
    from imat.train_jax.models import MobileNetV2, ResNet
    from imat.train_jax.models.heads import EmbeddingHead

    images = g.add_input(INPUT_NAME, TensorProto.UINT8, (BATCH, image_size, image_size, 3))
    x = g.preprocess_uint8_nhwc(images, IMAGENET_MEAN, IMAGENET_STD)
    pool = int(getattr(model, "input_pool", 1))
    if pool > 1:
        x = g.avg_pool(x, pool, name="input_pool")
    if isinstance(model, ResNet):
        pooled = _resnet_features(g, model, x)
        classifier = model.fc
    elif isinstance(model, MobileNetV2):
        pooled = _mobilenet_v2_features(g, model, x)
        classifier = model.classifier
    else:
        raise ModelError(
            f"cannot export a {type(model).__name__}: the ONNX exporter knows ResNet and MobileNetV2 models"
        )
    logits = _linear(g, pooled, classifier, name="fc") if classifier is not None else None
    head = model.embedding_head
    if not isinstance(head, EmbeddingHead):
        raise ModelError(f"unknown embedding head {type(head).__name__}")
    z = _linear(g, pooled, head.proj, name="embedding.proj")
    # Same rule as heads.l2_normalize: z * rsqrt(max(sum(z^2), eps^2)) == z / max(||z||, eps).
    embedding = g.l2_normalize(z, eps=float(head.epsilon), mode="max", name="embedding.l2norm")
    return Tensors(pooled=pooled, logits=logits, embedding=embedding)


def normalized_embedding(g: GraphBuilder, tensor: str, name: str) -> str:
    """L2-normalised ``tensor`` (pooled features or probabilities) as a retrieval embedding."""
    from imat.train_jax.models.heads import EMBED_EPSILON

    return g.l2_normalize(tensor, eps=EMBED_EPSILON, mode="max", name=f"{name}.l2norm")
