"""Parity gate: an exported model.onnx must compute what the JAX model computes.

The same uint8 images go through ONNX Runtime (CPU) and the JAX model in eval mode; for
each exported output the error is ``max |onnx - jax| / max |jax|`` (relative to the
output's scale, so it is meaningful for unit-norm embeddings and for large logits alike).
Anything above the tolerance is a ModelError that states the measured errors.

Probabilities are the one output whose scale is not their own: sigmoid maps a logit error
d to a probability error of up to d/4, and float32 logits of size L carry errors of about
1e-7 * L. A model with logits in the thousands (random weights, or a badly scaled head) can
therefore show a probability error far above 1e-4 while its logits agree to 1e-6. So when
the reference gives the logits too, the probability error is taken relative to
``max(max |p|, max |logits| / 4)``: the same number as before for any model with
``|logits| <= 4``, and for larger logits exactly the logits' relative error bound.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from imat.errors import ModelError

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """Per output: max relative error, max absolute error; plus how many images were compared."""

    relative: dict[str, float]
    absolute: dict[str, float]
    num_images: int
    tolerance: float

    @property
    def max_relative(self) -> float:
        return max(self.relative.values()) if self.relative else 0.0

    @property
    def ok(self) -> bool:
        # NaN never passes (a NaN comparison is False).
        return all(v <= self.tolerance for v in self.relative.values())

    def describe(self) -> str:
        parts = [f"{k}: rel {self.relative[k]:.2e} (abs {self.absolute[k]:.2e})" for k in self.relative]
        return f"{'; '.join(parts)} over {self.num_images} images (tolerance {self.tolerance:.0e})"


def random_images(n: int, image_size: int, seed: int = 0) -> np.ndarray:
    """Random uint8 NHWC images plus an all-black and an all-white one (range extremes)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
    if n >= 3:
        images[-2] = 0
        images[-1] = 255
    return images


def onnx_outputs(path: pathlib.Path | str, images: np.ndarray, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Run model.onnx with ONNX Runtime on CPU, in batches; {output name: array}."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(images), batch_size):
        values = session.run(names, {session.get_inputs()[0].name: images[start:start + batch_size]})
        for n, v in zip(names, values):
            chunks[n].append(v)
    return {n: np.concatenate(v) for n, v in chunks.items()}


def jax_outputs(
    reference: Callable[[np.ndarray], dict[str, np.ndarray]], images: np.ndarray, batch_size: int = 16
) -> dict[str, np.ndarray]:
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        for n, v in reference(images[start:start + batch_size]).items():
            chunks.setdefault(n, []).append(np.asarray(v))
    return {n: np.concatenate(v) for n, v in chunks.items()}


def compare(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray], names: Sequence[str],
            tolerance: float, num_images: int) -> ParityReport:
    rel, absolute = {}, {}
    for name in names:
        if name not in actual:
            raise ModelError(f"the exported model has no output {name!r} (outputs: {sorted(actual)})")
        a = np.asarray(actual[name], np.float64)
        e = np.asarray(expected[name], np.float64)
        if a.shape != e.shape:
            raise ModelError(f"exported output {name!r} has shape {a.shape}, the JAX model gives {e.shape}")
        err = float(np.max(np.abs(a - e))) if a.size else 0.0
        scale = float(np.max(np.abs(e))) if e.size else 0.0
        if name == "probabilities" and "logits" in expected and e.size:
            # sigmoid' <= 1/4: a logit error relative to the logits' scale, seen through the sigmoid.
            scale = max(scale, float(np.max(np.abs(np.asarray(expected["logits"], np.float64)))) / 4)
        absolute[name] = err
        rel[name] = err / scale if scale > 0 else err
        if not np.all(np.isfinite(a)):
            rel[name] = float("nan")
    return ParityReport(relative=rel, absolute=absolute, num_images=num_images, tolerance=tolerance)


def check_parity(
    onnx_path: pathlib.Path | str,
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    output_names: Sequence[str],
    images: np.ndarray,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    display_path: pathlib.Path | str | None = None,
) -> ParityReport:
    """Compare model.onnx with ``reference`` (uint8 NHWC batch -> {output name: array}).

    ``reference`` may return more than ``output_names`` (``logits`` sets the probabilities'
    scale, see the module docstring); only ``output_names`` are compared. ``display_path`` is the
    name used in the error message (the export target, when ``onnx_path`` is its temp file).

    Raises ModelError naming the file and the measured errors when any output is off by more
    than ``tolerance`` (relative); returns the report otherwise.
    """
    images = np.ascontiguousarray(images, dtype=np.uint8)
    got = onnx_outputs(onnx_path, images)
    want = jax_outputs(reference, images)
    report = compare(got, want, output_names, tolerance, len(images))
    logger.info("parity %s", report.describe())
    if not report.ok:
        raise ModelError(
            f"ONNX export parity check failed for {display_path or onnx_path}: {report.describe()}; "
            "the exported graph does not compute what the JAX model computes (this is a bug in the exporter "
            "or an unsupported model change), so no model file was written"
        )
    return report


def reference_evaluator_outputs(path: pathlib.Path | str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of onnx.reference.ReferenceEvaluator (the spec's own interpreter; slow, small inputs)."""
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(str(path))
    values = ev.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})
    return dict(zip(ev.output_names, values))
