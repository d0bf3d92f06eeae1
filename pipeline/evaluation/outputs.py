"""The evaluation's outputs: what the evaluate stage writes from an :class:`~pipeline.evaluation.steps.Evaluation`.

``<out>/`` (machine-readable, ``artifacts/evaluate``)
    ``predictions_{val,test}.csv`` (prediction rows: :mod:`pipeline.core.predictions`),
    ``operating_point.json`` (the binary decision threshold chosen on val: it travels with the
    model), ``metrics_full.json`` (per-class metrics, confusion matrices, curves, calibration bins,
    baselines, champion), ``lineage.json``.
``<reports>/`` (for people, ``reports/evaluate``; DVC metrics and plots)
    ``metrics.json`` (the DVC metrics: the key test numbers, referral first), ``scores.json``
    (every headline test number per taxonomy), ``confidence.json`` (their 95 % lesion-bootstrap
    CIs), ``lineage.json``, ``gates.json`` + ``gates.md`` (the verdict), ``subgroups.csv``,
    ``baselines.csv``, ``plots/*.csv`` (DVC plots), ``figures/*.png``, ``gradcam/<class>.png``,
    ``model_card.md`` + ``model_card.html``.

The files a packaged model carries are named by :mod:`pipeline.model.bundle`. Each output folder is
replaced whole, only once everything in it is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import fsutil
from pipeline.core.params import EvaluateParams
from pipeline.core.predictions import refers, rule_text
from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation import figures, gates, metrics, modelcard, summary
from pipeline.evaluation.predictions import prediction_table
from pipeline.evaluation.steps import Evaluation, Inputs
from pipeline.model import bundle

#: Columns of baselines.csv shown in the model card.
BASELINE_COLUMNS = [
    "model",
    "dx.accuracy",
    "dx.balanced_accuracy",
    "dx.macro_f1",
    "dx.roc_auc_macro",
    "risk.balanced_accuracy",
    "binary.roc_auc",
    "binary.pr_auc",
    "binary.sensitivity_at_operating_point",
    "binary.specificity_at_operating_point",
]


def operating_point_record(ev: Evaluation, tax: Taxonomy, p: EvaluateParams, lin: dict) -> dict[str, Any]:
    """``operating_point.json``: the threshold, how it was chosen and what it gives (travels with the model)."""
    return {
        "threshold": ev.threshold,
        "target_sensitivity": p.target_sensitivity,
        "rule": rule_text(tax.binary_positive),
        "positive_class": tax.binary_positive,
        "chosen_on": "val",
        "val": ev.op_val,
        "test": ev.op_test,
        "model_md5": ev.model_md5,
        "lineage": {k: lin[k] for k in ("created_at", "git", "data")},
    }


def write_artifacts(ev: Evaluation, out: Path, tax: Taxonomy, op_record: dict, lin: dict) -> None:
    """Prediction rows, the operating point, lineage and every number (``metrics_full.json``)."""
    for split in ("test", "val"):
        prediction_table(ev.preds[split], tax, ev.threshold).to_csv(out / f"predictions_{split}.csv", index=False)
    fsutil.write_json(out / bundle.OPERATING_POINT_FILE, op_record)
    fsutil.write_json(out / "lineage.json", lin)
    fsutil.write_json(
        out / "metrics_full.json",
        {
            "test": ev.full,
            "operating_point": op_record,
            "baselines": ev.baselines.to_dict("records"),
            "champion": ev.champion,
            "eda_note": ev.eda_note,
            "metadata_attribution": ev.attribution,
            "trust": {"calibration": ev.calibration, "ood": ev.ood},
            "retrieval": ev.retrieval or {"note": ev.retrieval_note},
        },
    )


def scores(ev: Evaluation) -> dict[str, Any]:
    """``scores.json``: every headline number of the test split (what the model's record keeps)."""
    r = ev.retrieval
    similar = {}
    if r:
        similar = {
            "similar_cases": {
                "knn_balanced_accuracy": round(r["knn"]["balanced_accuracy"], 6),
                "knn_binary_roc_auc": round(r["knn"]["binary_roc_auc"], 6),
                "precision_at_k": round(r["precision_at_k"], 6),
            }
        }
    return {
        **ev.head,
        **similar,
        "gates_passed": int(bool(ev.verdict["passed"])),
        "gates_failed": len(ev.verdict["failed"]),
        "val_sensitivity_at_operating_point": ev.op_val["sensitivity"],
        "val_specificity_at_operating_point": ev.op_val["specificity"],
        "n_val": len(ev.frames["val"]),
        "n_test": len(ev.frames["test"]),
    }


def dvc_metrics(ev: Evaluation) -> dict[str, Any]:
    """``metrics.json`` (the DVC metrics): the key numbers only (:data:`summary.KEY_METRICS`)."""
    return {**summary.key_metrics(ev.head), "gates_passed": int(bool(ev.verdict["passed"]))}


def write_tables(ev: Evaluation, rep: Path, lin: dict) -> None:
    """The DVC metrics, scores, CIs, lineage, the verdict, subgroups and baselines."""
    fsutil.write_json(rep / "metrics.json", dvc_metrics(ev), sort_keys=False)
    fsutil.write_json(rep / bundle.SCORES_FILE, scores(ev), sort_keys=False)
    fsutil.write_json(rep / bundle.CONFIDENCE_FILE, summary.confidence(ev.full))
    fsutil.write_json(rep / "lineage.json", lin)
    fsutil.write_json(rep / bundle.GATES_FILE, ev.verdict)
    fsutil.atomic_write_text(rep / "gates.md", "# Evaluation gates\n\n" + gates.verdict_markdown(ev.verdict))
    ev.subgroups.round(4).to_csv(rep / "subgroups.csv", index=False)
    ev.baselines.round(4).to_csv(rep / "baselines.csv", index=False)


def plot_confusions(ev: Evaluation, folder: Path, tax: Taxonomy) -> None:
    """One confusion matrix per taxonomy on test; the binary one at the operating point."""
    y = ev.frames["test"]["dx"]
    for lvl in ev.full:
        report, note = ev.full[lvl], "argmax"
        if lvl == "binary":  # the confusion at the operating point, not at argmax
            decided = np.where(
                refers(ev.preds["test"].p_malignant, ev.threshold), tax.positive_index, 1 - tax.positive_index
            )
            report = metrics.multiclass_report(tax.encode(y, "binary"), np.eye(2)[decided], tax.classes("binary"))
            note = f"binary decision at the operating point (p >= {ev.threshold:.3f})"
        title = f"Confusion matrix, {modelcard.LEVEL_TITLES[lvl]} (test)"
        figures.plot_confusion(report, title, folder / f"confusion_{lvl}.png", note)


def write_plots(ev: Evaluation, rep: Path, tax: Taxonomy, table: pd.DataFrame) -> None:
    """DVC plot data (``plots/*.csv``) and the PNG figures."""
    (rep / "plots").mkdir()
    (rep / "figures").mkdir()
    for name, frame in summary.plot_frames(ev.full, table).items():
        frame.to_csv(rep / "plots" / name, index=False)
    plot_confusions(ev, rep / "figures", tax)
    figures.plot_roc_pr(ev.curves, ev.op_test, rep / "figures" / "roc_pr.png")
    figures.plot_reliability(summary.calibration_panels(ev.full), rep / "figures" / "reliability.png")
    before_after = {
        f"{name}, {when} calibration": ev.calibration[key]["reliability"][when]
        for key, name in (("dx", "7 diagnoses"), ("p_malignant", "p(malignant)"))
        if key in ev.calibration
        for when in ("before", "after")
    }
    if before_after:
        figures.plot_reliability(before_after, rep / "figures" / "calibration_before_after.png")
    if ev.ood is not None:
        figures.plot_ood_scores(ev.ood, rep / "figures" / "ood_scores.png")
    if ev.attribution:
        figures.plot_attribution(ev.attribution, rep / "figures" / "metadata_attribution.png")


def write_card(
    ev: Evaluation, rep: Path, inputs: Inputs, tax: Taxonomy, p: EvaluateParams, records: dict, gradcam: dict[str, str]
) -> None:
    """The model card, Markdown and HTML (``records``: the operating point's and the lineage)."""
    card = modelcard.model_card(
        modelcard.CardInputs(
            config=ev.config,
            full=ev.full,
            model_dir=str(inputs.model),
            model_md5=ev.model_md5,
            operating_point=records["operating_point"],
            lineage=records["lineage"],
            sizes=summary.sizes(ev.frames, tax),
            test_distribution=ev.frames["test"]["dx"].value_counts().to_dict(),
            confidence=p.confidence,
            n_boot=p.bootstrap,
            verdict=ev.verdict,
            verdict_md=gates.verdict_markdown(ev.verdict),
            baselines=ev.baselines[[c for c in BASELINE_COLUMNS if c in ev.baselines]],
            eda_note=ev.eda_note,
            champion=ev.champion,
            flat=summary.flat_for_gates(ev.head),
            subgroups=ev.subgroups,
            subgroup_margin=p.subgroup_margin,
            subgroup_min_positives=p.subgroup_min_positives,
            gradcam=gradcam,
            attribution=ev.attribution,
            calibration=ev.calibration,
            ood=ev.ood,
            retrieval=ev.retrieval,
            retrieval_note=ev.retrieval_note,
        )
    )
    fsutil.atomic_write_text(rep / "model_card.md", card)
    fsutil.atomic_write_text(rep / "model_card.html", modelcard.render_html(card, "lesionflow model card"))


def write_outputs(ev: Evaluation, inputs: Inputs, tax: Taxonomy, p: EvaluateParams, lin: dict) -> None:
    """Every output; each output folder is replaced only once complete."""
    op_record = operating_point_record(ev, tax, p, lin)
    table = prediction_table(ev.preds["test"], tax, ev.threshold)
    inputs.out.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.staged_dir(inputs.reports) as rep, fsutil.staged_dir(inputs.out) as art:
        write_artifacts(ev, art, tax, op_record, lin)
        write_tables(ev, rep, lin)
        write_plots(ev, rep, tax, table)
        gradcam = figures.gradcam_grids(
            ev.predictor, table, ev.frames["test"], tax, inputs.images, p.gradcam_per_class, p.seed, rep / "gradcam"
        )
        write_card(ev, rep, inputs, tax, p, {"operating_point": op_record, "lineage": lin}, gradcam)
