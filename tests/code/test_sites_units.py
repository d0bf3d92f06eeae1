"""The records of a model's sites (pipeline.model.sites) and the statistics of onboarding one
(pipeline.audit.sites, pipeline.evaluation.bootstrap.threshold_statistic), without a model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.audit import sites as onboarding
from pipeline.evaluation import bootstrap, metrics
from pipeline.model import bundle, sites


def _folder(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / bundle.MODEL_FILE).write_bytes(b"weights")
    return d, bundle.model_md5(d)


def _record(name: str, md5: str, **kw) -> dict:
    return {
        "name": name,
        "threshold": 0.3,
        "target_sensitivity": 0.95,
        "suitable": True,
        "reason": None,
        "model_md5": md5,
        **kw,
    }


def test_sites_are_written_loaded_and_chosen_by_name(tmp_path):
    d, md5 = _folder(tmp_path)
    assert sites.load(d) == {} and sites.choose({}, None) is None
    sites.write(d, _record("clinic-a", md5))
    sites.write(d, _record("clinic-b", md5, suitable=False, reason="specificity 0.1 below 0.30"))
    found = sites.load(d)
    assert set(found) == {"clinic-a", "clinic-b"} and found["clinic-a"].point("malignant").threshold == 0.3
    assert found["clinic-a"].message is None and "not suitable" in found["clinic-b"].message
    assert sites.choose(found, "clinic-b").suitable is False and sites.choose(found, "") is None
    with pytest.raises(sites.SiteError, match=r"unknown site 'clinic-z'; this model's sites: clinic-a, clinic-b"):
        sites.choose(found, "clinic-z")


@pytest.mark.parametrize("name", ["", "../x", "a b", "-lead", "x" * 65, "ünï"])
def test_a_site_name_that_is_not_a_plain_file_name_is_refused(name):
    with pytest.raises(sites.SiteError, match="site name"):
        sites.check_name(name)


def test_a_site_measured_with_other_weights_or_malformed_is_refused_naming_the_file(tmp_path):
    d, md5 = _folder(tmp_path)
    with pytest.raises(sites.SiteError, match="measured with model md5 0000"):
        sites.write(d, _record("clinic-a", "0000"))
    path = sites.write(d, _record("clinic-a", md5))
    path.write_text(json.dumps(_record("clinic-a", "0000")))
    with pytest.raises(bundle.ModelLoadError, match=r"clinic-a.json: measured with model md5 0000"):
        sites.load(d)
    path.write_text(json.dumps(_record("clinic-a", md5, threshold=1.5)))
    with pytest.raises(bundle.ModelLoadError, match=r"clinic-a.json: field 'threshold' outside"):
        sites.load(d)
    path.write_text(json.dumps({"name": "clinic-a"}))
    with pytest.raises(bundle.ModelLoadError, match=r"clinic-a.json: not a site record"):
        sites.load(d)


def test_the_bootstrap_of_a_sites_threshold_starts_from_the_chosen_one():
    """All weights 1: the statistic equals choose_threshold and scikit-learn's ROC on the data."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    score = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    chosen = metrics.choose_threshold(y, score, 0.95)
    stat = bootstrap.threshold_statistic(y, score, 0.95, chosen["threshold"])(np.ones((1, len(y))))
    fpr, tpr, thr = skm.roc_curve(y, score, drop_intermediate=False)
    i = int(np.argmax(tpr >= 0.95))
    assert stat["threshold"][0] == pytest.approx(thr[i]) == pytest.approx(chosen["threshold"])
    assert stat["specificity_at_target"][0] == pytest.approx(1 - fpr[i])
    assert stat["sensitivity_at_threshold"][0] == pytest.approx(chosen["sensitivity"])
    ci = bootstrap.bootstrap(bootstrap.threshold_statistic(y, score, 0.95, chosen["threshold"]), np.arange(400), 300)
    assert ci["threshold"]["low"] < chosen["threshold"] < ci["threshold"]["high"]


@pytest.mark.parametrize("width, needed", [(0.10, 83), (0.20, 25), (0.30, 13)])
def test_the_fewest_malignant_cases_follow_from_the_interval_width(width, needed):
    """Wilson intervals of a sensitivity of 0.95: the count is the first whose interval fits."""
    assert onboarding.minimum_malignant(0.95, width, 0.95) == needed
    assert onboarding.wilson_width(0.95, needed, 0.95) <= width < onboarding.wilson_width(0.95, needed - 1, 0.95)
