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
    return {"root": root, "model": model, "folder": folder, "labels": labels, "monitor": monitor}


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
