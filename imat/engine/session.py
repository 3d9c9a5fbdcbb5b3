"""ONNX Runtime session for an imat model.onnx: metadata, providers, threads.

The model file carries everything the engine needs (image size, resize mode,
embedding dim, category names, weight fingerprint) in its `metadata_props`, so
serving never needs the training code. This module opens the file, validates
that it is an imat model, chooses the execution provider (CUDA when
onnxruntime offers it, else CPU) and runs batches of uint8 images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Sequence

import numpy as np

from imat.constants import RESIZE_MODES
from imat.errors import ModelError

logger = logging.getLogger(__name__)

INPUT_NAME = "images"
EMBEDDING_OUTPUT = "embedding"
PROBABILITIES_OUTPUT = "probabilities"
REQUIRED_METADATA = (
    "imat_version",
    "architecture",
    "objective",
    "image_size",
    "resize_mode",
    "embedding_dim",
    "category_names",
    "fingerprint",
    "outputs",
)


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """The validated `metadata_props` of an imat model.onnx."""

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

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["category_names"] = list(self.category_names)
        d["outputs"] = list(self.outputs)
        return d


def parse_metadata(props: dict[str, str], path: str) -> ModelMetadata:
    """Validate the raw metadata_props of `path`; ModelError names the file and the key at fault."""
    missing = [k for k in REQUIRED_METADATA if k not in props]
    if missing:
        raise ModelError(
            f"{path}: not an imat model (metadata keys missing: {', '.join(missing)}); "
            "export it with `imat export`"
        )

    def _int(key: str) -> int:
        try:
            value = int(props[key])
        except ValueError:
            raise ModelError(f"{path}: metadata '{key}' must be an integer, got {props[key]!r}") from None
        if value <= 0:
            raise ModelError(f"{path}: metadata '{key}' must be positive, got {value}")
        return value

    def _json_list(key: str) -> tuple[str, ...]:
        try:
            value = json.loads(props[key])
        except json.JSONDecodeError:
            raise ModelError(f"{path}: metadata '{key}' is not valid JSON: {props[key][:60]!r}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ModelError(f"{path}: metadata '{key}' must be a JSON list of strings")
        return tuple(value)

    resize_mode = props["resize_mode"]
    if resize_mode not in RESIZE_MODES:
        raise ModelError(f"{path}: metadata 'resize_mode' is {resize_mode!r}, expected one of {RESIZE_MODES}")
    outputs = _json_list("outputs")
    if EMBEDDING_OUTPUT not in outputs:
        raise ModelError(f"{path}: metadata 'outputs' {list(outputs)} lacks '{EMBEDDING_OUTPUT}'")
    fingerprint = props["fingerprint"].strip()
    if not fingerprint:
        raise ModelError(f"{path}: metadata 'fingerprint' is empty; re-export the model")
    extra = {k: v for k, v in props.items() if k not in REQUIRED_METADATA}
    return ModelMetadata(
        path=path,
        imat_version=props["imat_version"],
        architecture=props["architecture"],
        objective=props["objective"],
        image_size=_int("image_size"),
        resize_mode=resize_mode,
        embedding_dim=_int("embedding_dim"),
        category_names=_json_list("category_names"),
        fingerprint=fingerprint,
        outputs=outputs,
        extra=extra,
    )


def choose_providers(requested: Sequence[str] | None = None) -> tuple[list[str], str]:
    """Pick execution providers: (providers in priority order, why).

    CUDA first when this onnxruntime build offers it (onnxruntime-gpu), else CPU.
    An explicit request is honoured but filtered to what is available.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        chosen = [p for p in requested if p in available]
        if not chosen:
            raise ModelError(
                f"none of the requested execution providers {list(requested)} is available "
                f"(available: {available})"
            )
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        return chosen, f"requested {list(requested)}"
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDAExecutionProvider is available"
    return ["CPUExecutionProvider"], (
        f"CUDAExecutionProvider not available (available: {available}); install onnxruntime-gpu for GPU"
    )


def default_intra_op_threads(decode_threads: int, cores: int | None = None) -> int:
    """Model threads = cores minus the decoder threads, at least 1 (they share the same cores)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores - decode_threads)


class ModelSession:
    """An ONNX Runtime session over an imat model.onnx.

    `run(images)` takes uint8[B,H,W,3] and returns {"embedding": f32[B,D], "probabilities"?: f32[B,C]}.
    """

    def __init__(
        self,
        model_path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        decode_threads: int = 0,
    ):
        import onnxruntime as ort

        path = pathlib.Path(model_path)
        self.path = path
        if not path.is_file():
            raise ModelError(f"{path}: model file not found; pass the model.onnx written by `imat export`")
        providers_list, why = choose_providers(providers)

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = intra_op_threads or default_intra_op_threads(decode_threads)
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if decode_threads > 0:
            # Decoder threads share the cores: a spinning ORT pool would steal their time.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=so, providers=providers_list)
        except Exception as e:  # onnxruntime raises its own (non-ImatError) types for corrupt files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{path}: cannot load the ONNX model ({first}); is it a valid model.onnx?") from None

        props = dict(self._session.get_modelmeta().custom_metadata_map)
        self.metadata = parse_metadata(props, str(path))
        self._check_signature()
        self.provider = self._session.get_providers()[0]
        self.intra_op_threads = threads
        self._outputs = [o for o in self.metadata.outputs if o in self._output_names]
        logger.info(
            "model %s (%s/%s, %dx%d %s, D=%d): provider %s (%s), %d intra-op threads",
            path.name,
            self.metadata.architecture,
            self.metadata.objective,
            self.metadata.image_size,
            self.metadata.image_size,
            self.metadata.resize_mode,
            self.metadata.embedding_dim,
            self.provider,
            why,
            threads,
        )
        # IO binding pays off only when the model runs on the GPU (outputs copied once, no staging).
        self._use_io_binding = self.provider == "CUDAExecutionProvider"

    def _check_signature(self) -> None:
        inputs = self._session.get_inputs()
        path = self.path
        if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
            raise ModelError(f"{path}: expected one input named '{INPUT_NAME}', got {[i.name for i in inputs]}")
        if inputs[0].type != "tensor(uint8)" or len(inputs[0].shape) != 4:
            raise ModelError(
                f"{path}: input '{INPUT_NAME}' must be uint8 [batch,H,W,3], got {inputs[0].type} {inputs[0].shape}"
            )
        self._output_names = [o.name for o in self._session.get_outputs()]
        if EMBEDDING_OUTPUT not in self._output_names:
            raise ModelError(f"{path}: model has no '{EMBEDDING_OUTPUT}' output (outputs: {self._output_names})")
        if self.metadata.has_probabilities and PROBABILITIES_OUTPUT not in self._output_names:
            raise ModelError(f"{path}: metadata lists '{PROBABILITIES_OUTPUT}' but the graph has no such output")

    @property
    def has_probabilities(self) -> bool:
        return PROBABILITIES_OUTPUT in self._outputs

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch of uint8[B,H,W,3] images; returns the named float32 outputs."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if self._use_io_binding:
            return self._run_io_binding(images)
        values = self._session.run(self._outputs, {INPUT_NAME: images})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self._outputs, values)}

    def _run_io_binding(self, images: np.ndarray) -> dict[str, np.ndarray]:
        binding = self._session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, images)
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self._outputs, values)}
