"""export_onnx end to end on tiny models: outputs per objective, parity, checker, dynamic batch,
metadata, the gate refusing a wrong graph, and the spec's ReferenceEvaluator."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from imat.errors import ConfigError, ModelError
from imat.export import graph as graph_mod
from imat import contract
from imat.export.onnx_export import (
    export_onnx,
    export_onnx_report,
    jax_reference,
    read_metadata,
)
from imat.export.validate import check_parity, random_images, reference_evaluator_outputs
from imat.train_jax.objectives import get_objective, objective_names

SIZE = 32


def ort_run(path, images):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {"images": images})))


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# embedding width of resnet_tiny (embedding_dim=24) per embedding source
DIMS = {"embedding": 24, "pooled": 64, "probabilities": 46}
CASES = [(name, source) for name in objective_names() for source in get_objective(name).embedding_candidates()]


@pytest.mark.parametrize("objective,source", CASES)
def test_export_each_objective_and_embedding_source(tmp_path, make_model, category_names, objective, source):
    spec = get_objective(objective)
    outputs = ["embedding", "probabilities"] if spec.exports_probabilities else ["embedding"]
    dim = DIMS[source]
    model = make_model("resnet_tiny", embedding_dim=24, rotation_head=spec.rotation_head)
    out = tmp_path / "sub" / "model.onnx"
    report = export_onnx_report(model, out, image_size=SIZE, objective=objective, category_names=category_names,
                                embedding_source=None if source == spec.embedding_source else source,
                                extra_metadata={"run": "r1", "steps": 7})
    assert report.path == out and out.is_file()
    assert out.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["model.onnx"]  # no temp file, no external data
    assert report.parity is not None and report.parity.max_relative < 1e-5
    assert set(report.parity.relative) == set(outputs)

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=True, check_type=True)
    assert [i.name for i in proto.graph.input] == ["images"]
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", SIZE, SIZE, 3]
    assert [o.name for o in proto.graph.output] == outputs
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)

    meta = read_metadata(out)
    assert set(contract.REQUIRED_KEYS) | {"embedding_source"} <= {p.key for p in proto.metadata_props}
    assert meta.architecture == "resnet_tiny" and meta.objective == objective
    assert meta.image_size == SIZE and meta.resize_mode == "stretch"
    assert meta.embedding_dim == dim and meta.embedding_source == source
    assert list(meta.outputs) == outputs and list(meta.category_names) == category_names
    assert meta.fingerprint == report.fingerprint and len(meta.fingerprint) == 64
    assert meta.extra["run"] == "r1" and json.loads(meta.extra["steps"]) == 7
    # Independent of read_metadata: the raw strings the engine reads.
    raw = {p.key: p.value for p in proto.metadata_props}
    assert all(isinstance(v, str) for v in raw.values()) and raw["image_size"] == str(SIZE)

    # Dynamic batch; every output equals the JAX model's (eval mode) on the same images.
    # (eval-mode models treat every image independently, so one JAX batch serves all sizes)
    all_images = random_images(17, SIZE, seed=11)
    all_want = jax_reference(model, source, outputs)(all_images)
    for n in (1, 3, 17):
        images = all_images[-n:]  # includes the all-white image
        got, want = ort_run(out, images), {k: v[-n:] for k, v in all_want.items()}
        assert got["embedding"].shape == (n, dim)
        for name in outputs:
            assert got[name].dtype == np.float32
            assert rel_err(got[name], want[name]) < 1e-5, (name, n)
        np.testing.assert_allclose(np.linalg.norm(got["embedding"], axis=1), 1.0, rtol=1e-5)
        if "probabilities" in outputs:
            assert got["probabilities"].shape == (n, 46)
            assert np.all((got["probabilities"] >= 0) & (got["probabilities"] <= 1))


def test_rotation_embedding_is_normalised_pooled_features(tmp_path, make_model, category_names):
    import jax.numpy as jnp

    model = make_model("resnet_tiny", rotation_head=True)
    out = export_onnx(model, tmp_path / "m.onnx", image_size=SIZE, objective="rotation", category_names=category_names)
    images = random_images(4, SIZE, seed=3)
    model.eval()
    pooled = np.asarray(model(jnp.asarray(images))["pooled"], np.float64)
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert rel_err(ort_run(out, images)["embedding"], expected) < 1e-5


def test_export_does_not_change_the_callers_model_mode(tmp_path, make_model, category_names):
    model = make_model("resnet_tiny")  # created in train mode
    export_onnx(model, tmp_path / "m.onnx", image_size=SIZE, objective="bce", category_names=category_names)
    assert model.stem_bn.use_running_average is False


def test_reference_evaluator_matches_onnxruntime(tmp_path, make_model, category_names):
    model = make_model("resnet_tiny")
    out = export_onnx(model, tmp_path / "m.onnx", image_size=SIZE, objective="bce", category_names=category_names,
                      include_logits=True)
    images = random_images(2, SIZE, seed=5)
    got = reference_evaluator_outputs(out, images)
    want = ort_run(out, images)
    assert set(got) == {"embedding", "probabilities", "logits"}
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_gate_rejects_a_wrong_graph_and_leaves_target_untouched(tmp_path, make_model, category_names, monkeypatch):
    model = make_model("resnet_tiny")
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous model")
    original = graph_mod.GraphBuilder.conv
    calls = []

    def perturbed_conv(self, x, kernel_hwio, **kw):
        calls.append(kw["name"])
        if len(calls) == 3:  # one conv inside layer1: a 2% change of one weight tensor
            kernel_hwio = np.asarray(kernel_hwio) * 1.02
        return original(self, x, kernel_hwio, **kw)

    monkeypatch.setattr(graph_mod.GraphBuilder, "conv", perturbed_conv)
    with pytest.raises(ModelError, match=r"parity check failed.*embedding: rel \d"):
        export_onnx(model, out, image_size=SIZE, objective="bce", category_names=category_names)
    assert calls, "the builder was not used"
    assert out.read_bytes() == b"previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # temp file removed


def test_gate_rejects_a_tampered_file(tmp_path, make_model, category_names):
    model = make_model("resnet_tiny")
    out = export_onnx(model, tmp_path / "m.onnx", image_size=SIZE, objective="bce", category_names=category_names)
    proto = onnx.load(str(out))
    init = proto.graph.initializer
    idx = next(i for i, t in enumerate(init) if t.name.startswith("layer2.0.conv2.weight"))
    w = onnx.numpy_helper.to_array(init[idx]).copy()
    w.flat[0] += 0.5
    init[idx].CopyFrom(onnx.numpy_helper.from_array(w, init[idx].name))
    bad = tmp_path / "bad.onnx"
    onnx.save_model(proto, str(bad))
    images = random_images(4, SIZE)
    ref = jax_reference(model, "probabilities", ["embedding", "probabilities"])
    with pytest.raises(ModelError, match="parity check failed"):
        check_parity(bad, ref, ["embedding", "probabilities"], images)
    assert check_parity(out, ref, ["embedding", "probabilities"], images).max_relative < 1e-5


def test_mobilenet_v2_width_mult_both_depthwise_formulations(tmp_path, make_model, category_names):
    from imat.train_jax.models import set_depthwise

    model = make_model("mobilenet_v2", width_mult=0.35, depthwise="shifted", seed=2)
    for depthwise in ("shifted", "grouped"):
        set_depthwise(model, depthwise)  # same parameters, other JAX formulation
        assert model.features[0].dw_conv.impl == depthwise
        report = export_onnx_report(model, tmp_path / f"{depthwise}.onnx", image_size=SIZE, objective="bce",
                                    category_names=category_names)
        assert report.parity.max_relative < 1e-5, report.parity.describe()
        proto = onnx.load(str(report.path))
        groups = [a.i for n in proto.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
        assert sum(g > 1 for g in groups) == 17  # one depthwise conv per inverted residual block
        assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded


def test_real_photos_in_the_parity_gate(tmp_path, make_model, category_names, real_smoke):
    images = _decode_real(sorted((real_smoke / "train").glob("*.jpg"))[:3], 64)
    model = make_model("resnet_tiny")
    report = export_onnx_report(model, tmp_path / "m.onnx", image_size=64, objective="bce",
                                category_names=category_names, validation_images=images)
    assert report.parity.num_images == len(images) + 6
    assert report.parity.max_relative < 1e-5
    with pytest.raises(ConfigError, match="validation images"):
        export_onnx(model, tmp_path / "n.onnx", image_size=32, objective="bce", category_names=category_names,
                    validation_images=images)


def _decode_real(paths: list[pathlib.Path], size: int) -> np.ndarray:
    try:
        from imat.data_tools.images import decode_image
    except ImportError:  # the shared decoder is not there yet: PIL directly
        from PIL import Image

        def decode_image(p, size):
            with Image.open(p) as im:
                return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))

    return np.stack([decode_image(p, size) for p in paths]).astype(np.uint8)


@pytest.mark.slow
def test_resnet50_builds_and_matches_jax(tmp_path):
    from export_helpers import random_resnet

    model = random_resnet("resnet50", num_classes=5)
    # The pooled features as the embedding: random-weight logits in the thousands saturate the
    # sigmoid, which would make a probabilities embedding a test of float32 sigmoid, not of the graph.
    report = export_onnx_report(model, tmp_path / "r50.onnx", image_size=32, objective="bce",
                                embedding_source="pooled", category_names=list("abcde"), include_logits=True)
    assert report.parity.max_relative < 1e-4, report.parity.describe()
    # Random He-init weights through 16 bottlenecks give logits in the thousands: the case where
    # probabilities are judged on the logits' scale (validate.compare) rather than on 1.
    assert report.parity.relative["logits"] < 1e-5
    assert report.size_bytes > 90e6  # one file, weights inside


def test_user_mistakes_are_clear_errors(tmp_path, make_model, category_names):
    model = make_model("resnet_tiny")
    kw = dict(image_size=SIZE, category_names=category_names)
    with pytest.raises(ConfigError, match="objective 'softmax'"):
        export_onnx(model, tmp_path / "m.onnx", objective="softmax", **kw)
    with pytest.raises(ConfigError, match="resize_mode"):
        export_onnx(model, tmp_path / "m.onnx", objective="bce", resize_mode="squash", **kw)
    with pytest.raises(ConfigError, match="'embedding' is not trained by objective 'bce'"):
        export_onnx(model, tmp_path / "m.onnx", objective="bce", embedding_source="embedding", **kw)
    with pytest.raises(ConfigError, match="46 outputs"):
        export_onnx(model, tmp_path / "m.onnx", objective="bce", image_size=SIZE, category_names=["a", "b"])
    with pytest.raises(ConfigError, match="reserved"):
        export_onnx(model, tmp_path / "m.onnx", objective="bce", extra_metadata={"fingerprint": "x"}, **kw)
    with pytest.raises(ConfigError, match="is a directory"):
        export_onnx(model, tmp_path, objective="bce", **kw)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="cannot write the model"):
        export_onnx(model, tmp_path / "afile" / "m.onnx", objective="bce", **kw)
    with pytest.raises(ModelError, match="no such ONNX"):
        read_metadata(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not protobuf")
    with pytest.raises(ModelError, match="junk.onnx"):
        read_metadata(tmp_path / "junk.onnx")


def test_fingerprint_depends_on_weights_only(tmp_path, make_model, category_names):
    a = export_onnx_report(make_model(seed=0), tmp_path / "a.onnx", image_size=SIZE, objective="bce",
                           category_names=category_names, extra_metadata={"note": "x"})
    b = export_onnx_report(make_model(seed=0), tmp_path / "b.onnx", image_size=SIZE, objective="bce",
                           category_names=category_names)
    c = export_onnx_report(make_model(seed=1), tmp_path / "c.onnx", image_size=SIZE, objective="bce",
                           category_names=category_names)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_batchnorm_kept_as_nodes_gives_the_same_model(tmp_path, make_model, category_names):
    model = make_model("resnet_tiny", seed=4)
    kw = dict(image_size=SIZE, objective="bce", category_names=category_names)
    folded = export_onnx_report(model, tmp_path / "folded.onnx", **kw)
    kept = export_onnx_report(model, tmp_path / "kept.onnx", fold_batchnorm=False, **kw)
    assert kept.parity.max_relative < 1e-5, kept.parity.describe()
    ops = [n.op_type for n in onnx.load(str(kept.path)).graph.node]
    assert ops.count("BatchNormalization") == ops.count("Conv")
    assert kept.fingerprint != folded.fingerprint  # different initializers, different file identity
    images = random_images(5, SIZE, seed=9)
    a, b = ort_run(folded.path, images), ort_run(kept.path, images)
    for name in a:
        assert rel_err(a[name], b[name]) < 1e-5


@pytest.mark.parametrize("arch", ["resnet_tiny", "mobilenet_v2"])
def test_input_pool_is_exported_and_matches_jax(tmp_path, make_model, category_names, arch):
    kwargs = {"width_mult": 0.35} if arch == "mobilenet_v2" else {}
    model = make_model(arch, input_pool=2, **kwargs)
    assert model.config["input_pool"] == 2
    report = export_onnx_report(model, tmp_path / "m.onnx", image_size=SIZE, objective="bce",
                                category_names=category_names)
    assert report.parity.max_relative < 1e-5, report.parity.describe()
    proto = onnx.load(str(tmp_path / "m.onnx"))
    pools = [n for n in proto.graph.node if n.op_type == "AveragePool"]
    assert len(pools) == 1 and [a.ints for a in pools[0].attribute if a.name == "strides"] == [[2, 2]]
    # The network really sees the block average: a 2x2-constant image gives the same output as its 1/2 copy
    # fed to the same weights without pooling.
    small = make_model(arch, input_pool=1, **kwargs)
    images = random_images(3, SIZE // 2, seed=4)
    big = images.repeat(2, axis=1).repeat(2, axis=2)
    a = jax_reference(model, "probabilities", ["embedding", "probabilities"])(big)
    b = jax_reference(small, "probabilities", ["embedding", "probabilities"])(images)
    np.testing.assert_allclose(a["probabilities"], b["probabilities"], rtol=1e-4, atol=1e-5)
