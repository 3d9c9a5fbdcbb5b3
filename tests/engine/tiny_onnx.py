"""A tiny contract-conforming model.onnx built with onnx.helper, and small photo folders (test helpers).

The model follows the export contract exactly (input `images` uint8 [batch,H,W,3] with a dynamic
batch; outputs `embedding` float32 [batch,D] L2-normalised and `probabilities` float32 [batch,46];
metadata_props with every contract key; fingerprint = sha256 of the initializers), so the engine is
tested against the same interface the real exported model provides:

    Cast -> Div 255 -> Sub 0.5 -> Transpose NCHW -> AveragePool (size/8) -> Flatten -> MatMul(W) -> x / ||x||
                                                                                   -> MatMul(Wp) -> Sigmoid
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
from PIL import Image

from imat import __version__
from imat.constants import NUM_CATEGORIES
from imat.data_tools.labels import LabelSpace

POOLED = 8  # the model averages the image down to 8x8x3 = 192 features


def build_tiny_model(
    path,
    *,
    image_size: int = 32,
    dim: int = 16,
    seed: int = 0,
    probabilities: bool = True,
    metadata: dict | None = None,
    drop_keys: tuple[str, ...] = (),
) -> pathlib.Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    assert image_size % POOLED == 0
    rng = np.random.default_rng(seed)
    feats = 3 * POOLED * POOLED
    # Centre the pooled pixels (subtract 0.5) so the embedding direction depends on the image content.
    w = rng.standard_normal((feats, dim)).astype(np.float32)
    wp = (rng.standard_normal((feats, NUM_CATEGORIES)) * 0.3).astype(np.float32)
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
        numpy_helper.from_array(np.array(0.5, np.float32), "chalf"),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "eps"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["xf", "c255"], ["x01"]),
        helper.make_node("Sub", ["x01", "chalf"], ["xc"]),
        helper.make_node("Transpose", ["xc"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("AveragePool", ["nchw"], ["pooled"], kernel_shape=[image_size // POOLED] * 2,
                         strides=[image_size // POOLED] * 2),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["raw"]),
        helper.make_node("ReduceL2", ["raw"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["norm_safe"]),
        helper.make_node("Div", ["raw", "norm_safe"], ["embedding"]),
    ]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])]
    if probabilities:
        inits.append(numpy_helper.from_array(wp, "Wp"))
        nodes += [
            helper.make_node("MatMul", ["flat", "Wp"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
        ]
        outputs.append(helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", NUM_CATEGORIES]))
    graph = helper.make_graph(
        nodes,
        "imat_tiny_test_model",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", image_size, image_size, 3])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="imat-tests")
    model.ir_version = 8
    fingerprint = hashlib.sha256(b"".join(numpy_helper.to_array(t).tobytes() for t in inits)).hexdigest()
    props = {
        "imat_version": __version__,
        "architecture": "tiny_test_pool_projection",
        "objective": "bce",
        "image_size": str(image_size),
        "resize_mode": "stretch",
        "embedding_dim": str(dim),
        "category_names": json.dumps(list(LabelSpace.default().category_names)),
        "fingerprint": fingerprint,
        "outputs": json.dumps(["embedding", "probabilities"] if probabilities else ["embedding"]),
    }
    props.update(metadata or {})
    for key in drop_keys:
        props.pop(key, None)
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_photos(folder, n: int, *, seed: int = 0, size=(48, 40)) -> list[pathlib.Path]:
    """n small JPEGs with distinct colour blocks (so their embeddings differ)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = size
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        for _ in range(3):
            y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
            img[y0 : y0 + h // 2, x0 : x0 + w // 2] = rng.integers(0, 256, 3)
        p = folder / f"img_{i:03d}.jpg"
        Image.fromarray(img).save(p, quality=95)
        paths.append(p)
    return paths
