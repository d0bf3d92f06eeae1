"""The numbers of an evaluation: full metrics per taxonomy level with lesion-bootstrap CIs, the
headline DVC metrics (numbers only, the clinically decisive ones first), the CIs beside them, the
flat names the gates use and the DVC plot data."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.params import EvaluateParams
from pipeline.core.predictions import DECISION, pred_column, true_column
from pipeline.core.taxonomy import LEVELS, Taxonomy
from pipeline.evaluation import bootstrap, gates, metrics
from pipeline.evaluation.predictions import Predictions, binary_truth

#: Headline metrics per level, in the order DVC shows them (binary first: the referral decision).
LEVEL_ORDER = ("binary", "dx", "risk")
HEADLINE = ("balanced_accuracy", "roc_auc_macro", "accuracy", "macro_f1", "weighted_f1", "pr_auc_macro")
BINARY_HEADLINE = (
    "roc_auc",
    "pr_auc",
    "sensitivity_at_specificity_90",
    "sensitivity_at_specificity_95",
    "specificity_at_sensitivity_90",
    "specificity_at_sensitivity_95",
    "pauc_above_sensitivity_80",
)
OPERATING_POINT = ("sensitivity", "specificity", "ppv", "npv")
#: The evaluation's DVC metrics (``reports/evaluate/metrics.json``): the few numbers that decide
#: whether a model may ship, referral first. Every other number is in ``scores.json``.
KEY_METRICS = (
    "binary.sensitivity_at_operating_point",
    "binary.specificity_at_operating_point",
    "binary.roc_auc",
    "binary.pr_auc",
    "binary.ece",
    "dx.balanced_accuracy",
    "dx.roc_auc_macro",
    "dx.ece",
    "risk.balanced_accuracy",
    "ood.auroc",
    "ood.test_flagged_share",
)


def _statistic(a: Any, b: Any) -> Any:
    """Two bootstrap statistics as one."""

    def stat(w: np.ndarray) -> dict[str, np.ndarray]:
        return {**a(w), **b(w)}

    return stat


def level_metrics(
    pred: Predictions, tax: Taxonomy, threshold: float, p: EvaluateParams, with_ci: bool = True
) -> dict[str, Any]:
    """Full metrics of every available level, with lesion-bootstrap CIs of the headline values."""
    f = pred.frame
    full: dict[str, Any] = {}
    for lvl in LEVELS:
        probs = pred.level(lvl)
        if probs is None:
            continue
        y = tax.encode(f["dx"], lvl)
        rep = metrics.multiclass_report(y, probs, tax.classes(lvl))
        rep["calibration"] = metrics.top_label_reliability(y, probs, p.calibration_bins)
        stat = bootstrap.multiclass_statistic(y, probs)
        if lvl == "binary":
            y01 = (y == tax.positive_index).astype(int)
            rep["binary"] = metrics.binary_report(y01, pred.p_malignant, curve_points=p.curve_points)
            rep["binary"]["calibration"] = metrics.reliability(y01, pred.p_malignant, p.calibration_bins)
            rep["operating_point"] = metrics.at_threshold(y01, pred.p_malignant, threshold)
            stat = _statistic(stat, bootstrap.binary_statistic(y01, pred.p_malignant, threshold))
        if with_ci and p.bootstrap:
            rep["ci"] = bootstrap.bootstrap(
                stat, f["lesion_id"].to_numpy(), n_boot=p.bootstrap, seed=p.seed, confidence=p.confidence
            )
        full[lvl] = rep
    return full


def _round(v: Any) -> Any:
    return round(v, 6) if isinstance(v, float) else v


def headline(full: Mapping[str, Any]) -> dict[str, Any]:
    """The DVC metrics: per level, numbers only, the decisive ones first (for binary: sensitivity
    and specificity at the operating point, then the threshold-free scores)."""
    out: dict[str, Any] = {}
    for lvl in [lv for lv in LEVEL_ORDER if lv in full]:
        rep = full[lvl]
        h: dict[str, Any] = {}
        if lvl == "binary":
            op = rep["operating_point"]
            h.update({f"{k}_at_operating_point": op[k] for k in OPERATING_POINT if op[k] is not None})
            h.update({k: rep["binary"][k] for k in BINARY_HEADLINE})
            h["threshold"] = op["threshold"]
            h["ece"] = rep["binary"]["calibration"]["ece"]  # calibration of p(malignant)
        h.update({k: rep[k] for k in HEADLINE if rep.get(k) is not None})
        h.setdefault("ece", rep["calibration"]["ece"])
        out[lvl] = {k: _round(v) for k, v in h.items()}
    return out


def confidence(full: Mapping[str, Any]) -> dict[str, Any]:
    """The CIs of the headline metrics: ``{level: {metric: {"low", "high"}}}``."""
    return {
        lvl: {k: {"low": _round(v["low"]), "high": _round(v["high"])} for k, v in rep["ci"].items()}
        for lvl, rep in full.items()
        if "ci" in rep
    }


def key_metrics(head: Mapping[str, Any], names: tuple[str, ...] = KEY_METRICS) -> dict[str, Any]:
    """The :data:`KEY_METRICS` of a headline (nested ``level -> metric``), in that order."""
    out: dict[str, Any] = {}
    for name in names:
        group, metric = name.split(".", 1)
        value = (head.get(group) or {}).get(metric)
        if value is not None:
            out.setdefault(group, {})[metric] = value
    return out


def flat_for_gates(head: Mapping[str, Any]) -> dict[str, float]:
    """``level.metric`` -> value, the names the gates (params.yaml ``evaluate.gates``) use."""
    return gates.flatten(head)


def sizes(frames: Mapping[str, pd.DataFrame], tax: Taxonomy) -> dict[str, dict[str, int]]:
    """Images, lesions and malignant images per split."""
    return {
        s: {
            "images": int(len(f)),
            "lesions": int(f["lesion_id"].nunique()),
            "malignant": int(binary_truth(f, tax).sum()),
        }
        for s, f in frames.items()
    }


def confusion_csv(table: pd.DataFrame, level: str) -> pd.DataFrame | None:
    """The DVC confusion plot data of a level: actual vs predicted (binary: the decision at the
    operating point, not the argmax)."""
    actual = table.get(true_column(level))
    pred = table.get(DECISION) if level == "binary" else table.get(pred_column(level))
    if actual is None or pred is None:
        return None
    return pd.DataFrame({"actual": actual, "predicted": pred})


def plot_frames(full: Mapping[str, Any], table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The DVC plot data (``plots/<name>``): confusion per level, ROC and PR of p(malignant), and
    the reliability bins of every level."""
    out: dict[str, pd.DataFrame] = {}
    for lvl in full:
        cc = confusion_csv(table, lvl)
        if cc is not None:
            out[f"confusion_{lvl}.csv"] = cc
    out["roc.csv"] = pd.DataFrame(full["binary"]["binary"]["curves"]["roc"])
    out["pr.csv"] = pd.DataFrame(full["binary"]["binary"]["curves"]["pr"])
    rows = []
    for lvl, cal in zip(full, calibration_panels(full).values()):
        rows += [
            {
                "level": lvl,
                "mean_probability": round(b["mean_probability"], 6),
                "observed_frequency": round(b["observed_frequency"], 6),
                "count": b["count"],
            }
            for b in cal["bins"]
            if b["count"]
        ]
    out["calibration.csv"] = pd.DataFrame(rows)
    return out


def calibration_panels(full: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The reliability data of each level, titled: p(malignant) for binary, top-label otherwise."""
    return {
        ("p(malignant), binary" if lvl == "binary" else f"top-label confidence, {lvl}"): (
            rep["binary"]["calibration"] if lvl == "binary" else rep["calibration"]
        )
        for lvl, rep in full.items()
    }
