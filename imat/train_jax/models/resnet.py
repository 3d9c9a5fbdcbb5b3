"""ResNet-18/34/50 (torchvision layout, v1.5: the Bottleneck's stride is on its 3x3 conv) and a
tiny ResNet for tests, in flax.nnx.

Module structure (walked by the ONNX exporter; torchvision key in brackets):

``ResNet``
  - ``stem_conv``  nnx.Conv 7x7, stride 2, padding ((3,3),(3,3)), no bias      [conv1]
  - ``stem_bn``    nnx.BatchNorm, then ReLU                                      [bn1]
  - max pool 3x3, stride 2, padding ((1,1),(1,1)) with -inf (``layers.max_pool_3x3_s2``)
  - ``layers``     nnx.List of 4 stages, each an nnx.List of blocks; ``layers[i][j]`` is
                   [layer{i+1}.{j}]; the first block of stages 2-4 has stride 2
  - global average pool over H, W -> ``pooled`` [B, F] (F = 512 for 18/34, 2048 for 50)
  - ``fc``         nnx.Linear(F, num_classes) -> ``logits``                      [fc]
  - ``embedding_head`` heads.EmbeddingHead (``.proj`` Linear, then L2 normalisation)
  - ``rotation_head``  nnx.Linear(F, 4) or None

``BasicBlock`` (resnet18/34/tiny), fields ``stride`` (int), ``downsample`` (Downsample|None):
  conv1 3x3/stride pad 1 -> bn1 -> ReLU -> conv2 3x3/1 pad 1 -> bn2 -> (+ identity) -> ReLU

``Bottleneck`` (resnet50), expansion 4, width = planes:
  conv1 1x1/1 pad 0 -> bn1 -> ReLU -> conv2 3x3/stride pad 1 -> bn2 -> ReLU
  -> conv3 1x1/1 pad 0 -> bn3 -> (+ identity) -> ReLU

``Downsample`` (when stride != 1 or channels change): ``conv`` 1x1/stride pad 0, no bias
[downsample.0] -> ``bn`` [downsample.1]; applied to the block input to form the identity.

Every conv is bias-free with explicit padding k//2; every activation is ReLU (not ReLU6).
Every conv is a ``layers.Conv`` (an nnx.Conv subclass, same parameters): on the CPU backend it
computes the convs whose input or output is smaller than the kernel (layer4 at 64 px input is
2x2) as a sum over kernel taps, because XLA:CPU runs those ~50-100x slower than it should.
"""

from __future__ import annotations

import jax
from flax import nnx

from imat.train_jax.models import heads
from imat.train_jax.models.layers import batch_norm, conv, global_avg_pool, max_pool_3x3_s2, normalize_images


class Downsample(nnx.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = conv(in_ch, out_ch, 1, stride, rngs=rngs)
        self.bn = batch_norm(out_ch, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        out_ch = planes * self.expansion
        self.stride = stride
        self.conv1 = conv(in_ch, planes, 3, stride, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, 1, rngs=rngs)
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.downsample = Downsample(in_ch, out_ch, stride, rngs=rngs) if stride != 1 or in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return nnx.relu(y + identity)


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, *, rngs: nnx.Rngs):
        out_ch = planes * self.expansion
        self.stride = stride
        self.conv1 = conv(in_ch, planes, 1, 1, rngs=rngs)
        self.bn1 = batch_norm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride, rngs=rngs)  # v1.5: stride on the 3x3
        self.bn2 = batch_norm(planes, rngs=rngs)
        self.conv3 = conv(planes, out_ch, 1, 1, rngs=rngs)
        self.bn3 = batch_norm(out_ch, rngs=rngs)
        self.downsample = Downsample(in_ch, out_ch, stride, rngs=rngs) if stride != 1 or in_ch != out_ch else None

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.downsample is None else self.downsample(x)
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return nnx.relu(y + identity)


class ResNet(nnx.Module):
    def __init__(
        self,
        *,
        arch: str,
        block: str,
        stage_sizes: tuple[int, ...],
        widths: tuple[int, ...],
        stem_width: int,
        num_classes: int,
        embedding_dim: int,
        rotation_head: bool,
        rngs: nnx.Rngs,
        input_pool: int = 1,
    ):
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        self.arch = arch
        self.block = block
        self.input_pool = int(input_pool)
        self.stem_conv = conv(3, stem_width, 7, 2, rngs=rngs)
        self.stem_bn = batch_norm(stem_width, rngs=rngs)
        in_ch = stem_width
        stages = []
        for i, (n, planes) in enumerate(zip(stage_sizes, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(in_ch, planes, stride, rngs=rngs))
                in_ch = planes * block_cls.expansion
            stages.append(nnx.List(blocks))
        self.layers = nnx.List(stages)
        self.num_features = in_ch
        self.fc = nnx.Linear(in_ch, num_classes, rngs=rngs)
        self.embedding_head = heads.EmbeddingHead(in_ch, embedding_dim, rngs=rngs)
        self.rotation_head = heads.rotation_head(in_ch, rngs=rngs) if rotation_head else None

    def forward_features(self, images: jax.Array) -> jax.Array:
        """uint8 NHWC -> pooled features [B, F]."""
        x = normalize_images(images, self.input_pool)
        x = max_pool_3x3_s2(nnx.relu(self.stem_bn(self.stem_conv(x))))
        for stage in self.layers:
            for blk in stage:
                x = blk(x)
        return global_avg_pool(x)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        pooled = self.forward_features(images)
        return heads.head_outputs(self, pooled, self.fc(pooled))


_SPECS = {
    "resnet18": dict(block="basic", stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64),
    "resnet34": dict(block="basic", stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64),
    "resnet50": dict(block="bottleneck", stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem_width=64),
    "resnet_tiny": dict(block="basic", stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64), stem_width=8),
}


def build_resnet(arch: str, *, num_classes: int, embedding_dim: int, rotation_head: bool, rngs: nnx.Rngs,
                 input_pool: int = 1) -> ResNet:
    return ResNet(
        arch=arch, num_classes=num_classes, embedding_dim=embedding_dim, rotation_head=rotation_head, rngs=rngs,
        input_pool=input_pool,
        **_SPECS[arch],
    )
