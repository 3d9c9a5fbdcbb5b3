"""③ export: a trained imat model (or a run's checkpoint) -> one validated model.onnx.

- ``graph.py``        a small ONNX graph builder (conv + folded BatchNorm, pools, dense, L2 norm, ...)
- ``translate.py``    walks an imat ResNet / MobileNetV2 and emits its graph from the parameters
- ``onnx_export.py``  ``export_onnx``, ``export_run``, ``read_metadata``: metadata, checker, atomic write
- ``validate.py``     the parity gate: ONNX Runtime vs the JAX model on the same images

The public functions are imported lazily so that ``import imat.export`` stays cheap.
"""

from __future__ import annotations

_PUBLIC = {
    "export_onnx": "imat.export.onnx_export",
    "export_onnx_report": "imat.export.onnx_export",
    "export_run": "imat.export.onnx_export",
    "export_run_report": "imat.export.onnx_export",
    "read_metadata": "imat.export.onnx_export",
    "check_parity": "imat.export.validate",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'imat.export' has no attribute {name!r}")
