"""The inference engines: ONNX Runtime (the CPU default) predicts what the torch model predicts,
for plain, fusion and TTA models, and a graph that disagrees is never used."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.model import inference
from tests.registry_fixtures import write_model_dir

pytestmark = pytest.mark.skipif(not inference.onnx_available(), reason="onnxruntime/onnx not installed")


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (150 + 7 * i, 200 - 5 * i, 3), dtype=np.uint8) for i in range(n)]


@pytest.mark.parametrize("fusion", [False, True])
@pytest.mark.parametrize("tta", [False, True])
def test_onnx_engine_matches_torch(tmp_path, fusion, tta):
    model_dir = write_model_dir(tmp_path / "m", metadata_fusion=fusion, tta=tta)
    torch_p = inference.load_model(model_dir, device="cpu", engine="torch")
    onnx_p = inference.load_model(model_dir, device="cpu", engine="onnx")
    assert (torch_p.engine, onnx_p.engine) == ("torch", "onnx")
    meta = pd.DataFrame(
        {
            "age": [40.0, None, 70.0, 15.0, None],
            "sex": ["male", "female", None, "male", "female"],
            "localization": ["back", "face", "unknown", None, "foot"],
        }
    )
    imgs = _images(5)
    a = torch_p.predict(imgs, metadata=meta, batch_size=2)  # batch sizes other than the probe's
    b = onnx_p.predict(imgs, metadata=meta, batch_size=3)
    for key in ("dx_probs", "risk_probs", "binary_probs", "p_malignant", "embeddings"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)
    np.testing.assert_allclose(b["dx_probs"].sum(1), 1.0, atol=1e-6)


def test_tta_averages_the_four_flips(tmp_path):
    """TTA (one forward pass over every view) = the mean of the four flipped views' predictions."""
    model_dir = write_model_dir(tmp_path / "m", tta=True)
    p = inference.load_model(model_dir, device="cpu", engine="torch")
    u8 = p.resize(_images(3, seed=1))
    views = [u8, u8.flip(3), u8.flip(2), u8.flip(2).flip(3)]
    mean = np.mean([p.predict(v, tta=False)["native_probs"] for v in views], axis=0)
    np.testing.assert_allclose(p.predict(u8)["native_probs"], mean, atol=1e-6)
    assert p.default_tta is True


def test_auto_prefers_onnx_on_cpu_and_falls_back_to_torch(tmp_path, monkeypatch):
    model_dir = write_model_dir(tmp_path / "m")
    assert inference.load_model(model_dir, device="cpu").engine == "onnx"
    monkeypatch.setattr(inference, "onnx_available", lambda: False)
    assert inference.load_model(model_dir, device="cpu").engine == "torch"


def test_a_graph_that_disagrees_is_refused(tmp_path, monkeypatch, caplog):
    model_dir = write_model_dir(tmp_path / "m")
    monkeypatch.setattr(inference, "ONNX_TOLERANCE", -1.0)  # no graph can agree this well
    with pytest.raises(inference.ModelLoadError, match="disagrees with the torch model"):
        inference.load_model(model_dir, device="cpu", engine="onnx")
    with caplog.at_level("WARNING", logger="lesionflow.inference"):
        p = inference.load_model(model_dir, device="cpu", engine="auto")
    assert p.engine == "torch" and "predicting with torch" in caplog.text


def test_unknown_engine_is_named(tmp_path):
    model_dir = write_model_dir(tmp_path / "m")
    with pytest.raises(ValueError, match="engine: expected one of auto, torch, onnx, got 'tensorrt'"):
        inference.load_model(model_dir, device="cpu", engine="tensorrt")


def test_clone_for_explanations_is_independent(tmp_path):
    model_dir = write_model_dir(tmp_path / "m")
    p = inference.load_model(model_dir, device="cpu")
    c = p.clone()
    assert c.engine == "torch" and c.model is not p.model
    imgs = _images(2)
    np.testing.assert_allclose(c.predict(imgs)["native_probs"], p.predict(imgs)["native_probs"], atol=1e-5)
