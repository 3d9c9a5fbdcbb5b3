"""torchvision / timm state dicts (safetensors) -> imat flax.nnx models.

``load_torchvision_state_dict(model, path_or_dict)`` maps every tensor of a torchvision-named
state dict onto the model (timm ResNet names are torchvision's; timm ``mobilenetv2_*`` names
— conv_stem / bn1 / blocks.S.B.* / conv_head / bn2 / classifier — are renamed to torchvision's
first). Layouts: conv OIHW -> HWIO (depthwise (C,1,kh,kw) -> (kh,kw,1,C), the same transpose),
Linear (out,in) -> (in,out), BatchNorm weight/bias/running_mean/running_var -> scale/bias/mean/var;
``num_batches_tracked`` is ignored. Any missing or unexpected key or any shape mismatch raises
``ModelError`` naming the key, before anything is written to the model. The classifier (``fc`` /
``classifier.1``) is the exception: loaded when its shape matches the model's num_classes,
otherwise (or when absent) left freshly initialised with a log line. The embedding and rotation
heads are never in such a file and stay fresh.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx

from imat.errors import ModelError
from imat.train_jax.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTING, MobileNetV2
from imat.train_jax.models.resnet import ResNet

logger = logging.getLogger(__name__)

# kind -> (flax value -> torch layout) and its inverse
_TO_TORCH = {
    "conv": lambda a: np.transpose(a, (3, 2, 0, 1)),  # HWIO -> OIHW
    "linear": lambda a: np.transpose(a, (1, 0)),  # (in, out) -> (out, in)
    "vec": lambda a: a,
}
_FROM_TORCH = {
    "conv": lambda a: np.transpose(a, (2, 3, 1, 0)),  # OIHW -> HWIO
    "linear": lambda a: np.transpose(a, (1, 0)),
    "vec": lambda a: a,
}
_BN_FIELDS = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"), ("running_var", "var"))


def _conv(prefix: str, module) -> Iterator[tuple[str, nnx.Variable, str]]:
    yield f"{prefix}.weight", module.kernel, "conv"


def _bn(prefix: str, module) -> Iterator[tuple[str, nnx.Variable, str]]:
    for torch_name, flax_name in _BN_FIELDS:
        yield f"{prefix}.{torch_name}", getattr(module, flax_name), "vec"


def _linear(prefix: str, module) -> Iterator[tuple[str, nnx.Variable, str]]:
    yield f"{prefix}.weight", module.kernel, "linear"
    yield f"{prefix}.bias", module.bias, "vec"


def _resnet_entries(model: ResNet):
    yield from _conv("conv1", model.stem_conv)
    yield from _bn("bn1", model.stem_bn)
    for i, stage in enumerate(model.layers):
        for j, blk in enumerate(stage):
            p = f"layer{i + 1}.{j}"
            n_convs = 3 if hasattr(blk, "conv3") else 2
            for k in range(1, n_convs + 1):
                yield from _conv(f"{p}.conv{k}", getattr(blk, f"conv{k}"))
                yield from _bn(f"{p}.bn{k}", getattr(blk, f"bn{k}"))
            if blk.downsample is not None:
                yield from _conv(f"{p}.downsample.0", blk.downsample.conv)
                yield from _bn(f"{p}.downsample.1", blk.downsample.bn)


def _mobilenet_entries(model: MobileNetV2):
    yield from _conv("features.0.0", model.stem_conv)
    yield from _bn("features.0.1", model.stem_bn)
    for i, blk in enumerate(model.features):
        p = f"features.{i + 1}.conv"
        k = 0
        if blk.expand_conv is not None:
            yield from _conv(f"{p}.0.0", blk.expand_conv)
            yield from _bn(f"{p}.0.1", blk.expand_bn)
            k = 1
        yield from _conv(f"{p}.{k}.0", blk.dw_conv)
        yield from _bn(f"{p}.{k}.1", blk.dw_bn)
        yield from _conv(f"{p}.{k + 1}", blk.project_conv)
        yield from _bn(f"{p}.{k + 2}", blk.project_bn)
    last = len(model.features) + 1
    yield from _conv(f"features.{last}.0", model.head_conv)
    yield from _bn(f"features.{last}.1", model.head_bn)


def _entries(model) -> tuple[list[tuple[str, nnx.Variable, str]], list[tuple[str, nnx.Variable, str]]]:
    """(backbone entries, classifier entries) as (torchvision key, variable, kind)."""
    if isinstance(model, ResNet):
        return list(_resnet_entries(model)), list(_linear("fc", model.fc))
    if isinstance(model, MobileNetV2):
        return list(_mobilenet_entries(model)), list(_linear("classifier.1", model.classifier))
    raise ModelError(f"no torchvision weight mapping for model type {type(model).__name__}")


def torchvision_state_dict_shapes(model, *, include_num_batches_tracked: bool = True) -> dict[str, tuple[int, ...]]:
    """Every key of the torchvision state dict this model corresponds to, with its torch shape."""
    backbone, classifier = _entries(model)
    shapes: dict[str, tuple[int, ...]] = {}
    for key, var, kind in backbone + classifier:
        shape = tuple(var.shape)
        if kind == "conv":
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif kind == "linear":
            shape = (shape[1], shape[0])
        shapes[key] = shape
        if include_num_batches_tracked and key.endswith(".running_var"):
            shapes[key[: -len("running_var")] + "num_batches_tracked"] = ()
    return shapes


def model_to_torchvision_state_dict(model) -> dict[str, np.ndarray]:
    """The model's backbone + classifier as a torchvision-named, torch-layout float32 state dict
    (the inverse of ``load_torchvision_state_dict``; ``num_batches_tracked`` is not written)."""
    backbone, classifier = _entries(model)
    return {
        key: np.ascontiguousarray(_TO_TORCH[kind](np.asarray(var[...], np.float32)))
        for key, var, kind in backbone + classifier
    }


def timm_mobilenetv2_to_torchvision(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename a timm ``mobilenetv2_*`` state dict to torchvision's names (unknown keys kept as they are)."""
    stage_sizes = [n for _, _, n, _ in INVERTED_RESIDUAL_SETTING]
    first_index = np.cumsum([0] + stage_sizes)  # timm blocks.S.B -> torchvision features.(first_index[S]+B+1)
    ds = {"conv_dw": "conv.0.0", "bn1": "conv.0.1", "conv_pw": "conv.1", "bn2": "conv.2"}
    ir = {
        "conv_pw": "conv.0.0", "bn1": "conv.0.1", "conv_dw": "conv.1.0", "bn2": "conv.1.1",
        "conv_pwl": "conv.2", "bn3": "conv.3",
    }
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        new = key
        m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)", key)
        if key.startswith("conv_stem."):
            new = "features.0.0." + key[len("conv_stem."):]
        elif re.fullmatch(r"bn1\.\w+", key):
            new = "features.0.1." + key[len("bn1."):]
        elif key.startswith("conv_head."):
            new = f"features.{sum(stage_sizes) + 1}.0." + key[len("conv_head."):]
        elif re.fullmatch(r"bn2\.\w+", key):
            new = f"features.{sum(stage_sizes) + 1}.1." + key[len("bn2."):]
        elif re.fullmatch(r"classifier\.(weight|bias)", key):
            new = "classifier.1." + key[len("classifier."):]
        elif m and int(m.group(1)) < len(stage_sizes):
            s, b, layer, field = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            table = ds if s == 0 else ir
            if layer in table:
                new = f"features.{first_index[s] + b + 1}.{table[layer]}.{field}"
        out[new] = value
    return out


