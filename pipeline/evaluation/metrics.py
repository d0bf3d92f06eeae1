"""Classification metrics for lesionflow: pure functions on arrays (scikit-learn + NumPy, no torch).

What the ``evaluate`` stage (and anyone auditing a model) computes, for each label taxonomy:

* :func:`multiclass_report` - accuracy, balanced accuracy, per-class precision / recall / F1 /
  support, macro and weighted F1, confusion matrices (counts and row-normalised), one-vs-rest
  ROC-AUC and PR-AUC (average precision) per class and their macro means;
* :func:`binary_report` - malignant-vs-benign extras: ROC-AUC, PR-AUC, sensitivity at 90/95 %
  specificity, specificity at 90/95 % sensitivity, partial AUC above 80 % sensitivity, ROC and PR
  curves;
* :func:`reliability` / :func:`top_label_reliability` - expected calibration error and the data of
  a reliability diagram;
* :func:`choose_threshold` / :func:`at_threshold` - the operating point: the highest decision
  threshold on the positive-class probability that reaches a target sensitivity (chosen on the
  validation split), and what it gives on another split. Decision rule: positive iff
  ``score >= threshold``;
Confidence intervals (a bootstrap over lesions) are :mod:`pipeline.evaluation.bootstrap`; per-subgroup
figures :mod:`pipeline.evaluation.subgroups`.

Conventions: ``y`` are integer class indices (or 0/1 for binary, 1 = positive/malignant),
``probs`` an ``(n, K)`` array of class probabilities and ``score`` the positive-class probability.
A metric that is undefined on the data (e.g. an AUC with one class absent) is ``None`` in reports
and NaN in bootstrap arrays; confidence intervals ignore NaN replicates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline.core.predictions import refers

__all__ = [
    "multiclass_report",
    "binary_report",
    "sensitivity_at_specificity",
    "specificity_at_sensitivity",
    "partial_auc_above_sensitivity",
    "reliability",
    "top_label_reliability",
    "choose_threshold",
    "at_threshold",
]


def json_float(x) -> float | None:
    """A JSON-friendly float: None for NaN/inf/None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _check(y: np.ndarray, probs: np.ndarray | None = None, score: np.ndarray | None = None) -> None:
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if probs is not None and (probs.ndim != 2 or probs.shape[0] != y.shape[0]):
        raise ValueError(f"probabilities must be (n={y.shape[0]}, K), got shape {probs.shape}")
    if score is not None and score.shape != y.shape:
        raise ValueError(f"scores must have the labels' shape {y.shape}, got {score.shape}")
    if len(y) == 0:
        raise ValueError("no samples")


# ----------------------------------------------------------------------------------------------
# point metrics


def one_vs_rest(y: np.ndarray, score: np.ndarray, c: int) -> tuple[float | None, float | None]:
    """ROC-AUC and average precision of ``score`` for class ``c`` against the rest; (None, None)
    when ``y`` holds only one side (the AUCs are not defined there)."""
    pos = y == c
    if not 0 < pos.sum() < len(y):
        return None, None
    return float(skm.roc_auc_score(pos, score)), float(skm.average_precision_score(pos, score))


