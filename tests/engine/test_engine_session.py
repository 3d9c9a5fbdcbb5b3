"""ModelSession: metadata validation, provider choice, thread settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imat.engine.session import ModelSession, choose_providers, default_intra_op_threads
from imat.errors import ModelError


def test_reads_metadata_and_runs(tiny_model):
    s = ModelSession(tiny_model, decode_threads=1)
    m = s.metadata
    assert (m.image_size, m.embedding_dim, m.resize_mode, m.objective) == (32, 16, "stretch", "bce")
    assert len(m.category_names) == 46 and len(m.fingerprint) == 64
    assert s.provider == "CPUExecutionProvider" and s.has_probabilities
    out = s.run(np.zeros((3, 32, 32, 3), np.uint8) + 7)
    assert out["embedding"].shape == (3, 16) and out["probabilities"].shape == (3, 46)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1.0, rtol=1e-5)


def test_missing_model_names_the_file(tmp_path):
    with pytest.raises(ModelError, match="nope.onnx: model file not found"):
        ModelSession(tmp_path / "nope.onnx")


def test_corrupt_model_names_the_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelError, match="model.onnx: cannot load the ONNX model"):
        ModelSession(bad)


def test_model_without_imat_metadata_is_refused(tmp_path, make_model):
    path = make_model(tmp_path / "m.onnx", drop_keys=("fingerprint", "image_size"))
    with pytest.raises(ModelError, match=r"m.onnx: not an imat model .*image_size, fingerprint"):
        ModelSession(path)


def _edit_metadata(path, **change):
    """Rewrite metadata_props of a real model.onnx (as a hand-edited or tampered file would be)."""
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update(change)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        ({"image_size": "64"}, r"m.onnx: metadata 'image_size' is 64 but the graph input 'images' has height 32"),
        ({"embedding_dim": "8"}, r"m.onnx: metadata 'embedding_dim' gives 8 but the graph output 'embedding' has "
                                 r"last dimension 16"),
        ({"category_names": json.dumps(["a", "b"])},
         r"m.onnx: metadata 'category_names' gives 2 names but the graph output 'probabilities' has last dimension 46"),
    ],
)
def test_metadata_disagreeing_with_the_graph_is_refused_on_open(tmp_path, make_model, change, message):
    path = _edit_metadata(make_model(tmp_path / "m.onnx"), **change)
    with pytest.raises(ModelError, match=message):
        ModelSession(path)


def test_bad_metadata_value_in_a_real_file_names_file_and_key(tmp_path, make_model):
    path = _edit_metadata(make_model(tmp_path / "m.onnx"), resize_mode="squash")
    with pytest.raises(ModelError, match=r"m.onnx: metadata 'resize_mode' is 'squash'"):
        ModelSession(path)


def test_metadata_listing_probabilities_needs_the_output(tmp_path, make_model):
    path = make_model(tmp_path / "m.onnx", probabilities=False,
                      metadata={"outputs": json.dumps(["embedding", "probabilities"])})
    with pytest.raises(ModelError, match="no such output"):
        ModelSession(path)


def test_provider_choice_falls_back_to_cpu_and_honours_requests():
    import onnxruntime as ort

    providers, why = choose_providers()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers[0] == "CUDAExecutionProvider"
    else:
        assert providers == ["CPUExecutionProvider"] and "not available" in why
    assert choose_providers(["CPUExecutionProvider"])[0] == ["CPUExecutionProvider"]
    with pytest.raises(ModelError, match="none of the requested"):
        choose_providers(["NoSuchExecutionProvider"])


def test_thread_defaults_share_the_cores():
    assert default_intra_op_threads(2, cores=8) == 6
    assert default_intra_op_threads(8, cores=8) == 1
    assert default_intra_op_threads(0, cores=4) == 4
