"""The torch-free predictor the service answers with: the packaged ONNX graph predicts and explains
what the torch model does, and a process that serves it never imports torch or pandas."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.model import bundle, cam, explain, inference, onnx, runtime
from tests.registry_fixtures import PROJECT_ROOT, write_model_dir

pytestmark = pytest.mark.skipif(not onnx.onnx_available(), reason="onnxruntime/onnx not installed")

META = {
    "age": [40.0, None, 70.0, 15.0, None],
    "sex": ["male", "female", None, "male", "female"],
    "localization": ["back", "face", "unknown", None, "foot"],
}


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # landscape and portrait images (a portrait one is turned to fit the model, and back for its map)
    return [rng.integers(0, 256, (150 + 40 * i, 220 - 30 * i, 3), dtype=np.uint8) for i in range(n)]


def _packaged(tmp_path, **kwargs):
    model_dir = write_model_dir(tmp_path / "m", **kwargs)
    info = inference.write_onnx(model_dir)
    return model_dir, info


@pytest.mark.parametrize(
    ("backbone", "fusion", "tta"),
    [("small_cnn", False, False), ("small_cnn", True, True), ("efficientnet_lite0", True, False)],
)
def test_the_packaged_graph_predicts_what_the_torch_model_predicts(tmp_path, backbone, fusion, tta):
    model_dir, info = _packaged(tmp_path, backbone=backbone, metadata_fusion=fusion, tta=tta)
    assert (
        info["outputs"] == ["logits", "embeddings", "cams", "blocks"]
        and info["checked_difference"] <= inference.ONNX_TOLERANCE
    )
    served = runtime.load_packaged(model_dir)
    reference = inference.load_model(model_dir, device="cpu", engine="torch")
    assert isinstance(served, runtime.OnnxPredictor) and served.engine == "onnx"
    imgs = _images(5)
    a = reference.predict(imgs, metadata=META, batch_size=2)
    b = served.predict(imgs, metadata=META, batch_size=3)
    for key in ("dx_probs", "risk_probs", "binary_probs", "p_malignant", "embeddings", "native_probs_uncalibrated"):
        np.testing.assert_allclose(b[key], a[key], atol=1e-5, err_msg=key)
    assert b["embeddings"].shape == (5, reference.model.embedding_dim) == (5, served.embedding_dim)


def test_the_multi_layer_ood_score_is_the_same_through_the_graph_and_torch(tmp_path):
    """The multi-layer OOD score needs the pooled block outputs: the packaged graph gives them
    (output ``blocks``), and the service's ONNX predictor scores and flags as torch does."""
    from pipeline.core import images

    rows = pd.read_csv(PROJECT_ROOT / "data" / "HAM10000_metadata.csv").sample(60, random_state=1)
    rgb = [images.decode_rgb(PROJECT_ROOT / "data" / "images" / f"{i}.jpg") for i in rows["image_id"]]
    model_dir, info = _packaged(
        tmp_path, backbone="efficientnet_lite0", trust_images=rgb, trust_labels=list(rows["dx"])
    )
    served = runtime.load_packaged(model_dir)
    reference = inference.load_model(model_dir, device="cpu", engine="torch")
    assert served.ood.method == "mahalanobis_layers" and "blocks" in info["outputs"]
    probe = rgb[:4] + _images(4)
    a, b = reference.predict(probe), served.predict(probe)
    np.testing.assert_allclose(b["blocks"], a["blocks"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(b["ood_score"], a["ood_score"], rtol=1e-3, atol=1e-2)
    assert (b["in_distribution"] == a["in_distribution"]).all() and not a["in_distribution"][4:].any()


@pytest.mark.parametrize("backbone", ["small_cnn", "efficientnet_lite0"])
def test_cam_from_the_graph_equals_grad_cam_of_the_torch_model(tmp_path, backbone):
    """Global average pooling + a linear head: Grad-CAM of the last feature map is CAM (pipeline.model.cam)."""
    model_dir, _ = _packaged(tmp_path, backbone=backbone, metadata_fusion=True)
    served = runtime.load_packaged(model_dir)
    reference = inference.load_model(model_dir, device="cpu", engine="torch")
    peaks = []
    for rgb, i in zip(_images(3, seed=4), range(3)):
        one = {k: [v[i]] for k, v in META.items()}
        heat, target = served.explain(rgb, metadata=one)
        expected_target = int(np.argmax(reference.predict([rgb], metadata=one)["native_probs"][0]))
        grad = explain.gradcam(reference, rgb, target_class=expected_target, metadata=one)
        assert target == expected_target and heat.shape == rgb.shape[:2] and heat.dtype == np.float32
        np.testing.assert_allclose(heat, grad, atol=2e-3)
        peaks.append(float(heat.max()))
    assert max(peaks) > 0.5  # real maps, not blank ones (an untrained model may give one blank map)


def test_a_graph_that_disagrees_is_not_packaged(tmp_path, monkeypatch):
    model_dir = write_model_dir(tmp_path / "m")
    monkeypatch.setattr(inference, "ONNX_TOLERANCE", -1.0)  # no graph can agree this well
    with pytest.raises(bundle.ModelLoadError, match="disagrees with the torch model"):
        inference.write_onnx(model_dir)
    assert not (model_dir / bundle.ONNX_FILE).exists()


def test_the_service_falls_back_to_torch_only_without_a_graph_or_when_told(tmp_path):
    from pipeline.model.engines import load_predictor

    packaged, _ = _packaged(tmp_path / "p")
    assert isinstance(load_predictor(packaged), runtime.OnnxPredictor)
    assert load_predictor(packaged, engine="torch").engine == "torch"
    assert isinstance(load_predictor(write_model_dir(tmp_path / "m")), inference.Predictor)
    with pytest.raises(bundle.ModelLoadError, match="model.onnx: missing"):
        runtime.load_packaged(tmp_path / "m")


def test_a_packaged_graph_altered_afterwards_is_refused(tmp_path):
    from pipeline.model.bundle import write_metadata

    packaged, info = _packaged(tmp_path / "p")
    write_metadata(packaged, name="lesionflow", tag="lesionflow:test", lineage={}, engines={"onnx": info})
    graph = packaged / bundle.ONNX_FILE
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(bundle.ModelLoadError, match="model.onnx: differs from the file packaged"):
        runtime.load_packaged(packaged)


def test_overlay_uses_matplotlibs_jet_colour_map():
    from matplotlib import colormaps

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    heat = rng.random((30, 40)).astype(np.float32)
    heat[0, :3] = (0.0, 1.0, 0.999)
    expected = (1.0 - 0.4) * rgb.astype(np.float32) + 0.4 * colormaps["jet"](heat)[..., :3] * 255.0
    got = cam.overlay(rgb, heat).astype(int)
    # the same 256-level table (to 1e-15), so at most one level apart where a value rounds either way
    assert np.abs(got - np.clip(expected, 0, 255).astype(np.uint8)).max() <= 1


def test_the_service_process_never_imports_torch_or_pandas(tmp_path):
    model_dir, _ = _packaged(tmp_path, metadata_fusion=True)
    code = f"""
import json, sys
import numpy as np
import pipeline.serving.service  # the service module and all it imports at start
from pipeline.model.runtime import load_packaged
p = load_packaged({str(model_dir)!r})
rgb = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)
out = p.predict([rgb], metadata={{"age": [50], "sex": ["male"], "localization": ["back"]}})
heat, target = p.explain(rgb)
heavy = ("torch", "pandas", "scipy", "sklearn", "matplotlib")
print(json.dumps({{"engine": p.engine, "shape": list(heat.shape), "loaded": [m for m in heavy if m in sys.modules]}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"engine": "onnx", "shape": [90, 120], "loaded": []}


def test_the_grad_cam_process_explains_with_either_engine_alike(tmp_path):
    """The service's Grad-CAM process (pipeline.serving.explainer): an overlay PNG of the image's own
    size and the class it explains, the same class and nearly the same overlay from the ONNX
    graph's CAM as from torch's Grad-CAM, computed in a child process that ends when closed."""
    import io

    from PIL import Image

    from pipeline.serving.explainer import Explainer

    model_dir, _ = _packaged(tmp_path, metadata_fusion=True)
    rgb = _images(1, seed=7)[0]
    one = {k: [v[0]] for k, v in META.items()}
    answers, children = {}, []
    for engine in ("auto", "torch"):
        explainer = Explainer(model_dir, engine)
        try:
            png, target = explainer.overlay(rgb, one)
            children += explainer.pids
        finally:
            explainer.close()
        overlay = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert overlay.shape == rgb.shape and explainer.pids == []
        answers[engine] = (overlay.astype(int), target)
    assert answers["auto"][1] == answers["torch"][1]
    # heatmaps within 2e-3 (the test above), blended and rounded to uint8: at most a step or two
    assert np.abs(answers["auto"][0] - answers["torch"][0]).max() <= 2
    assert len(set(children)) == 2 and os.getpid() not in children
