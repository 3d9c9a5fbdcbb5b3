"""The model.onnx contract: tensor names, metadata keys and their types, one parser, one writer.

Export writes a model with `metadata_props(...)`; the engine reads it with `parse_metadata(...)`
and checks the metadata against the graph with `check_graph(...)`. Both sides import this one
module, so a key or a type can only be changed here. Deliberately light (stdlib + imat.constants
+ imat.errors): the engine and tools that never install JAX or onnx import it.

Encoding (unchanged since the first exported models, so every existing model.onnx still loads):
every value is a string; positive ints are decimal; lists of names and `model_config` are JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence

from imat import __version__
from imat.constants import RESIZE_MODES
from imat.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
INPUT_TYPE = "tensor(uint8)"
EMBEDDING_OUTPUT = "embedding"
PROBABILITIES_OUTPUT = "probabilities"
LOGITS_OUTPUT = "logits"
OUTPUT_NAMES = (EMBEDDING_OUTPUT, PROBABILITIES_OUTPUT, LOGITS_OUTPUT)
INPUT_DESCRIPTION = "images: uint8 [batch, height, width, 3] RGB, normalisation inside the graph"

# Value kinds of metadata keys (every value is stored as a string).
STR, POSITIVE_INT, JSON_STR_LIST, JSON_OBJECT = "str", "positive int", "JSON list of str", "JSON object"


@dataclasses.dataclass(frozen=True)
class MetadataKey:
    name: str
    kind: str
    required: bool
    doc: str


METADATA_KEYS: tuple[MetadataKey, ...] = (
    MetadataKey("imat_version", STR, True, "imat version that exported the model"),
    MetadataKey("architecture", STR, True, "backbone name (resnet18, mobilenet_v2, ...)"),
    MetadataKey("objective", STR, True, "training objective (bce, triplet, rotation, ...)"),
    MetadataKey("image_size", POSITIVE_INT, True, "input height = width in pixels"),
    MetadataKey("resize_mode", STR, True, f"how images are resized to image_size: one of {', '.join(RESIZE_MODES)}"),
    MetadataKey("embedding_dim", POSITIVE_INT, True, "last dimension of the embedding output"),
    MetadataKey("category_names", JSON_STR_LIST, True, "one name per column of the probabilities output"),
    MetadataKey("fingerprint", STR, True, "hash of the weights; an index remembers the model that built it"),
    MetadataKey("outputs", JSON_STR_LIST, True, "graph outputs, always including 'embedding'"),
    MetadataKey("embedding_source", STR, False,
                "which model output the embedding is: embedding (the head), pooled, probabilities"),
    MetadataKey("input", STR, False, "human-readable description of the input"),
    MetadataKey("model_config", JSON_OBJECT, False, "the model's constructor config"),
    MetadataKey("source_run", STR, False, "name of the training run exported"),
    MetadataKey("checkpoint_step", STR, False, "checkpoint step exported (decimal)"),
    MetadataKey("garment_model", STR, False, "'true' for a model trained on garment crops: the engine crops garments"),
    MetadataKey("garment_padding", STR, False, "context padding of the garment crops, a fraction of the box (decimal)"),
    MetadataKey("quantization", STR, False, "'int8' for a model quantized by `imat export --quantize int8`"),
    MetadataKey("float_fingerprint", STR, False, "fingerprint of the float model an int8 model was quantized from"),
)
KEYS_BY_NAME: dict[str, MetadataKey] = {k.name: k for k in METADATA_KEYS}
REQUIRED_KEYS: tuple[str, ...] = tuple(k.name for k in METADATA_KEYS if k.required)


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """The validated `metadata_props` of an imat model.onnx.

    `extra` holds the optional keys (decoded by their kind: `model_config` is a dict) and any key
    this contract does not know (kept as the raw string).
    """

    path: str
    imat_version: str
    architecture: str
    objective: str
    image_size: int
    resize_mode: str
    embedding_dim: int
    category_names: tuple[str, ...]
    fingerprint: str
    outputs: tuple[str, ...]
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def has_probabilities(self) -> bool:
        return PROBABILITIES_OUTPUT in self.outputs

    @property
    def embedding_source(self) -> str | None:
        return self.extra.get("embedding_source")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["category_names"] = list(self.category_names)
        d["outputs"] = list(self.outputs)
        return d


def _decode(key: MetadataKey, raw, path: str):
    """One value of metadata_props decoded by its kind; ModelError names the file and the key."""
    if not isinstance(raw, str):
        raise ModelError(f"{path}: metadata '{key.name}' must be a string, got {type(raw).__name__}")
    if key.kind == STR:
        return raw
    if key.kind == POSITIVE_INT:
        try:
            value = int(raw)
        except ValueError:
            raise ModelError(f"{path}: metadata '{key.name}' must be an integer, got {raw!r}") from None
        if value <= 0:
            raise ModelError(f"{path}: metadata '{key.name}' must be positive, got {value}")
        return value
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelError(f"{path}: metadata '{key.name}' is not valid JSON: {raw[:60]!r}") from None
    if key.kind == JSON_STR_LIST:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ModelError(f"{path}: metadata '{key.name}' must be a JSON list of strings")
        return tuple(value)
    if not isinstance(value, dict):
        raise ModelError(f"{path}: metadata '{key.name}' must be a JSON object")
    return value


def parse_metadata(props: Mapping[str, str], path) -> ModelMetadata:
    """Validate the raw metadata_props of `path`; ModelError names the file and the key at fault."""
    path = str(path)
    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise ModelError(
            f"{path}: not an imat model (metadata keys missing: {', '.join(missing)}); "
            "export it with `imat export`"
        )
    values = {name: _decode(KEYS_BY_NAME[name], props[name], path) for name in REQUIRED_KEYS}
    if values["resize_mode"] not in RESIZE_MODES:
        raise ModelError(
            f"{path}: metadata 'resize_mode' is {values['resize_mode']!r}, expected one of {RESIZE_MODES}"
        )
    if EMBEDDING_OUTPUT not in values["outputs"]:
        raise ModelError(f"{path}: metadata 'outputs' {list(values['outputs'])} lacks '{EMBEDDING_OUTPUT}'")
    values["fingerprint"] = values["fingerprint"].strip()
    if not values["fingerprint"]:
        raise ModelError(f"{path}: metadata 'fingerprint' is empty; re-export the model")
    extra = {}
    for name, raw in props.items():
        if name in values:
            continue
        key = KEYS_BY_NAME.get(name)
        extra[name] = _decode(key, raw, path) if key is not None else raw
    return ModelMetadata(path=path, extra=extra, **values)


def metadata_props(
    *,
    architecture: str,
    objective: str,
    image_size: int,
    resize_mode: str,
    embedding_dim: int,
    category_names: Sequence[str],
    fingerprint: str,
    outputs: Sequence[str],
    embedding_source: str | None = None,
    model_config: Mapping | None = None,
    extra: Mapping | None = None,
) -> dict[str, str]:
    """The metadata_props dict (str -> str) an exporter writes; checked with `parse_metadata` first.

    `extra` keys must not be contract keys the exporter sets itself; values that are not
    strings are stored as JSON.
    """
    props = {
        "imat_version": __version__,
        "architecture": str(architecture),
        "objective": str(objective),
        "image_size": str(int(image_size)),
        "resize_mode": str(resize_mode),
        "embedding_dim": str(int(embedding_dim)),
        "category_names": json.dumps([str(n) for n in category_names]),
        "fingerprint": str(fingerprint),
        "outputs": json.dumps([str(o) for o in outputs]),
    }
    if embedding_source is not None:
        props["embedding_source"] = str(embedding_source)
    props["input"] = INPUT_DESCRIPTION
    if model_config is not None:
        props["model_config"] = json.dumps(dict(model_config), sort_keys=True)
    for key, value in (extra or {}).items():
        if key in props or key in ("embedding_source", "model_config"):
            raise ConfigError(f"extra_metadata key {key!r} is reserved by the exporter; rename it")
        props[str(key)] = value if isinstance(value, str) else json.dumps(value)
    try:
        parse_metadata(props, "<metadata being exported>")
    except ModelError as e:
        raise ConfigError(str(e)) from None
    return props


# ---- the graph against its metadata ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as ONNX Runtime reports it; a dim is an int when static."""

    name: str
    type: str
    shape: tuple


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def check_graph(meta: ModelMetadata, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """The graph's signature agrees with its metadata; ModelError names the file, the key and both values.

    Dynamic dims (a name or None) are not checked: only static H/W and last dims can disagree.
    """
    path = meta.path
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ModelError(f"{path}: expected one input named '{INPUT_NAME}', got {[i.name for i in inputs]}")
    image = inputs[0]
    if image.type != INPUT_TYPE or len(image.shape) != 4:
        raise ModelError(
            f"{path}: input '{INPUT_NAME}' must be uint8 [batch,H,W,3], got {image.type} {list(image.shape)}"
        )
    for axis, name in ((1, "height"), (2, "width")):
        dim = _static(image.shape[axis])
        if dim is not None and dim != meta.image_size:
            raise ModelError(
                f"{path}: metadata 'image_size' is {meta.image_size} but the graph input '{INPUT_NAME}' has "
                f"{name} {dim}; the metadata does not describe this graph, re-export the model"
            )
    channels = _static(image.shape[3])
    if channels is not None and channels != 3:
        raise ModelError(f"{path}: input '{INPUT_NAME}' must have 3 channels, the graph has {channels}")

    by_name = {o.name: o for o in outputs}
    if EMBEDDING_OUTPUT not in by_name:
        raise ModelError(f"{path}: model has no '{EMBEDDING_OUTPUT}' output (outputs: {list(by_name)})")
    if meta.has_probabilities and PROBABILITIES_OUTPUT not in by_name:
        raise ModelError(f"{path}: metadata lists '{PROBABILITIES_OUTPUT}' but the graph has no such output")
    checks = [(EMBEDDING_OUTPUT, "embedding_dim", meta.embedding_dim)]
    if meta.has_probabilities:
        checks.append((PROBABILITIES_OUTPUT, "category_names", len(meta.category_names)))
    for output, key, expected in checks:
        shape = by_name[output].shape
        if len(shape) != 2:
            raise ModelError(f"{path}: output '{output}' must be [batch, N], the graph has shape {list(shape)}")
        dim = _static(shape[-1])
        if dim is not None and dim != expected:
            what = f"{expected} names" if key == "category_names" else str(expected)
            raise ModelError(
                f"{path}: metadata '{key}' gives {what} but the graph output '{output}' has last dimension "
                f"{dim}; the metadata does not describe this graph, re-export the model"
            )
