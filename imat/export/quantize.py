"""An int8 model.onnx for CPUs: ONNX Runtime static quantization (QDQ), calibrated on real images, gated.

`quantize_int8(float_model, out, calibration_images, heldout_images)` runs ONNX Runtime's
pre-processing (shape inference, graph optimisation) and `quantize_static` in QDQ format (int8
weights per output channel, uint8 activations, ranges from the 99.99th percentile of the calibration
images' activations), then checks
that retrieval agrees with the float model on held-out images before anything is written:

- embeddings: for each held-out image, its 10 nearest other held-out images (inner product of the
  L2-normalised embeddings) by the int8 model must overlap those of the float model by >= 0.9 on
  average;
- probabilities (when the model has them): the same overlap for neighbours by the (L2-normalised)
  probability vectors, the embedding a BCE model serves.

Below either threshold the export is refused with a ModelError that gives both overlaps, and no file
is written (temp file + rename, `imat.fileio.atomic_path`). The int8 model keeps the float model's
contract (input, outputs, metadata), so the engine reads it like any model.onnx; its metadata adds
`quantization` = "int8" and `float_fingerprint`, and its `fingerprint` is its own (an index built
with the float model is refused by the int8 one: the embeddings differ slightly).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
import tempfile
import time

import numpy as np

from imat.contract import INPUT_NAME, PROBABILITIES_OUTPUT, parse_metadata
from imat.errors import ConfigError, ModelError
from imat.fileio import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_MIN_OVERLAP = 0.9
DEFAULT_K = 10
CALIBRATION_BATCH = 16
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # the weights and the time are here; the rest stays float
# Activation ranges: the 99.99th percentile, not min/max: one outlier pixel of one calibration image
# would otherwise stretch a range for every image (measured on a ccp-dev MobileNetV2: top-10 overlap
# 0.33 with min/max, 0.46 with the percentile, and 1.15x faster).
CALIBRATION_PERCENTILE = 99.99


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How well the int8 model's neighbours agree with the float model's on held-out images."""

    embedding_overlap: float
    probability_overlap: float | None
    k: int
    heldout: int
    min_overlap: float
    max_abs_probability_error: float | None = None

    @property
    def ok(self) -> bool:
        overlaps = [self.embedding_overlap] + ([self.probability_overlap] if self.probability_overlap is not None else [])
        return all(o >= self.min_overlap for o in overlaps)  # NaN never passes

    def describe(self) -> str:
        parts = [f"embedding top-{self.k} overlap {self.embedding_overlap:.3f}"]
        if self.probability_overlap is not None:
            parts.append(f"probabilities top-{self.k} overlap {self.probability_overlap:.3f} "
                         f"(max |p int8 - p float| {self.max_abs_probability_error:.3f})")
        return f"{'; '.join(parts)} over {self.heldout} held-out images (gate >= {self.min_overlap})"


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    path: pathlib.Path
    agreement: Agreement
    calibration_images: int
    size_bytes: int
    float_size_bytes: int
    seconds: float
    fingerprint: str


def neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """int64[N, k]: each row's k nearest other rows by inner product of the L2-normalised rows."""
    x = np.asarray(vectors, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def topk_overlap(reference: np.ndarray, candidate: np.ndarray, k: int = DEFAULT_K) -> float:
    """Mean over rows of |top-k neighbours by `reference` & by `candidate`| / k (neighbours among the rows)."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference rows vs {len(candidate)} candidate rows")
    if len(reference) <= k:
        raise ConfigError(f"the agreement gate needs more than {k} held-out images, got {len(reference)}")
    if not np.all(np.isfinite(candidate)):
        return float("nan")
    a, b = neighbours(reference, k), neighbours(candidate, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def agreement(float_outputs: dict, int8_outputs: dict, *, k: int = DEFAULT_K,
              min_overlap: float = DEFAULT_MIN_OVERLAP) -> Agreement:
    """The gate's figures from both models' outputs on the same held-out images."""
    emb = topk_overlap(float_outputs["embedding"], int8_outputs["embedding"], k)
    prob = err = None
    if PROBABILITIES_OUTPUT in float_outputs:
        prob = topk_overlap(float_outputs[PROBABILITIES_OUTPUT], int8_outputs[PROBABILITIES_OUTPUT], k)
        err = float(np.max(np.abs(float_outputs[PROBABILITIES_OUTPUT] - int8_outputs[PROBABILITIES_OUTPUT])))
    return Agreement(emb, prob, k, len(float_outputs["embedding"]), min_overlap, err)


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader protocol over an array of uint8 images, in batches
    of one size (the percentile calibrator stacks them; a ragged last batch is left out)."""

    def __init__(self, images: np.ndarray) -> None:
        usable = max(CALIBRATION_BATCH, len(images) - len(images) % CALIBRATION_BATCH)
        self._batches = iter([images[i : i + CALIBRATION_BATCH] for i in range(0, min(usable, len(images)),
                                                                                CALIBRATION_BATCH)])

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def _check_images(images: np.ndarray, size: int, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ConfigError(f"{what} must be uint8 [N, {size}, {size}, 3], got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise ConfigError(f"{what}: no images")
    return np.ascontiguousarray(images)


def _quantized_fingerprint(proto, float_fingerprint: str) -> str:
    h = hashlib.sha256(f"int8:{float_fingerprint}".encode())
    for init in sorted(proto.graph.initializer, key=lambda t: t.name):
        h.update(init.name.encode())
        h.update(init.raw_data)
    return h.hexdigest()


def quantize_int8(float_model, out_path, calibration_images: np.ndarray, heldout_images: np.ndarray, *,
                  min_overlap: float = DEFAULT_MIN_OVERLAP, k: int = DEFAULT_K) -> QuantizeReport:
    """Write an int8 QDQ model of `float_model` to `out_path`, or raise ModelError (writing nothing)
    when its retrieval on `heldout_images` disagrees with the float model's (see the module docstring)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from imat.export.validate import onnx_outputs

    t0 = time.perf_counter()
    float_model, out_path = pathlib.Path(float_model), pathlib.Path(out_path)
    source = onnx.load(str(float_model))
    props = {p.key: p.value for p in source.metadata_props}
    meta = parse_metadata(props, str(float_model))
    if meta.extra.get("quantization"):
        raise ConfigError(f"{float_model} is already quantized ({meta.extra['quantization']}); quantize the float model")
    size = meta.image_size
    calibration_images = _check_images(calibration_images, size, "calibration images")
    heldout_images = _check_images(heldout_images, size, "held-out images")
    if len(heldout_images) <= k:
        raise ConfigError(f"the agreement gate needs more than {k} held-out images, got {len(heldout_images)}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="imat-int8-") as tmp:
        pre, raw = pathlib.Path(tmp) / "pre.onnx", pathlib.Path(tmp) / "int8.onnx"
        # Shape inference + ORT's float optimisations first, so the quantizer sees fused Conv+Relu etc.
        quant_pre_process(str(float_model), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre), str(raw), _Calibration(calibration_images), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OPS),
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
        )
        proto = onnx.load(str(raw))
        fingerprint = _quantized_fingerprint(proto, meta.fingerprint)
        props.update({"fingerprint": fingerprint, "quantization": "int8", "float_fingerprint": meta.fingerprint})
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, props)
        proto.doc_string = f"{source.doc_string} [int8 QDQ, calibrated on {len(calibration_images)} images]".strip()
        with atomic_path(out_path) as tmp_out:  # renamed into place only when the gate passes
            onnx.save_model(proto, str(tmp_out))
            parse_metadata({p.key: p.value for p in proto.metadata_props}, str(out_path))
            result = agreement(onnx_outputs(float_model, heldout_images), onnx_outputs(tmp_out, heldout_images),
                               k=k, min_overlap=min_overlap)
            logger.info("int8 agreement: %s", result.describe())
            if not result.ok:
                raise ModelError(
                    f"int8 model for {out_path} refused: {result.describe()}; its neighbours differ from the float "
                    f"model's, so it was not written (calibrate on more, or more typical, images of the dataset, "
                    f"or serve the float model {float_model})")
    report = QuantizeReport(out_path, result, len(calibration_images), out_path.stat().st_size,
                            float_model.stat().st_size, time.perf_counter() - t0, fingerprint)
    logger.info("wrote int8 model %s (%.1f MB, float %.1f MB) in %.1f s", out_path, report.size_bytes / 1e6,
                report.float_size_bytes / 1e6, report.seconds)
    return report
