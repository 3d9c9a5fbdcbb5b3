"""Exported ResNet18 and MobileNetV2 compute torchvision's logits (reference fixtures made with torch).

This closes the loop independently of the JAX model: torchvision weights -> imat (pretrained.py)
-> model.onnx -> ONNX Runtime must equal torch's own outputs on the same uint8 images.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from flax import nnx
from safetensors.numpy import load_file

from imat.export.onnx_export import export_onnx_report


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_exported_model_matches_torchvision(tmp_path, torchvision_ref, arch):
    from imat.train_jax.models import create_model

    model = create_model(arch, num_classes=1000, pretrained=torchvision_ref / f"{arch}_random.safetensors",
                         rngs=nnx.Rngs(0))
    expected = load_file(str(torchvision_ref / f"{arch}_expected.safetensors"))
    images = expected["images_uint8_nhwc"]
    report = export_onnx_report(
        model, tmp_path / f"{arch}.onnx", image_size=images.shape[1], objective="bce",
        category_names=[f"class_{i}" for i in range(1000)], include_logits=True, validation_images=images,
    )
    assert report.parity.max_relative < 1e-4, report.parity.describe()

    sess = ort.InferenceSession(str(report.path), providers=["CPUExecutionProvider"])
    logits, probabilities = sess.run(["logits", "probabilities"], {"images": images})
    want = expected["logits"].astype(np.float64)
    rel = np.max(np.abs(logits - want)) / np.max(np.abs(want))
    assert rel < 1e-4, f"{arch}: ONNX vs torchvision logits relative error {rel:.2e}"
    np.testing.assert_allclose(probabilities, 1 / (1 + np.exp(-want)), atol=1e-5)
    # The same class ranking as torch (top-5 per image).
    np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :5], np.argsort(-want, axis=1)[:, :5])

    # Rotation-objective export: the embedding is torch's pooled features, L2-normalised.
    rot = export_onnx_report(model, tmp_path / f"{arch}_rot.onnx", image_size=images.shape[1], objective="rotation",
                             category_names=[])
    rot_sess = ort.InferenceSession(str(rot.path), providers=["CPUExecutionProvider"])
    (emb,) = rot_sess.run(["embedding"], {"images": images})
    pooled = expected["pooled"].astype(np.float64)
    want_emb = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert np.max(np.abs(emb - want_emb)) / np.max(np.abs(want_emb)) < 1e-4
