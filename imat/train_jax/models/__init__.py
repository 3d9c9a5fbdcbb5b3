"""imat backbones by name: ``create_model(name, ...)`` builds a flax.nnx model that maps uint8
NHWC images to ``{"pooled", "logits", "embedding", "rotation_logits"?}``.

Registered names: resnet18, resnet34, resnet50 (torchvision layouts, see ``resnet.py``),
mobilenet_v2 (see ``mobilenet_v2.py``) and resnet_tiny (one BasicBlock per stage, widths
8/16/32/64, for tests). Every model:

- normalises inside: ``(x / 255 - IMAGENET_MEAN) / IMAGENET_STD`` in float32;
- is created in train mode (BatchNorm batch statistics, dropout on), like torch;
  ``model.eval()`` switches to running averages and disables dropout, ``model.train()`` back;
- exposes ``model.arch`` (registry name), ``model.config`` (JSON-able create_model kwargs
  without rngs/pretrained) and ``model.num_features`` (width of ``pooled``).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import numpy as np
from flax import nnx

from imat.constants import NUM_CATEGORIES
from imat.errors import ConfigError
from imat.train_jax.models.layers import CONV_MODES, DEPTHWISE_MODES, resolve_depthwise, set_conv_impl, set_depthwise
from imat.train_jax.models.mobilenet_v2 import MobileNetV2
from imat.train_jax.models.resnet import ResNet, build_resnet

logger = logging.getLogger(__name__)

HEAD_NAMES = ("embedding_head", "rotation_head")


def _resnet(arch: str, *, num_classes, embedding_dim, rotation_head, depthwise, rngs, input_pool=1):
    del depthwise  # ResNets have no depthwise convs
    return build_resnet(
        arch, num_classes=num_classes, embedding_dim=embedding_dim, rotation_head=rotation_head, rngs=rngs,
        input_pool=input_pool,
    )


def _mobilenet_v2(*, num_classes, embedding_dim, rotation_head, depthwise, rngs, width_mult=1.0, input_pool=1):
    return MobileNetV2(
        num_classes=num_classes, embedding_dim=embedding_dim, rotation_head=rotation_head,
        width_mult=width_mult, depthwise=depthwise, rngs=rngs, input_pool=input_pool,
    )


MODELS: dict[str, Callable[..., nnx.Module]] = {
    "resnet18": functools.partial(_resnet, "resnet18"),
    "resnet34": functools.partial(_resnet, "resnet34"),
    "resnet50": functools.partial(_resnet, "resnet50"),
    "mobilenet_v2": _mobilenet_v2,
    "resnet_tiny": functools.partial(_resnet, "resnet_tiny"),
}


def create_model(
    name: str,
    *,
    num_classes: int = NUM_CATEGORIES,
    embedding_dim: int = 128,
    rotation_head: bool = False,
    pretrained=None,
    depthwise: str = "auto",
    conv: str = "auto",
    input_pool: int = 1,
    rngs: nnx.Rngs,
    **arch_kwargs,
) -> nnx.Module:
    """Build a registered model; ``pretrained`` (a .safetensors path or a state dict) is loaded with
    ``imat.train_jax.pretrained.load_torchvision_state_dict``. ``arch_kwargs`` are architecture
    options (``width_mult`` for mobilenet_v2). ``depthwise``: "auto" | "grouped" | "shifted";
    ``conv``: the regular convs' formulation (``CONV_MODES``; "auto": imat's CPU formulations).
    ``input_pool`` > 1 averages the normalised input over pool x pool blocks before the stem
    (parameter-free, so torchvision weights still load)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model architecture {name!r}; choose one of {sorted(MODELS)}")
    if depthwise not in DEPTHWISE_MODES:
        raise ConfigError(f"depthwise={depthwise!r} is not one of {DEPTHWISE_MODES}")
    if conv not in CONV_MODES:
        raise ConfigError(f"conv={conv!r} is not one of {CONV_MODES}")
    if name != "mobilenet_v2" and arch_kwargs:
        raise ConfigError(f"options {sorted(arch_kwargs)} are not understood by {name!r}")
    if set(arch_kwargs) - {"width_mult"}:
        raise ConfigError(f"unknown model options {sorted(set(arch_kwargs) - {'width_mult'})} for {name!r}")
    if int(input_pool) < 1:
        raise ConfigError(f"input_pool={input_pool!r} must be >= 1")
    if int(num_classes) < 1 or int(embedding_dim) < 1:
        raise ConfigError(f"num_classes ({num_classes}) and embedding_dim ({embedding_dim}) must be >= 1")
    model = MODELS[name](
        num_classes=int(num_classes), embedding_dim=int(embedding_dim), rotation_head=bool(rotation_head),
        depthwise=depthwise, rngs=rngs, input_pool=int(input_pool), **arch_kwargs,
    )
    if conv != "auto":
        set_conv_impl(model, conv)
    model.arch = name
    model.config = {
        "num_classes": int(num_classes),
        "embedding_dim": int(embedding_dim),
        "rotation_head": bool(rotation_head),
        "depthwise": depthwise,
        **({"input_pool": int(input_pool)} if int(input_pool) > 1 else {}),
        **{k: float(v) for k, v in arch_kwargs.items()},
    }
    if pretrained is not None:
        from imat.train_jax.pretrained import load_torchvision_state_dict

        load_torchvision_state_dict(model, pretrained)
    return model


def count_params(model: nnx.Module, include_heads: bool = False) -> int:
    """Number of trainable parameters (nnx.Param; BatchNorm running stats are not counted).
    Without ``include_heads`` the embedding and rotation heads are left out, which gives
    torchvision's count for the same backbone + classifier."""
    total = 0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if not include_heads and path and path[0] in HEAD_NAMES:
            continue
        total += int(np.prod(value.shape))
    return total


__all__ = [
    "MODELS", "create_model", "count_params", "set_depthwise", "resolve_depthwise",
    "ResNet", "MobileNetV2", "DEPTHWISE_MODES",
]
