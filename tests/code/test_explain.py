"""pipeline.model.explain: Grad-CAM at the image's own size, overlays, metadata attribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.model import explain


class TinyCNN(nn.Module):
    def __init__(self, k: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(8, k)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _parts(model: nn.Module, size=(24, 32)) -> explain.ExplainParts:
    def to_tensor(rgb):
        x = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1).float()[None] / 255.0
        return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return explain.ExplainParts(model, model.features[2], to_tensor, input_size=size)


def _image(h=150, w=200, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    img[h // 4 : h // 2, w // 2 : 3 * w // 4] = 230  # a bright blob
    return img


@pytest.mark.parametrize("shape", [(150, 200), (450, 600), (200, 150), (64, 64)])
def test_gradcam_heatmap_has_the_image_size_and_finite_values(shape):
    torch.manual_seed(0)
    heat = explain.gradcam(_parts(TinyCNN()), _image(*shape), target_class=1)
    assert heat.shape == shape
    assert heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


def test_gradcam_default_target_is_the_predicted_class_and_restores_train_mode():
    torch.manual_seed(1)
    model = TinyCNN()
    model.train()
    parts = _parts(model)
    img = _image()
    with torch.no_grad():
        model.eval()
        pred = int(model(parts.to_tensor(img)).argmax(1)[0])
        model.train()
    assert np.allclose(explain.gradcam(parts, img), explain.gradcam(parts, img, target_class=pred))
    assert model.training


def test_gradcam_on_a_lesionflow_predictor_with_metadata_fusion():
    from pipeline.core import params
    from pipeline.core.taxonomy import Taxonomy
    from pipeline.model import classifier, inference
    from pipeline.model.metadata import MetadataEncoder

    torch.manual_seed(0)
    enc = MetadataEncoder.from_params(params.load_section("metadata"))
    model = classifier.build_model("small_cnn", 7, input_size=(32, 48), metadata=enc)
    tax = Taxonomy.default()
    cfg = {
        "architecture": classifier.architecture("small_cnn", 7, (32, 48), 0.0, enc),
        "taxonomy": tax.to_dict(),
        "target_level": "dx",
        "classes": list(tax.diagnoses),
        "preprocessing": {"input_size": [32, 48], "mean": [0.5] * 3, "std": [0.25] * 3},
    }
    predictor = inference.Predictor(model, cfg, "cpu")
    img = _image()
    meta = {"age": [55.0], "sex": ["female"], "localization": ["back"]}
    heat = explain.gradcam(predictor, img, metadata=meta)
    assert heat.shape == img.shape[:2] and np.isfinite(heat).all()
    portrait = _image(200, 150)
    assert explain.gradcam(predictor, portrait).shape == (200, 150)

    # integrated gradients: attributions add up to p(x, m) - p(x, all missing)
    imgs = [_image(seed=s) for s in range(3)]
    frame = {"age": [30.0, 70.0, None], "sex": ["male", "female", "unknown"], "localization": ["face", "back", "foot"]}
    targets = [4, 5, 0]
    attr = explain.metadata_attribution(predictor, imgs, frame, targets, steps=64)
    assert attr.shape == (3, enc.dim)
    p_full = predictor.predict(imgs, metadata=frame)["dx_probs"]
    p_base = predictor.predict(imgs, metadata=None)["dx_probs"]
    expected = p_full[np.arange(3), targets] - p_base[np.arange(3), targets]
    assert attr.sum(axis=1) == pytest.approx(expected, abs=2e-3)
    by_field = explain.attribution_by_field(attr, explain.explain_parts(predictor).metadata_fields)
    assert set(by_field) == {"age", "sex", "localization"}


def test_metadata_attribution_is_none_without_fusion():
    assert explain.metadata_attribution(_parts(TinyCNN()), [_image()], None, [0]) is None


def test_overlay_is_uint8_rgb_of_the_image_size():
    img = _image()
    heat = np.zeros(img.shape[:2], dtype=np.float32)
    heat[:10, :10] = 1.0
    out = explain.overlay(img, heat, alpha=0.5)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out[:10, :10], img[:10, :10])
    small = explain.overlay(img, heat[::3, ::3])  # another size is resized
    assert small.shape == img.shape
