"""The evaluate stage end to end on a tiny real sample with a tiny (untrained) model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation.predictions import cached_predictions
from pipeline.model import inference
from pipeline.stages import evaluate
from tests.registry_fixtures import write_model_dir

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _save_model(out: Path, seed: int, fusion: bool) -> Path:
    """An untrained small model in exactly the format pipeline.stages.train writes."""
    return write_model_dir(out, input_size=(32, 48), metadata_fusion=fusion, seed=seed)


@pytest.fixture(scope="module")
def workspace(tiny_data, tmp_path_factory):
    """Splits of the tiny sample (2 lesions per diagnosis in each split), a model and params."""
    root = tmp_path_factory.mktemp("evaluate")
    meta = pd.read_csv(tiny_data / "HAM10000_metadata.csv", dtype={"lesion_id": str, "image_id": str})
    lesions = meta.drop_duplicates("lesion_id").sort_values("lesion_id")
    rank = lesions.groupby("dx").cumcount()
    split_of = dict(zip(lesions["lesion_id"], np.where(rank < 2, "train", np.where(rank < 4, "val", "test"))))
    meta["split"] = meta["lesion_id"].map(split_of)
    splits = root / "splits"
    splits.mkdir()
    for s in ("train", "val", "test"):
        meta[meta["split"] == s].sort_values("image_id").to_csv(splits / f"{s}.csv", index=False)
    model_dir = _save_model(root / "model", seed=0, fusion=True)
    # an EDA feature-table baseline in the EDA stage's format (random features and weights)
    eda = root / "eda"
    eda.mkdir()
    rng = np.random.default_rng(0)
    feats = pd.DataFrame(
        {
            "image_id": meta["image_id"],
            "f_a": rng.normal(size=len(meta)),
            "f_b": rng.normal(size=len(meta)),
            "f_c": rng.normal(size=len(meta)),
        }
    )
    feats.loc[0, "f_a"] = np.nan
    feats.to_parquet(eda / "features.parquet")
    (eda / "baseline_model.json").write_text(
        json.dumps(
            {
                "format": "lesionflow.linear-softmax/v1",
                "level": "dx",
                "classes": list(Taxonomy.default().diagnoses),
                "features": ["f_a", "f_b", "f_c"],
                "impute": [0.0, 0.0, 0.0],
                "mean": [0.0, 0.0, 0.0],
                "scale": [1.0, 1.0, 1.0],
                "coef": rng.normal(size=(7, 3)).tolist(),
                "intercept": [0.0] * 7,
            }
        )
    )
    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    ev = doc["evaluate"]
    ev.update(bootstrap=100, gradcam_per_class=1, batch_size=16)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    return {
        "root": root,
        "splits": splits,
        "images": tiny_data / "images",
        "params": params_file,
        "model": model_dir,
        "champion": root / "champion",
        "eda": eda,
    }


def _params(ws, **changes) -> Path:
    doc = yaml.safe_load(ws["params"].read_text())
    doc["evaluate"].update(changes)
    path = ws["root"] / f"params-{len(list(ws['root'].glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _argv(ws, out: Path, rep: Path, params_file: Path | None = None, model: Path | None = None) -> list[str]:
    """The stage's command line for the workspace, writing to ``out`` and ``rep``."""
    return [
        *("--params", str(params_file or ws["params"])),
        *("--model", str(model or ws["model"])),
        *("--splits", str(ws["splits"])),
        *("--images", str(ws["images"])),
        *("--eda", str(ws["eda"])),
        *("--champion", str(ws["champion"])),
        *("--retrieval", str(ws["root"] / "no-retrieval-index")),
        *("--out", str(out)),
        *("--reports", str(rep)),
        *("--device", "cpu", "--no-cache", "--no-progress"),
    ]


def _run(ws, tag: str, params_file: Path | None = None) -> tuple[int, Path, Path]:
    out, rep = ws["root"] / tag / "art", ws["root"] / tag / "rep"
    return evaluate.main(_argv(ws, out, rep, params_file)), out, rep


