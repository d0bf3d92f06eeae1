"""Units of the train stage's libraries: imbalance handling, schedule, sharding, augmentation,
metadata fusion, derived probabilities, the model registry and the train params."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.core import images, params
from pipeline.core.taxonomy import Taxonomy
from pipeline.model import backbones, classifier, datapath, fitting, inference, training
from pipeline.model.augment import GpuAugment
from pipeline.model.metadata import MetadataEncoder

TAX = Taxonomy.default()
ENCODER = MetadataEncoder.from_params(params.load_section("metadata"))


# -- class imbalance ------------------------------------------------------------------------------


def test_class_weights_follow_inverse_counts_with_the_configured_power():
    counts = np.array([400, 100, 25, 0])
    for power in (0.5, 1.0):
        w = training.class_weights(counts, power)
        assert w[3] == 0.0  # absent class
        # ratio of weights = inverse ratio of counts to the power
        assert w[1] / w[0] == pytest.approx((400 / 100) ** power)
        assert w[2] / w[0] == pytest.approx((400 / 25) ** power)
        # mean weight over the training samples is 1 (the loss keeps its scale)
        assert (w * counts).sum() / counts.sum() == pytest.approx(1.0)
    assert np.allclose(training.class_weights(counts[:3], 0.0), 1.0)


def test_weighted_sampler_draws_minority_classes_at_the_configured_rate():
    labels = np.repeat([0, 1, 2], [900, 90, 10])
    for power in (1.0, 0.5):
        w = training.sampler_weights(labels, 3, power)
        expected = training.expected_class_rates([900, 90, 10], power)
        draws = np.concatenate([labels[training.epoch_order(len(labels), e, 0, w).numpy()] for e in range(20)])
        rates = np.bincount(draws, minlength=3) / len(draws)
        assert rates == pytest.approx(expected, abs=0.02)
    # power 1: balanced classes; the natural rate of the rarest class is 1 %
    assert training.expected_class_rates([900, 90, 10], 1.0) == pytest.approx([1 / 3] * 3)


def test_epoch_order_is_a_seeded_permutation():
    a, b = training.epoch_order(50, 1, 7, None), training.epoch_order(50, 1, 7, None)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(50))
    assert not torch.equal(a, training.epoch_order(50, 2, 7, None))


def test_lr_schedule_warms_up_then_decays_to_the_minimum():
    lrs = [training.lr_lambda(s, 100, 10, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.01, abs=0.01)


# -- sharding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch,world", [(103, 16, 2), (64, 8, 4), (10, 4, 1)])
def test_rank_shards_are_disjoint_and_cover_each_global_batch(n, batch, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    per_rank = [list(datapath.rank_batches(order, batch, r, world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of steps on every rank
    for step in range(len(per_rank[0])):
        g = per_rank[0][step][0]
        parts = [per_rank[r][step][1] for r in range(world)]
        assert len({p.numel() for p in parts}) == 1  # equal local batches
        assert sorted(torch.cat(parts).tolist()) == sorted(g.tolist())
    positions = [sum(b[1].numel() for b in per_rank[r]) for r in range(world)]
    assert sum(positions) == math.ceil(n / world) * world
    covered = set(torch.cat([b[1] for r in range(world) for b in per_rank[r]]).tolist())
    assert covered == set(range(n))


# -- augmentation -----------------------------------------------------------------------------------


def test_augmentation_keeps_shape_and_is_identity_with_neutral_parameters():
    x = torch.randint(0, 256, (4, 3, 30, 40), dtype=torch.uint8)
    aug = GpuAugment(params.AugmentParams(), (0.5,) * 3, (0.5,) * 3)
    plain = aug(x, None)
    assert plain.shape == (4, 3, 30, 40)
    assert torch.allclose(plain, (x.float() / 255 - 0.5) / 0.5)
    # u = 0.5 everywhere except the flip draws (> 0.5: no flip) means: no rotation, zoom 1 only
    # when the scale range is symmetric; use a config without zoom/colour to check identity
    neutral = GpuAugment(
        params.AugmentParams(scale=[1.0, 1.0], brightness=0, contrast=0, saturation=0, hue=0),
        (0.5,) * 3,
        (0.5,) * 3,
    )
    u = torch.full((4, 9), 0.5)
    u[:, 2:4] = 0.9
    assert torch.allclose(neutral(x, u), plain, atol=1e-4)
    u[:, 2] = 0.1  # horizontal flip
    assert torch.allclose(neutral(x, u), plain.flip(3), atol=1e-4)
    rand = aug(x, aug.params(4, torch.Generator().manual_seed(0)))
    assert rand.shape == plain.shape and not torch.allclose(rand, plain)
    assert rand.min() >= (0 - 0.5) / 0.5 - 1e-5 and rand.max() <= (1 - 0.5) / 0.5 + 1e-5


def test_fit_to_size_turns_portrait_images_and_resizes():
    img = np.zeros((300, 200, 3), np.uint8)
    img[:10] = 255  # bright top rows
    out = images.fit_to_size(img, 60, 80)
    assert out.shape == (60, 80, 3)
    # the bright rows became a bright column after the 90-degree turn
    assert out[:, :3].mean() > 100 and out[:3, 20:60].mean() < 50


# -- metadata fusion ----------------------------------------------------------------------------------


def test_metadata_encoder_handles_missing_values():
    enc = ENCODER
    frame = pd.DataFrame(
        {
            "age": [45.0, np.nan, 0.0, None],
            "sex": ["male", "unknown", None, "female"],
            "localization": ["back", "unknown", "nowhere", None],
        }
    )
    v = enc.encode(frame)
    assert v.shape == (4, enc.dim) and np.isfinite(v).all()
    assert v[0, 0] == pytest.approx(0.45) and v[0, 1] == 0
    assert (v[1:3, 1] == 1).all() and (v[1:3, 0] == 0).all()  # missing/zero age flagged
    assert v[1, 2:].sum() == 0 and v[2, 2:].sum() == 0  # unknown sex/localization: empty one-hots
    assert v[3, 1] == 1 and v[3, 2 + enc.sexes.index("female")] == 1
    # a frame without the columns at all
    assert np.array_equal(enc.encode(pd.DataFrame(index=range(2))), enc.encode(None, 2))
    with pytest.raises(ValueError, match="row 0: field 'age'"):
        enc.encode(pd.DataFrame({"age": ["old"]}))


def test_fusion_model_runs_with_missing_metadata_and_uses_it():
    torch.manual_seed(0)
    enc = ENCODER
    model = classifier.build_model("small_cnn", 7, input_size=(32, 40), metadata=enc).eval()
    x = torch.rand(3, 3, 32, 40)
    full = torch.from_numpy(
        enc.encode(
            pd.DataFrame(
                {
                    "age": [30, 70, np.nan],
                    "sex": ["male", "female", "unknown"],
                    "localization": ["face", "back", "unknown"],
                }
            )
        )
    )
    with torch.no_grad():
        a = model(x, full)
        b = model(x, None)  # everything missing
        emb = model.embed(x, full)
    assert a.shape == b.shape == (3, 7) and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a[:2], b[:2])  # known metadata changes the output
    assert torch.allclose(a[2], b[2], atol=1e-6)  # all-missing row = no metadata
    assert emb.shape == (3, model.embedding_dim) == (3, 256 + 32)


# -- derived probabilities --------------------------------------------------------------------------


def test_derived_risk_and_binary_probabilities_sum_to_one_and_match_the_taxonomy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(7), size=20)
    out = inference.derive_levels(p, "dx", TAX)
    for level in ("risk", "binary"):
        assert np.allclose(out[level].sum(1), 1.0)
        for j, cls in enumerate(TAX.classes(level)):
            members = [TAX.diagnoses.index(d) for d, c in TAX.mapping(level).items() if c == cls]
            assert np.allclose(out[level][:, j], p[:, members].sum(1))
    # a risk-level model: binary derivable (risk classes nest in binary), dx not
    pr = rng.dirichlet(np.ones(3), size=5)
    out = inference.derive_levels(pr, "risk", TAX)
    assert out["dx"] is None and np.allclose(out["binary"].sum(1), 1.0)
    mal = TAX.classes("binary").index("malignant")
    risk = TAX.classes("risk")
    assert np.allclose(out["binary"][:, mal], pr[:, risk.index("malignant")] + pr[:, risk.index("benign_at_risk")])
    out = inference.derive_levels(rng.dirichlet(np.ones(2), size=5), "binary", TAX)
    assert out["dx"] is None and out["risk"] is None


def test_predictor_returns_every_level_and_embeddings(tmp_path):
    torch.manual_seed(0)
    model = classifier.build_model("small_cnn", 7, input_size=(32, 40))
    cfg = {
        "architecture": classifier.architecture("small_cnn", 7, (32, 40), 0.0, None),
        "target_level": "dx",
        "classes": list(TAX.diagnoses),
        "taxonomy": TAX.to_dict(),
        "preprocessing": backbones.BACKBONES["small_cnn"].preprocessing((32, 40)),
        "inference": {"tta": True},
    }
    tmp = tmp_path / "m"
    tmp.mkdir()
    torch.save(model.state_dict(), tmp / "model.pt")
    import json

    (tmp / "config.json").write_text(json.dumps(cfg))
    pred = inference.load_model(tmp, device="cpu")
    imgs = [np.random.default_rng(i).integers(0, 255, (150 + 10 * i, 200, 3), dtype=np.uint8) for i in range(3)]
    out = pred.predict(imgs)
    assert out["dx_probs"].shape == (3, 7) and np.allclose(out["dx_probs"].sum(1), 1)
    assert np.allclose(out["risk_probs"].sum(1), 1) and np.allclose(out["binary_probs"].sum(1), 1)
    assert np.allclose(out["p_malignant"], out["dx_probs"][:, [0, 1, 4]].sum(1))
    assert out["embeddings"].shape == (3, model.embedding_dim)
    assert out["native_level"] == "dx"
    assert pred.target_layer is pred.model.backbone.stages[3]
    # TTA changes the probabilities (averaging flips) but not their sum
    plain = pred.predict(imgs, tta=False)["dx_probs"]
    assert np.abs(plain - out["dx_probs"]).max() > 1e-7 and np.allclose(plain.sum(1), 1)
    with pytest.raises(ValueError, match="image 0"):
        pred.predict([np.zeros((10, 10), np.uint8)])


# -- registry and params ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_every_backbone_builds_with_its_feature_dim_and_gradcam_layer(name):
    m = classifier.build_model(name, 3, input_size=(64, 64)).eval()
    with torch.no_grad():
        emb = m.embed(torch.rand(1, 3, 64, 64))
    assert emb.shape == (1, backbones.BACKBONES[name].feature_dim)
    layer = m.gradcam_layer()
    assert any(p is not None for p in layer.parameters())


def test_torchvision_weights_offline_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache
    import torch.hub

    def offline(*a, **k):
        raise OSError("network unreachable")

    import torchvision.models._api as tv_api

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)  # what torchvision calls
    with pytest.raises(backbones.ModelError, match="resnet18.*pretrained weights.*TORCH_HOME"):
        classifier.build_model("resnet18", 7, pretrained=True)
    with pytest.raises(backbones.ModelError, match="unknown backbone"):
        classifier.build_model("vgg11", 7)


def test_train_params_are_strict_and_overrides_merge():
    base = params.read_yaml("params.yaml")["train"]
    p = params.from_dict(params.TrainParams, base, "train")
    assert p.backbone == "efficientnet_lite0" and p.early_stopping_metric == "balanced_accuracy"
    merged = params.apply_overrides(
        base, None, ["train.epochs=30", "train.augment.hue=0.05", "train.input_size=[240,320]"]
    )
    q = params.from_dict(params.TrainParams, merged, "train")
    assert (q.epochs, q.augment.hue, q.input_size) == (30, 0.05, [240, 320])
    assert base["epochs"] == p.epochs  # the original is untouched
    for key, value, match in [
        ("imbalance", "oversample", "train.imbalance: must be one of"),
        ("input_size", [100], "train.input_size"),
        ("warmup_epochs", 99, "train.warmup_epochs"),
    ]:
        with pytest.raises(params.ParamsError, match=match):
            params.from_dict(params.TrainParams, {**base, key: value}, "train")
    with pytest.raises(params.ParamsError, match="train.augment.scale"):
        params.from_dict(params.TrainParams, {**base, "augment": {"scale": [1.2, 0.9]}}, "train")
    # the backbone name is checked against the registry by the stage, naming the key
    with pytest.raises(params.ParamsError, match="train.backbone: unknown backbone 'vgg11'"):
        fitting.check_backbone(params.from_dict(params.TrainParams, {**base, "backbone": "vgg11"}, "train"))


def test_gpu_profile_is_valid():
    merged = params.apply_overrides(params.read_yaml("params.yaml")["train"], "params-gpu.yaml", [])
    p = params.from_dict(params.TrainParams, merged, "train")
    assert p.epochs >= 20 and min(p.input_size) >= 150
