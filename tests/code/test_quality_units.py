"""The image-quality checks' plumbing (pipeline.model.quality): features of plain frames, reasons
from thresholds, the packaged entry, prediction rows that withhold the decision, and the monitor's
count per reason. Their fit on real lesions is tested in tests/model/test_trust.py."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.predictions import DECISION, QUALITY, prediction_frame
from pipeline.core.taxonomy import Taxonomy
from pipeline.model import quality
from pipeline.monitoring import decision, drift

TAX = Taxonomy.default()


def _frames() -> np.ndarray:
    """uint8 (N, 3, H, W): black, white, a reddish texture, the same texture dimmed."""
    rng = np.random.default_rng(0)
    texture = np.clip(rng.normal(150, 30, (40, 60)), 0, 255)
    reddish = np.stack([texture * 1.2, texture * 0.8, texture * 0.7]).clip(0, 255).astype(np.uint8)
    return np.stack([np.zeros((3, 40, 60), np.uint8), np.full((3, 40, 60), 255, np.uint8), reddish, reddish // 8])


def test_features_of_plain_frames_and_a_texture():
    f = quality.quality_features(_frames())
    assert f["contrast"][0] == 0 and f["contrast"][1] == 0 and f["contrast"][2] > 10
    assert f["sharpness"][0] == 0 and f["sharpness"][2] > 0.5
    assert f["brightness"][0] == 0 and f["brightness"][1] == pytest.approx(255, abs=0.01)
    assert f["red_share"][2] > 0.4 > f["red_share"][1]
    with pytest.raises(ValueError, match=r"uint8 \(N, 3, H, W\)"):
        quality.quality_features(np.zeros((40, 60, 3), np.uint8))


def test_reasons_follow_the_thresholds_and_survive_the_config_entry():
    checks = quality.QualityChecks(
        {
            "contrast": (2.0, None),
            "brightness": (40.0, 230.0),
            "sharpness": (0.05, None),
            "red_share": (0.36, 0.6),
            "blue_share": (0.1, 0.4),
        },
        0.001,
    )
    got = checks.reasons(_frames())
    assert got[0] == ["blank", "underexposed", "out_of_focus", "implausible_colour"]
    assert got[1] == ["blank", "overexposed", "out_of_focus", "implausible_colour"]
    assert got[2] == [] and got[3] == ["underexposed"]
    entry = checks.record(0.004, 0.006)
    assert entry["val_refused_share"] == 0.006 and set(entry["reasons"]) == set(quality.REASONS)
    assert quality.QualityChecks.from_config(entry).reasons(_frames()) == got
    assert quality.from_mask(quality.to_mask(got)) == got
    assert quality.counts(got) == {
        "blank": 2,
        "underexposed": 2,
        "overexposed": 1,
        "out_of_focus": 2,
        "implausible_colour": 2,
    }
    assert "under-exposed (too dark)" in quality.message(got[3])


def test_prediction_rows_withhold_the_decision_of_a_refused_image():
    probs = np.array([[0.0, 0.0, 0.0, 0.0, 0.9, 0.1, 0.0]] * 3)
    rows = prediction_frame(
        {"dx": probs},
        TAX,
        [0.9, 0.9, 0.9],
        0.3,
        in_distribution=[True, True, False],
        ood_score=[1.0, 1.0, 9.0],
        withhold=True,
        quality_reasons=[[], ["blank", "underexposed"], []],
    )
    assert list(rows[QUALITY]) == ["", "blank; underexposed", ""]
    assert rows[DECISION].iloc[0] is not None and rows[DECISION].iloc[1:].isna().all()


def test_the_monitor_counts_answers_not_judged_per_reason():
    window = pd.DataFrame(
        {
            QUALITY: ["", "blank; underexposed", "out_of_focus", None, ""],
            "in_distribution": [True, False, True, True, False],
        }
    )
    refused = drift.refusals(window)
    assert refused["quality_refused"] == 2 and refused["ood"] == 2
    assert refused["quality"]["blank"] == 1 and refused["quality"]["out_of_focus"] == 1
    assert refused["quality"]["overexposed"] == 0
    md = decision.summary_markdown({"decision": "not_enough_data", "refused": refused, "source": {}})
    row = "| not judged | 2 by the image-quality checks (blank 1, underexposed 1, out of focus 1); 2 out of"
    assert row in md
    unchecked = drift.refusals(window.assign(**{QUALITY: None}))  # a model without checks: none counted
    assert unchecked == {"ood": 2}
    md = decision.summary_markdown({"decision": "not_enough_data", "refused": unchecked, "source": {}})
    assert "| not judged | 2 out of distribution |" in md