def mean_defined(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are defined (not None); None when none is."""
    kept = [v for v in values if v is not None]
    return json_float(np.mean(kept)) if kept else None


def roc_auc_macro(y: np.ndarray, probs: np.ndarray) -> float | None:
    """The mean one-vs-rest ROC-AUC over the classes where it is defined (``multiclass_report``'s
    ``roc_auc_macro``)."""
    return mean_defined(one_vs_rest(y, probs[:, c], c)[0] for c in range(probs.shape[1]))


def multiclass_report(y: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict:
    """All per-taxonomy metrics of a K-class problem (K >= 2), predictions = argmax of ``probs``.

    Returns a JSON-ready dict: ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``weighted_f1``,
    ``roc_auc_macro``, ``pr_auc_macro`` (means over the classes where they are defined),
    ``per_class`` (precision, recall, f1, support, roc_auc, pr_auc per class name; None where not
    defined: recall, F1 and the AUCs of a class absent from ``y``, precision of a class never
    predicted) and
    ``confusion`` (``labels``, ``counts`` [true][pred] and ``normalized`` rows summing to 1, or 0
    for a class absent from ``y``).
    """
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    _check(y, probs)
    k = len(classes)
    if probs.shape[1] != k:
        raise ValueError(f"{probs.shape[1]} probability columns for {k} classes")
    labels = list(range(k))
    pred = probs.argmax(axis=1)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    ranking = [one_vs_rest(y, probs[:, c], c) for c in range(k)]
    predicted = np.bincount(pred, minlength=k)
    per_class = {
        name: {
            "precision": float(prec[c]) if predicted[c] else None,
            "recall": float(rec[c]) if sup[c] else None,
            "f1": float(f1[c]) if sup[c] else None,
            "support": int(sup[c]),
            "roc_auc": ranking[c][0],
            "pr_auc": ranking[c][1],
        }
        for c, name in enumerate(classes)
    }
    present = sup > 0
    return {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        # sklearn's balanced accuracy = mean recall over the classes present in y
        "balanced_accuracy": float(rec[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "weighted_f1": float(skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "roc_auc_macro": mean_defined(auc for auc, _ in ranking),
        "pr_auc_macro": mean_defined(ap for _, ap in ranking),
        "per_class": per_class,
        "confusion": confusion(y, pred, classes),
    }


def confusion(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """``labels``, ``counts`` [true][pred] and ``normalized`` rows summing to 1 (0 for an absent class)."""
    cm = skm.confusion_matrix(y, pred, labels=list(range(len(classes))))
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    return {"labels": list(classes), "counts": cm.astype(int).tolist(), "normalized": np.round(norm, 6).tolist()}


def _roc(y01: np.ndarray, score: np.ndarray):
    # every threshold kept: collinear points matter for "sensitivity at specificity"
    fpr, tpr, thr = skm.roc_curve(y01, score, drop_intermediate=False)
    return fpr, tpr, thr


def sensitivity_at_specificity(y01: Sequence[int], score: Sequence[float], specificity: float) -> float:
    """Highest sensitivity of any threshold whose specificity is at least ``specificity``."""
    y01, score = np.asarray(y01), np.asarray(score, dtype=np.float64)
    fpr, tpr, _ = _roc(y01, score)
    ok = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def specificity_at_sensitivity(y01: Sequence[int], score: Sequence[float], sensitivity: float) -> float:
    """Highest specificity of any threshold whose sensitivity is at least ``sensitivity``."""
    y01, score = np.asarray(y01), np.asarray(score, dtype=np.float64)
    fpr, tpr, _ = _roc(y01, score)
    ok = tpr >= sensitivity - 1e-12
    return float((1.0 - fpr[ok]).max()) if ok.any() else 0.0


def partial_auc_above_sensitivity(y01: Sequence[int], score: Sequence[float], min_sensitivity: float = 0.8) -> float:
    """Area under the ROC curve in the region sensitivity >= ``min_sensitivity``.

    As in the ISIC 2024 challenge: the integral of specificity over sensitivity from
    ``min_sensitivity`` to 1, so it ranges from 0 to ``1 - min_sensitivity`` (0.2 by default;
    a perfect classifier scores 0.2, a random one 0.02).
    """
    y01 = np.asarray(y01).astype(int)
    score = np.asarray(score, dtype=np.float64)
    # swap the roles of the classes: x = 1 - sensitivity, y = specificity
    fpr, tpr, _ = skm.roc_curve(1 - y01, -score, drop_intermediate=False)
    max_x = 1.0 - min_sensitivity
    stop = int(np.searchsorted(fpr, max_x, side="right"))
    if stop >= len(fpr):
        return float(skm.auc(fpr, tpr))
    y_at = np.interp(max_x, [fpr[stop - 1], fpr[stop]], [tpr[stop - 1], tpr[stop]])
    return float(skm.auc(np.append(fpr[:stop], max_x), np.append(tpr[:stop], y_at)))


def binary_report(
    y01: Sequence[int],
    score: Sequence[float],
    *,
    specificities: Iterable[float] = (0.90, 0.95),
    sensitivities: Iterable[float] = (0.90, 0.95),
    pauc_min_sensitivity: float = 0.80,
    curve_points: int | None = None,
) -> dict:
    """Threshold-free metrics of a binary score (1 = positive = malignant) and its curves.

    Keys: ``roc_auc``, ``pr_auc`` (average precision), ``prevalence``,
    ``sensitivity_at_specificity_90`` (etc.), ``specificity_at_sensitivity_95`` (etc.),
    ``pauc_above_sensitivity_80`` (0..0.2) and ``curves`` with ``roc`` (fpr, tpr, threshold) and
    ``pr`` (recall, precision, threshold). ``curve_points`` thins the curves for plotting.
    """
    y01 = np.asarray(y01).astype(int)
    score = np.asarray(score, dtype=np.float64)
    _check(y01, score=score)
    if not 0 < y01.sum() < len(y01):
        raise ValueError("binary metrics need both classes among the labels")
    out: dict = {
        "n": int(len(y01)),
        "n_positive": int(y01.sum()),
        "prevalence": float(y01.mean()),
        "roc_auc": float(skm.roc_auc_score(y01, score)),
        "pr_auc": float(skm.average_precision_score(y01, score)),
    }
    for s in specificities:
        out[f"sensitivity_at_specificity_{round(s * 100)}"] = sensitivity_at_specificity(y01, score, s)
    for s in sensitivities:
        out[f"specificity_at_sensitivity_{round(s * 100)}"] = specificity_at_sensitivity(y01, score, s)
    out[f"pauc_above_sensitivity_{round(pauc_min_sensitivity * 100)}"] = partial_auc_above_sensitivity(
        y01, score, pauc_min_sensitivity
    )
    fpr, tpr, thr = skm.roc_curve(y01, score)
    prec, rec, pthr = skm.precision_recall_curve(y01, score)
    roc = pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": np.minimum(thr, 1.0)})
    pr = pd.DataFrame({"recall": rec, "precision": prec, "threshold": np.append(pthr, 1.0)})
    if curve_points:
        roc, pr = _thin(roc, curve_points), _thin(pr, curve_points)
    out["curves"] = {"roc": roc.round(6).to_dict("list"), "pr": pr.round(6).to_dict("list")}
    return out


def _thin(df: pd.DataFrame, n: int) -> pd.DataFrame:
    if len(df) <= n:
        return df
    idx = np.unique(np.round(np.linspace(0, len(df) - 1, n)).astype(int))
    return df.iloc[idx].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# calibration


def reliability(outcome: Sequence[int], prob: Sequence[float], n_bins: int = 10) -> dict:
    """Expected calibration error and reliability-diagram data of probabilities of an outcome.

    ``prob[i]`` is the predicted probability that ``outcome[i] == 1``. Bins are equal-width on
    [0, 1] (the last one includes 1). ECE = sum over bins of (bin count / n) * |mean prob -
    observed frequency|; MCE is the largest such gap over non-empty bins.
    """
    outcome = np.asarray(outcome, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    _check(outcome, score=prob)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, prob, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf = np.bincount(idx, weights=prob, minlength=n_bins)
    hits = np.bincount(idx, weights=outcome, minlength=n_bins)
    nz = count > 0
    mean_conf = np.divide(conf, count, out=np.full(n_bins, np.nan), where=nz)
    freq = np.divide(hits, count, out=np.full(n_bins, np.nan), where=nz)
    gap = np.abs(mean_conf - freq)
    ece = float(np.sum(count[nz] / len(prob) * gap[nz]))
    return {
        "n_bins": n_bins,
        "ece": ece,
        "mce": float(gap[nz].max()),
        "bins": [
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": int(count[b]),
                "mean_probability": json_float(mean_conf[b]),
                "observed_frequency": json_float(freq[b]),
            }
            for b in range(n_bins)
        ],
    }


def top_label_reliability(y: Sequence[int], probs: np.ndarray, n_bins: int = 10) -> dict:
    """:func:`reliability` of the top-label confidence (max probability) vs being correct."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    _check(y, probs)
    return reliability(probs.argmax(1) == y, probs.max(1), n_bins)


# ----------------------------------------------------------------------------------------------
# operating point


def at_threshold(y01: Sequence[int], score: Sequence[float], threshold: float) -> dict:
    """Confusion counts, sensitivity, specificity, PPV and NPV of ``score >= threshold``."""
    y01 = np.asarray(y01).astype(bool)
    pred = refers(score, threshold)
    tp = int(np.sum(pred & y01))
    fn = int(np.sum(~pred & y01))
    fp = int(np.sum(pred & ~y01))
    tn = int(np.sum(~pred & ~y01))

    def ratio(a, b):
        return a / b if b else None

    return {
        "threshold": float(threshold),
        "tp": tp,
        "fn": fn,
        "fp": fp,
        "tn": tn,
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def choose_threshold(y01: Sequence[int], score: Sequence[float], target_sensitivity: float) -> dict:
    """The highest threshold t such that ``score >= t`` reaches ``target_sensitivity`` on this data.

    Highest, because among thresholds reaching the target sensitivity it flags the fewest
    benign lesions (best specificity). Returns :func:`at_threshold`'s dict plus
    ``target_sensitivity``.
    """
    y01 = np.asarray(y01).astype(int)
    score = np.asarray(score, dtype=np.float64)
    _check(y01, score=score)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    if y01.sum() == 0:
        raise ValueError("cannot choose a threshold for a sensitivity without positive samples")
    _, tpr, thr = _roc(y01, score)
    i = int(np.argmax(tpr >= target_sensitivity - 1e-12))  # tpr reaches 1 at the last threshold
    t = float(thr[i]) if np.isfinite(thr[i]) else float(score.max())
    out = at_threshold(y01, score, t)
    out["target_sensitivity"] = float(target_sensitivity)
    return out