@pytest.fixture(scope="module")
def first_run(workspace):
    return _run(workspace, "first")


def test_stage_writes_everything_and_succeeds_when_gates_fail(workspace, first_run):
    rc, out, rep = first_run
    assert rc == 0  # an untrained model fails the gates: that is data, not a crash
    verdict = json.loads((rep / "gates.json").read_text())
    assert verdict["passed"] is False and "absolute:binary.roc_auc" in verdict["failed"]
    assert not verdict["champion_present"] and {g["gate"] for g in verdict["gates"]} == {"absolute"}

    test = pd.read_csv(workspace["splits"] / "test.csv")
    pred = pd.read_csv(out / "predictions_test.csv")
    assert list(pred["image_id"]) == list(test["image_id"])
    dx_cols = [f"p_dx_{c}" for c in Taxonomy.default().diagnoses]
    assert np.allclose(pred[dx_cols].sum(axis=1), 1.0, atol=1e-4)
    for col in (
        "lesion_id",
        "dx",
        "dx_pred",
        "risk_true",
        "risk_pred",
        "binary_true",
        "p_malignant",
        "p_risk_benign_at_risk",
        "decision",
        "threshold",
    ):
        assert col in pred

    # the operating point reaches the target sensitivity on val, where it was chosen
    op = json.loads((out / "operating_point.json").read_text())
    val = pd.read_csv(out / "predictions_val.csv")
    malignant = val["binary_true"] == "malignant"
    assert (val.loc[malignant, "p_malignant"] >= op["threshold"] - 1e-6).mean() >= op["target_sensitivity"]
    assert op["val"]["sensitivity"] >= op["target_sensitivity"]

    # DVC's views: the key numbers only, the referral decision first; every number in scores.json,
    # the CIs beside them
    m = json.loads((rep / "metrics.json").read_text())
    assert list(m) == ["binary", "dx", "risk", "gates_passed"] and m["gates_passed"] == 0
    assert list(m["binary"]) == [
        "sensitivity_at_operating_point",
        "specificity_at_operating_point",
        "roc_auc",
        "pr_auc",
        "ece",
    ]
    assert list(m["dx"]) == ["balanced_accuracy", "roc_auc_macro", "ece"] and list(m["risk"]) == ["balanced_accuracy"]
    scores = json.loads((rep / "scores.json").read_text())
    assert scores["binary"]["roc_auc"] == m["binary"]["roc_auc"] and "macro_f1" in scores["dx"]
    assert "ece_before_calibration" in scores["dx"] and "ood" not in scores  # an untrained model: no OOD detector
    ci = json.loads((rep / "confidence.json").read_text())
    assert ci["binary"]["roc_auc"]["low"] <= m["binary"]["roc_auc"] <= ci["binary"]["roc_auc"]["high"]
    lin = json.loads((rep / "lineage.json").read_text())
    assert lin["data"]["md5"] and lin["params"]["evaluate"]["bootstrap"] == 100

    card = (rep / "model_card.md").read_text()
    for text in (
        "Not a diagnostic device",
        "Operating point",
        "Subgroups",
        "Baselines",
        "Limitations",
        "Lineage",
        "majority class",
        "stratified random",
        "EDA feature classifier",
    ):
        assert text in card
    assert "<table>" in (rep / "model_card.html").read_text()
    trust = json.loads((out / "metrics_full.json").read_text())["trust"]["calibration"]
    for key in ("dx", "p_malignant"):  # measured before and after temperature scaling, never assumed equal
        assert 0.0 <= trust[key]["roc_auc_before"] <= 1.0 and 0.0 <= trust[key]["roc_auc_after"] <= 1.0
    assert "ROC-AUC before" in card and "unchanged" not in card
    for f in (
        "figures/confusion_dx.png",
        "figures/roc_pr.png",
        "figures/reliability.png",
        "figures/metadata_attribution.png",
        "plots/confusion_binary.csv",
        "plots/roc.csv",
        "subgroups.csv",
        "baselines.csv",
        "gates.md",
    ):
        assert (rep / f).stat().st_size > 0, f
    assert len(list((rep / "gradcam").glob("*.png"))) == 7
    base = pd.read_csv(rep / "baselines.csv")
    assert list(base["model"]) == ["CNN (this model)", "majority class", "stratified random", "EDA feature classifier"]
    assert base.loc[1, "dx.balanced_accuracy"] == pytest.approx(1 / 7, abs=1e-3)  # one class, always
    assert base.loc[1, "binary.roc_auc"] == pytest.approx(0.5)  # a constant score
    sub = pd.read_csv(rep / "subgroups.csv")
    assert set(sub["attribute"]) == {"sex", "age_band", "localization_group", "dx_type"}
    conf = pd.read_csv(rep / "plots" / "confusion_dx.csv")
    assert list(conf.columns) == ["actual", "predicted"] and len(conf) == len(test)


