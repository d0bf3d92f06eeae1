"""The baselines a model is shown against on the same test split: the majority class (the
training prior for every image), a stratified random guess, and the EDA stage's feature-table
classifier. Each one's binary threshold is chosen on val like the model's."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.params import EvaluateParams
from pipeline.core.taxonomy import LEVELS, Taxonomy
from pipeline.evaluation import metrics
from pipeline.evaluation.predictions import Predictions, binary_truth
from pipeline.evaluation.summary import headline, level_metrics
from pipeline.features import linearmodel
from pipeline.model.inference import derive_levels


def baseline_predictions(kind: str, train: pd.DataFrame, frame: pd.DataFrame, tax: Taxonomy, seed: int) -> Predictions:
    """``majority``: the training prior for every image (argmax = the majority class);
    ``stratified``: a class drawn at random from the training prior, as a one-hot prediction."""
    prior = np.bincount(tax.encode(train["dx"], "dx"), minlength=len(tax.diagnoses)).astype(float)
    prior /= prior.sum()
    n = len(frame)
    if kind == "majority":
        dx = np.tile(prior, (n, 1))
    elif kind == "stratified":
        rng = np.random.default_rng(seed)
        dx = np.eye(len(prior))[rng.choice(len(prior), size=n, p=prior)]
    else:
        raise ValueError(kind)
    probs = {lvl: tax.derive(dx, lvl) for lvl in LEVELS}
    return Predictions(frame, probs, probs["binary"][:, tax.positive_index])


def eda_baseline(
    eda_dir: Path, splits: Mapping[str, pd.DataFrame], tax: Taxonomy
) -> tuple[dict[str, Predictions] | None, str]:
    """The EDA stage's feature-table classifier (``baseline_model.json`` applied to the image
    features of ``features.parquet``) on each split, or ``(None, reason)``."""
    model_file, table_file = eda_dir / "baseline_model.json", eda_dir / "features.parquet"
    for f in (model_file, table_file):
        if not f.exists():
            return None, f"{f} not found (run the eda stage)"
    try:
        model_json = json.loads(model_file.read_text())
        level = model_json.get("level", "dx")
        if list(model_json.get("classes", [])) != list(tax.classes(level)):
            raise ValueError(
                f"classes {model_json.get('classes')} differ from the taxonomy's {list(tax.classes(level))}"
            )
        table = pd.read_parquet(table_file).drop_duplicates("image_id").set_index("image_id")
        out = {}
        for name, frame in splits.items():
            missing = set(frame["image_id"]) - set(table.index)
            if missing:
                raise ValueError(f"{len(missing)} {name} images have no features, e.g. {sorted(missing)[0]}")
            native = linearmodel.predict_proba(model_json, table.loc[frame["image_id"]].reset_index())
            probs = derive_levels(native, level, tax)
            out[name] = Predictions(frame, probs, probs["binary"][:, tax.positive_index])
        return out, f"logistic regression on {len(model_json['features'])} image features, level {level}"
    except Exception as exc:  # a baseline must not take the evaluation down: say why it is missing
        return None, f"EDA feature classifier not scored: {type(exc).__name__}: {exc}"


def baseline_row(name: str, val: Predictions, test: Predictions, tax: Taxonomy, p: EvaluateParams) -> dict[str, Any]:
    """Headline test metrics of a baseline, its binary threshold chosen on val like the CNN's."""
    thr = metrics.choose_threshold(binary_truth(val.frame, tax), val.p_malignant, p.target_sensitivity)["threshold"]
    full = level_metrics(test, tax, thr, p, with_ci=False)
    head = headline(full)
    row: dict[str, Any] = {"model": name}
    for lvl in LEVELS:
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro"):
            row[f"{lvl}.{k}"] = head.get(lvl, {}).get(k)
    b = head.get("binary", {})
    for k in ("roc_auc", "pr_auc", "sensitivity_at_operating_point", "specificity_at_operating_point"):
        row[f"binary.{k}"] = b.get(k)
    return row


def baseline_table(
    frames: Mapping[str, pd.DataFrame], own: Mapping[str, Predictions], eda_dir: Path, tax: Taxonomy, p: EvaluateParams
) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """Rows for the model and every baseline; the binary curves of the model and the EDA
    classifier (for the ROC/PR figure); and a note on the EDA classifier (why it is missing)."""
    rows = [baseline_row("CNN (this model)", own["val"], own["test"], tax, p)]
    for kind, name in (("majority", "majority class"), ("stratified", "stratified random")):
        bv = baseline_predictions(kind, frames["train"], frames["val"], tax, p.seed)
        bt = baseline_predictions(kind, frames["train"], frames["test"], tax, p.seed + 1)
        rows.append(baseline_row(name, bv, bt, tax, p))
    yt = binary_truth(frames["test"], tax)
    curves = {}
    eda, note = eda_baseline(eda_dir, {"val": frames["val"], "test": frames["test"]}, tax)
    if eda is not None:
        rows.append(baseline_row("EDA feature classifier", eda["val"], eda["test"], tax, p))
        report = metrics.binary_report(yt, eda["test"].p_malignant, curve_points=p.curve_points)
        curves["EDA feature classifier"] = {
            **report["curves"],
            "roc_auc": report["roc_auc"],
            "pr_auc": report["pr_auc"],
        }
    return pd.DataFrame(rows), curves, note