def _read(path_or_dict) -> tuple[dict[str, np.ndarray], str]:
    if isinstance(path_or_dict, Mapping):
        return dict(path_or_dict), "<state dict>"
    path = pathlib.Path(os.fspath(path_or_dict))
    if not path.is_file():
        raise ModelError(f"{path}: pretrained weight file not found; give a .safetensors state dict")
    try:
        from safetensors.numpy import load_file

        return load_file(str(path)), str(path)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelError(f"{path}: not a readable .safetensors state dict ({exc})") from exc


def load_torchvision_state_dict(model, path_or_dict) -> nnx.Module:
    """Load a torchvision/timm state dict (a .safetensors path or a name->array mapping) into ``model``
    in place and return it. Validates every key and shape first; writes nothing on error."""
    state, source = _read(path_or_dict)
    if isinstance(model, MobileNetV2) and "conv_stem.weight" in state:
        logger.info("%s: timm MobileNetV2 names detected; renaming to torchvision's", source)
        state = timm_mobilenetv2_to_torchvision(state)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    backbone, classifier = _entries(model)

    problems: list[str] = []
    updates: list[tuple[nnx.Variable, np.ndarray]] = []

    def convert(key: str, var: nnx.Variable, kind: str) -> np.ndarray | str:
        value = np.asarray(state[key])
        expected = tuple(_TO_TORCH[kind](np.empty(var.shape, np.bool_)).shape)
        if tuple(value.shape) != expected:
            return f"{key}: shape {tuple(value.shape)} in the file, model expects {expected}"
        return _FROM_TORCH[kind](value).astype(np.float32)

    for key, var, kind in backbone:
        if key not in state:
            problems.append(f"{key}: missing from the file")
            continue
        got = convert(key, var, kind)
        if isinstance(got, str):
            problems.append(got)
        else:
            updates.append((var, got))

    cls_keys = [k for k, _, _ in classifier]
    expected_keys = {k for k, _, _ in backbone} | set(cls_keys)
    for key in sorted(set(state) - expected_keys):
        problems.append(f"{key}: unexpected key (not part of {getattr(model, 'arch', type(model).__name__)})")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelError(
            f"{source}: state dict does not match the model {getattr(model, 'arch', '')}: "
            + "; ".join(problems[:5]) + more
            + ". Use weights of the same architecture (torchvision or timm names)."
        )

    cls_updates = []
    for key, var, kind in classifier:
        got = convert(key, var, kind) if key in state else f"{key}: absent from the file"
        if isinstance(got, str):
            logger.info("%s: classifier not loaded (%s); it stays freshly initialised", source, got)
            cls_updates = []
            break
        cls_updates.append((var, got))

    for var, value in updates + cls_updates:
        var.set_value(jnp.asarray(value))
    logger.info(
        "%s: loaded %d tensors into %s%s", source, len(updates) + len(cls_updates),
        getattr(model, "arch", type(model).__name__), "" if cls_updates else " (classifier left fresh)",
    )
    return model
