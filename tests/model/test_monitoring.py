"""Drift monitoring on real HAM10000 images: a held-out control must not be flagged, each real-world
shift must be flagged with plausible drifted features named, a tiny batch says "not enough data".

Reference: 250 'training' images; current batches: 120 images of *other lesions*, as they are and
shifted. Model: EfficientNet-Lite0 with its ImageNet weights at 64x86 (untrained head: the
embeddings are the pretrained features). Decisions use the plot-free path (``html=False``, the same
Evidently metrics and tests); one check renders the HTML reports.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core import params
from pipeline.core.metadata import MetadataError, read_metadata_csv
from pipeline.model.inference import load_model
from pipeline.monitoring import batch, decision, drift, profile
from pipeline.monitoring.profile import stratified_sample
from pipeline.monitoring.reference import ReferenceInputs, build_reference
from tests.conftest import IMAGES_DIR
from tests.model import monitoring_fixtures as mf

N_REF, N_CUR = 250, 120

#: For each shift: the features at least one of which must be among the most drifted (top 10),
#: and all of which must be flagged as drifted.
EXPECTED = {
    "brightness_plus_40": (
        {"brightness", "lab_l_mean", "hsv_v_mean", "skin_l_mean", "g_mean", "r_mean"},
        {"brightness", "lab_l_mean"},
    ),
    "lower_contrast": (
        {
            "contrast_rms",
            "contrast_p5_95",
            "lab_l_std",
            "lesion_skin_delta_e",
            "hsv_s_std",
            "lab_b_std",
            "lesion_a_mean",
            "hsv_s_mean",
            "lesion_skin_contrast",
        },
        {"contrast_rms", "contrast_p5_95"},
    ),
    "colour_cast": (
        {"lab_b_mean", "b_mean", "r_mean", "lab_a_mean", "hsv_s_mean", "lesion_b_mean"},
        {"lab_b_mean", "b_mean"},
    ),
    "strong_blur": ({"sharpness"}, {"sharpness"}),
    "zoom_1_33": (
        {
            "lesion_area_fraction",
            "lesion_width_rel",
            "lesion_height_rel",
            "lesion_width_px",
            "lesion_height_px",
            "sharpness",
        },
        {"lesion_area_fraction"},
    ),
}


@pytest.fixture(scope="module")
def setup(real_metadata, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    taxonomy = params.load_taxonomy()
    p = dataclasses.replace(params.load_section("monitor"), min_batch_size=100, workers=2)
    ref_rows, cur_rows = mf.lesion_disjoint_samples(real_metadata, N_REF, N_CUR)
    assert not set(ref_rows["lesion_id"]) & set(cur_rows["lesion_id"])
    model_dir = mf.tiny_model_dir(root / "model", taxonomy)
    ref_rows.to_csv(root / "train.csv", index=False)
    build_reference(
        p,
        taxonomy,
        ReferenceInputs(root, IMAGES_DIR, model_dir, root / "no-eda"),
        root / "reference",
        use_eda_table=False,
        progress=False,
    )
    ref = profile.load_reference(root / "reference")
    predictor = load_model(model_dir, device="cpu")
    return {
        "root": root,
        "p": p,
        "ref": ref,
        "predictor": predictor,
        "cur_rows": cur_rows,
        "taxonomy": taxonomy,
        "model_dir": model_dir,
    }


def _check(setup, folder: Path, html: bool = False, metadata_csv: Path | None = None) -> dict:
    cur, skipped = batch.current_from_folder(
        folder,
        setup["ref"],
        setup["predictor"],
        workers=2,
        metadata_csv=metadata_csv,
        taxonomy=setup["taxonomy"],
        progress=False,
    )
    return drift.run_check(
        setup["ref"],
        cur,
        setup["p"],
        setup["root"] / "reports",
        {"kind": "folder", "path": str(folder)},
        skipped,
        html=html,
    )


def test_reference_profile(setup):
    ref = setup["ref"]
    frame, cols = ref.frame, ref.columns
    assert len(frame) == N_REF and frame["image_id"].is_unique
    # stratified: every diagnosis present, proportions kept within one image
    assert set(frame["dx"]) == set(setup["taxonomy"].classes("dx"))
    assert ref.projection.shape == (1280, setup["p"].projection_dim)
    assert len(cols["embedding"]) == setup["p"].projection_dim
    for group in (
        "stat_numeric",
        "stat_categorical",
        "metadata_numeric",
        "metadata_categorical",
        "prediction_numeric",
        "prediction_categorical",
    ):
        assert cols[group] and all(c in frame for c in cols[group]), group
    assert {"brightness", "contrast_rms", "lesion_area_fraction", "sharpness"} <= set(cols["stat_numeric"])
    probs = frame[[c for c in cols["prediction_numeric"] if c.startswith("p_dx_")]].sum(axis=1)
    assert (probs.sub(1).abs() < 1e-5).all()
    assert ref.schema["model"]["model_md5"] and ref.schema["lineage"]["data"]["md5"]


def test_reference_sampling_is_seeded_and_stratified(real_metadata):
    a = stratified_sample(real_metadata, 500, seed=3)
    b = stratified_sample(real_metadata, 500, seed=3)
    c = stratified_sample(real_metadata, 500, seed=4)
    assert len(a) == 500 and a["image_id"].tolist() == b["image_id"].tolist() != c["image_id"].tolist()
    share = real_metadata["dx"].value_counts(normalize=True)
    got = a["dx"].value_counts(normalize=True)
    assert ((got - share).abs() < 0.01).all()


def test_held_out_control_is_not_flagged_and_reports_render(setup):
    folder = mf.copy_images(setup["cur_rows"], IMAGES_DIR, setup["root"] / "control")
    csv = setup["root"] / "control.csv"
    setup["cur_rows"][["image_id", "age", "sex", "localization", "dx"]].to_csv(csv, index=False)
    s = _check(setup, folder, html=True, metadata_csv=csv)
    assert s["decision"] == decision.NO_DRIFT, s["reason"]
    assert s["n_current"] == N_CUR and s["drift_share"] < setup["p"].drift_share
    assert not s["key_features_drifted"] and not s["embedding_drift"]["drifted"]
    assert {"age", "sex", "localization"} <= set(s["column_drift"])
    assert s["classification"]["current"]["n"] == N_CUR
    out = Path(s["report_dir"])
    for name in ("data_drift", "prediction_drift", "classification"):
        html = (out / f"{name}.html").read_text()
        assert len(html) > 10_000 and "<html" in html.lower()
    for name in ("data_drift", "prediction_drift", "embedding_drift", "classification"):
        assert json.loads((out / f"{name}.json").read_text())["metrics"]
    assert json.loads((out / "summary.json").read_text())["decision"] == "no_drift"
    assert "no drift" in (out / "summary.md").read_text()


def test_labelled_batch_missing_a_class_still_gives_a_verdict(setup):
    """Evidently's per-class quality metric raises when a class has no labelled image in the
    current batch; the check must still decide, keep the scores and say why the report is missing."""
    rows = setup["cur_rows"]
    rows = rows[rows["dx"] != "df"]
    assert len(rows) >= setup["p"].min_batch_size
    folder = mf.copy_images(rows, IMAGES_DIR, setup["root"] / "no_df")
    csv = setup["root"] / "no_df.csv"
    rows[["image_id", "age", "sex", "localization", "dx"]].to_csv(csv, index=False)
    s = _check(setup, folder, metadata_csv=csv)
    assert s["decision"] in (decision.NO_DRIFT, decision.DRIFT)
    assert s["classification"]["current"]["n"] == len(rows)
    if "report_error" in s["classification"]:
        assert "df" in s["classification"]["report_error"]
    else:
        assert (Path(s["report_dir"]) / "classification.json").exists()


@pytest.mark.parametrize("shift", list(mf.SHIFTS))
def test_shifted_batch_is_flagged_with_plausible_features(setup, shift):
    folder = mf.shifted_copy(setup["cur_rows"], IMAGES_DIR, setup["root"] / shift, shift)
    s = _check(setup, folder)
    assert s["decision"] == decision.DRIFT, s["reason"]
    top_any, required = EXPECTED[shift]
    drifted = s["drifted_columns"]
    assert required <= set(drifted), (shift, drifted[:15])
    assert top_any & set(drifted[:10]), (shift, drifted[:10])
    assert s["reason"].startswith("drift:")
    # effect sizes rank the drifted columns, strongest first
    effects = [s["column_drift"][c]["effect"] for c in drifted]
    assert effects == sorted(effects, reverse=True)


def test_small_batch_says_not_enough_data(setup):
    rows = setup["cur_rows"].head(setup["p"].min_batch_size - 1)
    folder = mf.copy_images(rows, IMAGES_DIR, setup["root"] / "small")
    s = _check(setup, folder)
    assert s["decision"] == decision.NOT_ENOUGH_DATA and s["drift"] is None
    assert "not enough data" in s["reason"] and str(len(rows)) in s["reason"]
    assert not s["reports"] and (Path(s["report_dir"]) / "summary.json").exists()


def test_unreadable_image_is_skipped_and_named(setup, tmp_path):
    rows = setup["cur_rows"].head(3)
    folder = mf.copy_images(rows, IMAGES_DIR, tmp_path / "bad")
    (folder / "ISIC_broken.jpg").write_bytes(b"not a jpeg at all")
    cur, skipped = batch.current_from_folder(folder, setup["ref"], setup["predictor"], workers=1, progress=False)
    assert len(cur) == 3 and len(skipped) == 1 and "ISIC_broken.jpg" in skipped[0]


def test_bad_metadata_csv_names_row_and_field(setup, tmp_path):
    csv = tmp_path / "meta.csv"
    pd.DataFrame({"image_id": ["a", "b"], "dx": ["nv", "melanomaX"]}).to_csv(csv, index=False)
    with pytest.raises(MetadataError, match=r"row 3: field 'dx'.*melanomaX"):
        read_metadata_csv(csv, setup["taxonomy"])


def test_profile_of_another_model_is_refused(setup, tmp_path):
    other = mf.tiny_model_dir(tmp_path / "other", setup["taxonomy"], backbone="small_cnn")
    with pytest.raises(profile.MonitorError, match="differs from the model of the reference profile"):
        profile.check_model_matches(setup["ref"], other)


def test_retrain_decision_needs_a_new_data_version():
    drift = {"decision": decision.DRIFT, "reason": "drift: ..."}
    assert decision.retrain_decision(drift, "new", "old")["action"] == "retrain"
    assert decision.retrain_decision(drift, "same", "same")["action"] == "alert"
    assert decision.retrain_decision(drift, "new", None)["action"] == "alert"  # no champion to compare with
    assert decision.retrain_decision({"decision": decision.NO_DRIFT}, "new", "old")["action"] == "none"
    assert decision.retrain_decision({"decision": decision.NOT_ENOUGH_DATA}, "new", "old")["action"] == "none"


def test_inference_log_window_is_checked_like_a_folder(setup, tmp_path):
    """What the service logs (record_for on its predictions) is what the monitor checks: the held-out
    images logged then read back by time window give the same statistics and no drift."""
    from datetime import datetime, timedelta

    from pipeline.core.images import decode_rgb
    from pipeline.monitoring import inferencelog, logrecord

    ref, predictor = setup["ref"], setup["predictor"]
    rows = setup["cur_rows"]
    rgbs = [decode_rgb(IMAGES_DIR / f"{i}.jpg", i) for i in rows["image_id"]]
    out = predictor.predict(rgbs, tta=False)
    t0 = datetime(2026, 5, 1, 12, tzinfo=UTC)
    for j, (rgb, (_, meta)) in enumerate(zip(rgbs, rows.iterrows())):
        answer = logrecord.Answer.from_predictions(
            rgb,
            out,
            j,
            "lesionflow:test",
            metadata=meta[["age", "sex", "localization"]].to_dict(),
            timestamp=t0 + timedelta(minutes=j),
            source=f"{meta['image_id']}.jpg",
        )
        rec = logrecord.record_for(answer, projection=ref.projection, feature_config=ref.feature_config)
        inferencelog.append(rec, tmp_path / "log")
    old = logrecord.make_record(
        stats={},
        metadata=None,
        prediction=logrecord.Answer.from_predictions(rgbs[0], out, 0, "old").prediction,
        model_tag="old",
        timestamp=t0 - timedelta(days=3),
    )
    inferencelog.append(old, tmp_path / "log")  # outside the window
    cur = batch.current_from_log(tmp_path / "log", t0, t0 + timedelta(days=1))
    assert len(cur) == len(rows)
    folder, _ = batch.current_from_folder(
        mf.copy_images(rows, IMAGES_DIR, tmp_path / "imgs"), ref, predictor, workers=1, progress=False
    )
    merged = cur.assign(image_id=cur["source"].str[:-4]).merge(folder, on="image_id", suffixes=("_log", ""))
    for col in ("brightness", "lesion_area_fraction", "sharpness", "emb_00", "p_dx_nv"):
        assert merged[f"{col}_log"].to_numpy() == pytest.approx(
            merged[col].to_numpy(), rel=1e-5, abs=1e-3, nan_ok=True
        ), col  # float32 batches
    s = drift.run_check(ref, cur, setup["p"], tmp_path / "reports", {"kind": "log"}, html=False)
    assert s["decision"] == decision.NO_DRIFT, s["reason"]
    assert s["model_tags"] == ["lesionflow:test"] and s["embedding_drift"] is not None
