"""ONNX Runtime session for an imat model.onnx: metadata, providers, threads.

The model file carries everything the engine needs (image size, resize mode,
embedding dim, category names, weight fingerprint) in its `metadata_props`, so
serving never needs the training code. This module opens the file, validates
its metadata and checks it against the graph's shapes (both rules live in
`imat.contract`), chooses the execution provider (CUDA when onnxruntime offers
it, else CPU) and runs batches of uint8 images.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Sequence

import numpy as np

from imat.contract import INPUT_NAME, PROBABILITIES_OUTPUT, TensorSpec, check_graph, parse_metadata
from imat.contract import ModelMetadata  # noqa: F401  (re-exported: imat.engine.ModelMetadata)
from imat.errors import ModelError

logger = logging.getLogger(__name__)

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
        """Metadata vs graph (names, dtypes, static shapes): a mismatch fails here, not at the first search."""
        def spec(arg) -> TensorSpec:
            return TensorSpec(arg.name, arg.type, tuple(arg.shape))

        outputs = self._session.get_outputs()
        check_graph(self.metadata, [spec(i) for i in self._session.get_inputs()], [spec(o) for o in outputs])
        self._output_names = [o.name for o in outputs]

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
