"""Trust units on synthetic data: the size limits a model can judge, temperature scaling, the
Mahalanobis out-of-distribution score and its threshold, withheld decisions in prediction rows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from pipeline.core import images
from pipeline.core.formats import SizeLimits
from pipeline.core.predictions import DECISION, IN_DISTRIBUTION, prediction_frame
from pipeline.core.sections import TrustParams
from pipeline.core.strict import ParamsError
from pipeline.core.taxonomy import Taxonomy
from pipeline.model import bundle, calibration, checkpoint, ood

LIMITS = SizeLimits(64, 64, 4.0)


@pytest.mark.parametrize(
    "w, h, words",
    [
        (1, 1, ["1x1", "at least 64x64"]),
        (20, 20, ["20x20", "at least 64x64"]),
        (63, 200, ["63x200", "at least 64x64"]),
        (400, 64, ["400x64", "6.2:1", "at most 4:1"]),
    ],
)
def test_images_a_model_cannot_judge_are_refused_naming_size_and_limit(w, h, words):
    with pytest.raises(images.ImageError) as err:
        images.check_size(np.zeros((h, w, 3), np.uint8), LIMITS, "upload.png")
    assert err.value.source == "upload.png" and all(word in err.value.reason for word in words)


@pytest.mark.parametrize("w, h", [(64, 64), (600, 450), (450, 600), (256, 64)])
def test_images_within_the_limits_pass_in_either_orientation(w, h):
    images.check_size(np.zeros((h, w, 3), np.uint8), LIMITS, "ok.jpg")


def _overconfident(n: int = 3000, k: int = 5, scale: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z) and logits scale * z: a model over-confident by ``scale``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    y = np.array([rng.choice(k, p=p) for p in softmax(z, axis=1)])
    return scale * z, y


def test_temperature_scaling_recovers_the_overconfidence_and_keeps_the_ranking():
    logits, y = _overconfident()
    t = calibration.fit_temperature(logits, y)
    assert t == pytest.approx(3.0, rel=0.1)
    assert calibration.nll(logits, y, t) < calibration.nll(logits, y) - 0.05
    before, after = calibration.probabilities(logits), calibration.probabilities(logits, t)
    assert np.array_equal(before.argmax(1), after.argmax(1))
    rec = calibration.calibration_record(logits, y)
    assert rec["val_nll_after"] < rec["val_nll_before"] and rec["temperature"] == pytest.approx(t, rel=1e-5)


def test_temperature_with_tta_views_fits_the_averaged_probabilities():
    logits, y = _overconfident(n=2000, seed=1)
    views = np.stack([logits, logits + np.random.default_rng(2).normal(0, 0.3, logits.shape)])
    t = calibration.fit_temperature(views, y)
    grid = np.exp(np.linspace(np.log(0.5), np.log(8), 400))
    best = grid[np.argmin([calibration.nll(views, y, g) for g in grid])]
    assert t == pytest.approx(best, rel=0.02)


def _clusters(n: int, seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    means = np.array([[0.0] * 8, [4.0] + [0.0] * 7, [0.0, 4.0] + [0.0] * 6])
    y = rng.integers(0, 3, n)
    return means[y] + rng.normal(0, 1, (n, 8)) + shift, y


def test_mahalanobis_score_separates_far_points_and_threshold_passes_the_share(tmp_path):
    train, y = _clusters(3000, 0)
    val, _ = _clusters(1000, 1)
    far, _ = _clusters(200, 2, shift=6.0)
    det, val_scores = ood.fit(
        "mahalanobis", {"embeddings": train, "labels": y}, {"embeddings": val, "logits": np.zeros((1000, 3))}, 0.95
    )
    assert np.mean(det.in_distribution(val_scores)) == pytest.approx(0.95, abs=0.002)
    assert np.mean(~det.in_distribution(det.score(far, None))) > 0.99
    # the score is the distance to the nearest class mean under the shared covariance
    near = det.score(np.array([[4.0] + [0.0] * 7]), None)[0]
    assert near < det.score(np.array([[2.0, -2.0] + [0.0] * 6]), None)[0]
    # stored as plain arrays and read back without pickle
    checkpoint.save(tmp_path / "m", {}, {"ood": det.record(0.95, val_scores)}, {bundle.OOD_FILE: det.arrays})
    arrays = checkpoint.load_arrays(tmp_path / "m", bundle.OOD_FILE)
    again = ood.OodDetector.from_config(det.record(0.95, val_scores), arrays, 1.0)
    assert np.allclose(again.score(far, None), det.score(far, None))
    with pytest.raises(ValueError, match="ood.npz"):
        ood.OodDetector.from_config({"method": "mahalanobis", "threshold": 1.0}, {}, 1.0)


def test_energy_score_is_higher_for_flat_logits():
    peaked, flat = np.array([[10.0, 0, 0]]), np.array([[0.1, 0, 0]])
    assert ood.energy(flat)[0] > ood.energy(peaked)[0]


def test_prediction_rows_withhold_the_decision_of_an_image_out_of_distribution():
    tax = Taxonomy.default()
    probs = np.full((2, 7), 1 / 7)
    binary = np.array([[0.2, 0.8], [0.2, 0.8]])
    rows = prediction_frame(
        {"dx": probs, "binary": binary}, tax, binary[:, 1], 0.5, in_distribution=[True, False], ood_score=[1.0, 9.0]
    )
    assert rows[DECISION].tolist() == ["malignant", "malignant"]  # evaluate keeps both
    shown = prediction_frame(
        {"dx": probs, "binary": binary},
        tax,
        binary[:, 1],
        0.5,
        in_distribution=[True, False],
        ood_score=[1.0, 9.0],
        withhold=True,
    )
    assert shown[DECISION].tolist() == ["malignant", None] and shown[IN_DISTRIBUTION].tolist() == [True, False]
    assert shown["p_malignant"].tolist() == [0.8, 0.8]  # the probabilities stay


def test_fingerprint_tells_apart_models_that_answer_differently(tmp_path):
    """Same weights but a new temperature or OOD detector is a different model to serve; a copy is not."""
    import json
    import shutil

    checkpoint.save(tmp_path / "a", {}, {"calibration": {"temperature": 1.0}})
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert bundle.fingerprint(tmp_path / "a") == bundle.fingerprint(tmp_path / "copy")
    checkpoint.save(tmp_path / "b", {}, {"calibration": {"temperature": 0.57}})
    assert (tmp_path / "a" / "model.pt").read_bytes() == (tmp_path / "b" / "model.pt").read_bytes()
    assert bundle.fingerprint(tmp_path / "a") != bundle.fingerprint(tmp_path / "b")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    checkpoint.save(tmp_path / "c", {}, cfg, {bundle.OOD_FILE: {"whitener": np.eye(2, dtype=np.float32)}})
    assert bundle.fingerprint(tmp_path / "c") != bundle.fingerprint(tmp_path / "a")
    assert bundle.fingerprint(tmp_path / "missing") is None


def test_the_ood_sets_have_every_kind_in_both_halves_and_never_split_a_source():
    """Methods are chosen on one half and reported on the other (benchmarks/ood_scores.py, the
    evaluation's gate): a photograph and its crops are in one half; every kind is in both; every
    image is at least the 64x64 the service accepts; the same images every time."""
    from collections import Counter

    from pipeline.evaluation import oodsets

    found = oodsets.ood_images()
    count = Counter((o.kind, o.half) for o in found)
    for kind in oodsets.KINDS:
        assert count[(kind, "choose")] >= 3 and count[(kind, "report")] >= 3, kind
    halves: dict[str, set[str]] = {}
    for o in found:
        halves.setdefault(o.source, set()).add(o.half)
        assert min(o.rgb.shape[:2]) >= 64 and o.rgb.dtype == np.uint8 and o.rgb.shape[2] == 3, o.name
    assert all(len(h) == 1 for h in halves.values())
    report = oodsets.ood_images(half="report")
    assert {o.name for o in report} == {o.name for o in found if o.half == "report"}
    again = {o.name: o for o in oodsets.ood_images()}
    assert all(np.array_equal(again[o.name].rgb, o.rgb) for o in found)


def test_the_multi_layer_score_sums_standardised_distances_and_needs_the_block_outputs(tmp_path):
    """Per layer (each block's pooled outputs, then the embedding) one Gaussian fitted on train; each
    layer's distance standardised on val, summed; the threshold passes the share of val. A point far
    out in any one layer is flagged; without the block outputs the score refuses to guess."""
    rng = np.random.default_rng(0)
    dims = [3, 5]

    def sample(n: int, shift: float = 0.0) -> dict:
        return {
            "blocks": rng.normal(0, 1, (n, sum(dims))) + shift,
            "embeddings": rng.normal(0, 1, (n, 4)),
            "logits": np.zeros((1, n, 3)),
        }

    train, val = sample(3000), sample(1000)
    det, val_scores = ood.fit("mahalanobis_layers", {**train, "labels": None, "block_dims": dims}, val, 0.99)
    assert det.needs_blocks and np.mean(det.in_distribution(val_scores)) == pytest.approx(0.99, abs=0.002)
    d = ood.layer_distances(det.arrays, val["blocks"], val["embeddings"])
    assert d.shape == (1000, 3) and np.allclose(((d - d.mean(0)) / d.std(0)).sum(1), val_scores, atol=1e-3)
    far = sample(200)
    far["blocks"][:, :3] += 6.0  # only the first block's outputs are unusual
    assert np.mean(~det.in_distribution(det.score(far["embeddings"], None, far["blocks"]))) > 0.99
    with pytest.raises(ValueError, match="block outputs"):
        det.score(far["embeddings"], None)
    checkpoint.save(tmp_path / "m", {}, {"ood": det.record(0.99, val_scores)}, {bundle.OOD_FILE: det.arrays})
    again = ood.OodDetector.from_config(
        det.record(0.99, val_scores), checkpoint.load_arrays(tmp_path / "m", bundle.OOD_FILE), 1.0
    )
    assert np.allclose(
        again.score(far["embeddings"], None, far["blocks"]),
        det.score(far["embeddings"], None, far["blocks"]),
        atol=1e-4,
    )
    with pytest.raises(ValueError, match="multi-layer statistics"):
        ood.OodDetector.from_config({"method": "mahalanobis_layers", "threshold": 1.0}, {}, 1.0)


def test_the_multi_layer_covariance_shrinkage_is_the_one_asked_for():
    """``train.trust.ood_shrinkage``: s blends each layer's correlation matrix with the identity,
    ``(1 - s) R + s I``; s = 1 leaves the standardised Euclidean distance, s = 0 the plain
    Mahalanobis distance, null Ledoit-Wolf's estimate (between them)."""
    rng = np.random.default_rng(1)
    mix = np.array([[1.0, 0.9], [0.0, 0.4]])
    x = rng.normal(0, 1, (4000, 2)) @ mix  # strongly correlated columns
    probe = np.array([[1.0, -1.0], [1.0, 1.0]]) @ mix  # one against the correlation, one along it
    dims = [2]

    def distances(shrinkage):
        arrays = ood.layer_statistics(x, x, dims, shrinkage)
        return ood.layer_distances(arrays, probe, probe)[:, 0]

    z = (probe - x.mean(0)) / x.std(0)
    assert np.allclose(distances(1.0), np.linalg.norm(z, axis=1), rtol=1e-3)
    inv = np.linalg.inv(np.corrcoef(x, rowvar=False))
    assert np.allclose(distances(0.0), np.sqrt(np.einsum("ij,jk,ik->i", z, inv, z)), rtol=1e-2)
    auto = distances(None)
    assert distances(1.0)[0] < auto[0] <= distances(0.0)[0] * (1 + 1e-6)
    with pytest.raises(ParamsError, match="ood_shrinkage"):
        TrustParams(ood_shrinkage=1.5)
