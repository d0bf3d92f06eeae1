"""External validation (``lesionflow validate-external``) on a labelled folder with a real shift:
real HAM10000 images of lesions the model never saw, zoomed 1.33x at the centre and re-compressed
as JPEG quality 60. Its numbers must equal an independent scikit-learn computation on the same
predictions; the result can be recorded with a stored model and shown by ``lesionflow trace``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from pipeline.audit import external
from pipeline.core import params
from pipeline.core.taxonomy import Taxonomy
from pipeline.monitoring.reference import ReferenceInputs, build_reference
from tests.model import monitoring_fixtures as mf
from tests.registry_fixtures import PROJECT_ROOT, write_evaluation, write_model_dir
from tests.service_fixtures import IMAGES_DIR, package

TAX = Taxonomy.default()
N_REF, N_EXT = 160, 120


def _shifted(rows: pd.DataFrame, dest) -> None:
    dest.mkdir(parents=True)
    zoom = mf.SHIFTS["zoom_1_33"]
    for i in rows["image_id"]:
        with Image.open(IMAGES_DIR / f"{i}.jpg") as im:
            zoom(im.convert("RGB")).save(dest / f"{i}.jpg", quality=60)


@pytest.fixture(scope="module")
def setup(real_metadata, tmp_path_factory):
    """A model with calibration, OOD detector, operating point and reference profile, and a
    shifted external set of lesions disjoint from the ones it was fitted on."""
    root = tmp_path_factory.mktemp("external")
    ref_rows, ext_rows = mf.lesion_disjoint_samples(real_metadata, N_REF, N_EXT, seed=3)
    from pipeline.core import images

    imgs = [images.decode_rgb(IMAGES_DIR / f"{i}.jpg") for i in ref_rows["image_id"]]
    model = write_model_dir(root / "model", trust_images=imgs, trust_labels=list(ref_rows["dx"]))
    write_evaluation(model, root / "evaluate", root / "reports", threshold=0.3)
    shutil.copy(root / "evaluate" / "operating_point.json", model / "operating_point.json")
    shutil.copy(root / "reports" / "scores.json", model / "scores.json")
    splits = root / "splits"
    splits.mkdir()
    ref_rows.to_csv(splits / "train.csv", index=False)
    monitor = dataclasses.replace(params.load_section("monitor", PROJECT_ROOT / "params.yaml"), workers=1)
    build_reference(
        monitor, TAX, ReferenceInputs(splits, IMAGES_DIR, model, root / "no-eda"), model / "reference", False, False
    )
    folder = root / "shifted"
    _shifted(ext_rows, folder)
    labels = root / "labels.csv"
    ext_rows[["image_id", "lesion_id", "dx", "age", "sex", "localization"]].to_csv(labels, index=False)
    return {
        "root": root,
        "model": model,
        "folder": folder,
        "labels": labels,
        "monitor": monitor,
        "fitted_lesions": set(ref_rows["lesion_id"]),
    }


def _validated(s: dict, name: str, labels_csv, out_dir, bootstrap: int) -> dict:
    """validate_external of the setup's model on its shifted folder with ``labels_csv``; the user
    reads our messages, not scikit-learn's warnings."""
    evaluate = params.load_section("evaluate", PROJECT_ROOT / "params.yaml")
    inputs = external.ExternalInputs(
        name=name,
        model_dir=s["model"],
        model_label=str(s["model"]),
        images_dir=s["folder"],
        labels_csv=labels_csv,
        out_dir=out_dir,
        evaluate=dataclasses.replace(evaluate, bootstrap=bootstrap),
        monitor=dataclasses.replace(s["monitor"], min_batch_size=50),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = external.validate_external(inputs, TAX, progress=False)
    sklearn_said = {str(w.message)[:80] for w in caught if "sklearn" in w.filename}
    assert not sklearn_said, f"our own messages, not scikit-learn's warnings: {sklearn_said}"
    return r


def test_external_numbers_equal_an_independent_sklearn_computation(setup):
    s = setup
    r = _validated(s, "shifted", s["labels"], s["root"] / "out", bootstrap=200)
    pred = pd.read_csv(s["root"] / "out" / "predictions.csv")
    labels = pd.read_csv(s["labels"])
    assert list(pred["image_id"]) == list(labels["image_id"]) and r["n_images"] == N_EXT
    y = (pred["binary_true"] == "malignant").to_numpy()
    p = pred["p_malignant"].to_numpy()
    b = r["metrics"]["binary"]
    assert b["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
    assert b["pr_auc"] == pytest.approx(skm.average_precision_score(y, p), abs=1e-6)
    decided = p >= r["threshold"]
    at = r["model_threshold"]
    assert at["sensitivity"] == pytest.approx(skm.recall_score(y, decided))
    assert at["specificity"] == pytest.approx(skm.recall_score(~y, ~decided))
    assert r["metrics"]["dx"]["balanced_accuracy"] == pytest.approx(
        skm.balanced_accuracy_score(pred["dx"], pred["dx_pred"]), abs=1e-6
    )
    # the threshold restoring the target sensitivity: the highest one reaching it on this set
    fpr, tpr, thr = skm.roc_curve(y, p)
    best = thr[np.argmax(tpr >= r["target_sensitivity"])]
    assert r["restoring_target"]["threshold"] == pytest.approx(best)
    assert r["restoring_target"]["sensitivity"] >= r["target_sensitivity"]
    assert r["ood_flagged_share"] == pytest.approx(1 - pred["in_distribution"].mean())
    refused = pred["quality_reasons"].fillna("") != ""  # the model has image-quality checks
    assert r["quality_refused_share"] == pytest.approx(refused.mean())
    assert sum(r["quality_refused"].values()) >= refused.sum()
    ci = r["confidence"]["binary"]["roc_auc"]
    assert ci["low"] <= b["roc_auc"] <= ci["high"] and r["ci_over"] == "lesion"
    # the drift check against the model's reference profile ran on the shifted set
    assert r["drift"]["decision"] in ("drift", "no_drift") and r["drift"]["n_current"] == N_EXT
    report = (s["root"] / "out" / "report.md").read_text()
    assert "this set, model threshold" in report and "internal test split" in report

    assert (s["root"] / "out" / "report.html").stat().st_size > 1000


def test_a_set_without_some_diagnoses_reports_their_metrics_as_not_defined(setup, tmp_path):
    """PH2-like: a clinic's set holds a few diagnoses only. Their per-class metrics are not defined
    (not 0) in the summary and the report, and scikit-learn's warnings are not what the user reads."""
    s = setup
    labels = pd.read_csv(s["labels"])
    labels = labels[~labels["dx"].isin(["df", "vasc", "akiec"])]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    r = _validated(s, "few-diagnoses", tmp_path / "labels.csv", tmp_path / "out", bootstrap=100)
    report = (tmp_path / "out" / "report.md").read_text()
    for c in ("df", "vasc", "akiec"):
        pc = r["per_class"][c]
        assert pc["support"] == 0 and pc["recall"] is None and pc["f1"] is None and pc["roc_auc"] is None
        assert "not defined" in report.split(f"| {c} | 0 | ")[1].split("\n")[0]
    assert r["per_class"]["nv"]["recall"] is not None


def test_cli_validates_a_stored_model_and_trace_shows_the_record(setup, tmp_path):
    s = setup
    home = tmp_path / "bentoml"
    tag = package(s["model"], tmp_path, home)
    env = {**os.environ, "BENTOML_HOME": str(home)}
    cli = [sys.executable, "-m", "pipeline.cli"]
    run = subprocess.run(
        [*cli, "validate-external", str(s["folder"]), str(s["labels"]), "--model", tag, "--name", "clinic-b"]
        + ["--record", "--out", str(tmp_path / "out")],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "this set, model threshold" in run.stdout and f"Recorded with {tag}" in run.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    trace = subprocess.run([*cli, "trace", tag, "--json"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    record = json.loads(trace.stdout)["external_validations"]
    assert [e["name"] for e in record] == ["clinic-b"]
    assert record[0]["metrics"]["binary"]["roc_auc"] == summary["metrics"]["binary"]["roc_auc"]
    shown = subprocess.run([*cli, "trace", tag], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
    assert "External validations" in shown.stdout and "clinic-b" in shown.stdout
    # a labels file with an unknown diagnosis is refused naming the row
    bad = tmp_path / "bad.csv"
    pd.read_csv(s["labels"]).assign(dx=lambda d: d["dx"].where(d.index != 2, "melanoma")).to_csv(bad, index=False)
    refused = subprocess.run(
        [*cli, "validate-external", str(s["folder"]), str(bad), "--model", tag, "--out", str(tmp_path / "o2")],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "row 4" in refused.stderr and "'melanoma'" in refused.stderr
    assert not (tmp_path / "o2").exists()


# -- sites: an operating point per site (lesionflow site add) ------------------------------------


@pytest.fixture(scope="module")
def site_set(setup, real_metadata):
    """A site's shifted labelled set: 36 malignant and 44 benign lesions (one image each) the model
    was not fitted on, zoomed 1.33x and re-compressed as JPEG 60; and its labels."""
    rows = real_metadata[~real_metadata["lesion_id"].isin(setup["fitted_lesions"])].drop_duplicates("lesion_id")
    malignant = pd.Series(TAX.labels(rows["dx"], "binary"), index=rows.index) == TAX.binary_positive
    chosen = pd.concat([rows[malignant].sample(36, random_state=5), rows[~malignant].sample(44, random_state=5)])
    folder = setup["root"] / "site-images"
    _shifted(chosen, folder)
    labels = setup["root"] / "site-labels.csv"
    chosen[["image_id", "lesion_id", "dx"]].to_csv(labels, index=False)
    return folder, labels


def _site_inputs(s: dict, folder, labels, out_dir, name: str = "clinic-c") -> external.ExternalInputs:
    evaluate = params.load_section("evaluate", PROJECT_ROOT / "params.yaml")
    return external.ExternalInputs(
        name=name,
        model_dir=s["model"],
        model_label=str(s["model"]),
        images_dir=folder,
        labels_csv=labels,
        out_dir=out_dir,
        evaluate=dataclasses.replace(evaluate, bootstrap=300),
        monitor=dataclasses.replace(s["monitor"], min_batch_size=50),
    )


def test_a_site_gets_the_threshold_restoring_the_target_with_a_lesion_bootstrap_interval(setup, site_set, tmp_path):
    """At the default settings the site's 36 malignant cases are enough; its threshold is the
    highest one reaching the model's target sensitivity on its images (checked with scikit-learn),
    inside its bootstrap interval; suitable exactly when its specificity there reaches
    serving.min_site_specificity. Asked for more specificity than it has, it is not suitable."""
    from pipeline.audit import sites

    serving = params.load_section("serving", PROJECT_ROOT / "params.yaml")
    r = sites.onboard(_site_inputs(setup, *site_set, tmp_path / "out"), serving, TAX, progress=False)
    site = r["site"]
    pred = pd.read_csv(tmp_path / "out" / "predictions.csv")
    y, p = (pred["binary_true"] == "malignant").to_numpy(), pred["p_malignant"].to_numpy()
    fpr, tpr, thr = skm.roc_curve(y, p, drop_intermediate=False)
    i = int(np.argmax(tpr >= site["target_sensitivity"]))
    assert site["threshold"] == pytest.approx(thr[i]) and site["specificity"] == pytest.approx(1 - fpr[i])
    assert site["sensitivity"] >= site["target_sensitivity"] and site["n_malignant"] == 36
    lo, hi = site["threshold_interval"]
    assert lo <= site["threshold"] <= hi and site["ci_over"] == "lesion" and site["n_boot"] == 300
    assert site["sensitivity_interval"][0] <= site["sensitivity"] <= site["sensitivity_interval"][1]
    low, high = site["specificity_at_target_interval"]  # the figure "suitable" compares, per resample
    assert 0.0 <= low <= high <= 1.0 and high - low > 0
    assert site["suitable"] is (site["specificity"] >= serving.min_site_specificity)
    assert site["model_md5"] == r["model_md5"] and site["min_malignant"] == sites.minimum_malignant(0.95, 0.2, 0.95)
    assert "Site operating point" in (tmp_path / "out" / "report.md").read_text()
    strict = dataclasses.replace(serving, min_site_specificity=0.99)
    picky = sites.onboard(_site_inputs(setup, *site_set, tmp_path / "strict"), strict, TAX, progress=False)["site"]
    assert picky["suitable"] is False and picky["threshold"] == pytest.approx(site["threshold"])
    assert (
        f"specificity {picky['specificity']:.3f}" in picky["reason"] and "min_site_specificity 0.99" in picky["reason"]
    )


def test_a_site_with_too_few_malignant_cases_is_refused_before_any_work(setup, site_set, tmp_path):
    from pipeline.audit import sites
    from pipeline.model.sites import SiteError

    folder, labels = site_set
    few = pd.read_csv(labels)
    malignant = pd.Series(TAX.labels(few["dx"], "binary"), index=few.index) == TAX.binary_positive
    few = pd.concat([few[malignant].head(10), few[~malignant]])
    few.to_csv(tmp_path / "few.csv", index=False)
    serving = params.load_section("serving", PROJECT_ROOT / "params.yaml")
    with pytest.raises(SiteError) as refused:
        sites.onboard(_site_inputs(setup, folder, tmp_path / "few.csv", tmp_path / "out"), serving, TAX, progress=False)
    needed = sites.minimum_malignant(0.95, serving.site_interval_width, 0.95)
    assert "10 malignant case(s)" in str(refused.value) and f"at least {needed}" in str(refused.value)
    assert "serving.site_interval_width" in str(refused.value) and not (tmp_path / "out").exists()
    # the count it asks for: a sensitivity of 0.95 on that many cases has a 95% interval no wider than asked
    assert (
        sites.wilson_width(0.95, needed, 0.95)
        <= serving.site_interval_width
        < sites.wilson_width(0.95, needed - 1, 0.95)
    )


def test_cli_site_add_records_the_site_with_the_stored_model_and_lists_it(setup, site_set, tmp_path):
    """``lesionflow site add`` on a stored model: the report, the record kept with the model (in
    ``site list`` and ``trace``); measuring a recorded site again needs --replace, which keeps the
    earlier record inside the new one; a bad name is refused naming it."""
    s, (folder, labels) = setup, site_set
    home = tmp_path / "bentoml"
    tag = package(s["model"], tmp_path, home)
    env = {**os.environ, "BENTOML_HOME": str(home)}
    cli = [sys.executable, "-m", "pipeline.cli"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)

    add = ["site", "add", "clinic-c", str(folder), str(labels), "--model", tag, "--no-build"]
    first = run(*add, "--out", str(tmp_path / "out"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "Site clinic-c: threshold" in first.stdout and f"Recorded with {tag}" in first.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    listed = run("site", "list", "--model", tag)
    assert (
        listed.returncode == 0
        and "clinic-c" in listed.stdout
        and f"{summary['site']['threshold']:.4f}" in listed.stdout
    )
    traced = json.loads(run("trace", tag, "--json").stdout)["sites"]
    assert [t["name"] for t in traced] == ["clinic-c"] and traced[0]["threshold"] == summary["site"]["threshold"]
    again = run(*add, "--out", str(tmp_path / "again"))
    assert again.returncode != 0 and "--replace" in again.stderr and not (tmp_path / "again").exists()
    replaced = run(*add, "--out", str(tmp_path / "again"), "--replace")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    traced = json.loads(run("trace", tag, "--json").stdout)["sites"]
    assert traced[0]["replaces"]["created_at"] == summary["site"]["created_at"]
    bad = run("site", "add", "../etc", str(folder), str(labels), "--model", tag, "--no-build")
    assert bad.returncode != 0 and "'../etc'" in bad.stderr