def test_regression_gates_against_a_champion(workspace):
    champ = workspace["root"] / "champion"
    _save_model(champ, seed=1, fusion=False)  # another model: predicted on the same test split
    quick = _params(workspace, gradcam_per_class=0)
    try:
        rc, out, rep = _run(workspace, "vs_champion", quick)
        assert rc == 0
        verdict = json.loads((rep / "gates.json").read_text())
        assert verdict["champion_present"]
        reg = [g for g in verdict["gates"] if g["gate"] == "regression"]
        assert {g["metric"] for g in reg} == {
            "binary.roc_auc",
            "binary.sensitivity_at_operating_point",
            "dx.balanced_accuracy",
            "dx.roc_auc_macro",
        }
        assert all(g["champion_value"] is not None for g in reg)
        assert "Champion" in (rep / "model_card.md").read_text()

        # the champion is this very model with its operating point: no regression by construction
        shutil.rmtree(champ)
        shutil.copytree(workspace["model"], champ)
        shutil.copy(out / "operating_point.json", champ / "operating_point.json")
        rc, out, rep = _run(workspace, "same", quick)
        verdict = json.loads((rep / "gates.json").read_text())
        reg = [g for g in verdict["gates"] if g["gate"] == "regression"]
        assert reg and all(g["passed"] for g in reg)
        assert all(g["value"] == pytest.approx(g["champion_value"]) for g in reg)
    finally:
        shutil.rmtree(champ, ignore_errors=True)


def test_missing_model_is_a_clear_error_and_keeps_previous_outputs(workspace, first_run, capsys):
    rc, out, rep = first_run  # outputs of a good run
    before = (rep / "metrics.json").read_text()
    rc = evaluate.main(_argv(workspace, out, rep, model=workspace["root"] / "nope"))
    assert rc == 2
    assert "nope/config.json" in capsys.readouterr().err
    assert (rep / "metrics.json").read_text() == before


def test_prediction_cache_reuses_and_invalidates(workspace, tmp_path):
    frame = pd.read_csv(workspace["splits"] / "test.csv", dtype={"image_id": str})
    model_dir = shutil.copytree(workspace["model"], tmp_path / "model")
    loads = []

    def load():
        loads.append(1)
        return inference.load_model(model_dir, device="cpu")

    args = (frame, workspace["images"], 16, "test", tmp_path / "cache")
    first = cached_predictions(model_dir, load, *args)
    again = cached_predictions(model_dir, load, *args)
    assert len(loads) == 1  # the second call read the cache
    assert np.array_equal(first.p_malignant, again.p_malignant)
    assert np.array_equal(first.level("dx"), again.level("dx"))
    _save_model(model_dir, seed=5, fusion=True)  # new weights: predict again
    changed = cached_predictions(model_dir, load, *args)
    assert len(loads) == 2 and not np.array_equal(changed.p_malignant, first.p_malignant)
