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
* :func:`bootstrap` - 95 % confidence intervals by resampling **groups** (lesions), not images:
  HAM10000 has several images of one lesion, and they are not independent. The resampling is
  vectorised: each replicate is a row of integer weights (how many times each image's lesion was
  drawn), and the ``w_*`` functions compute metrics for all replicates at once;
* :func:`subgroup_table` - the main metrics per subgroup (sex, age band, ...) with a flag on
  groups whose binary sensitivity falls more than a margin below the overall figure.

Conventions: ``y`` are integer class indices (or 0/1 for binary, 1 = positive/malignant),
``probs`` an ``(n, K)`` array of class probabilities and ``score`` the positive-class probability.
A metric that is undefined on the data (e.g. an AUC with one class absent) is ``None`` in reports
and NaN in bootstrap arrays; confidence intervals ignore NaN replicates.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

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
    "resample_weights",
    "bootstrap",
    "w_confusion",
    "confusion_stats",
    "w_binary_curves",
    "w_roc_auc",
    "w_average_precision",
    "w_sensitivity_at_specificity",
    "multiclass_statistic",
    "binary_statistic",
    "age_bands",
    "subgroup_table",
]


def _f(x) -> float | None:
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


def multiclass_report(y: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict:
    """All per-taxonomy metrics of a K-class problem (K >= 2), predictions = argmax of ``probs``.

    Returns a JSON-ready dict: ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``weighted_f1``,
    ``roc_auc_macro``, ``pr_auc_macro`` (means over the classes where they are defined),
    ``per_class`` (precision, recall, f1, support, roc_auc, pr_auc per class name) and
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
    prec, rec, f1, sup = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    cm = skm.confusion_matrix(y, pred, labels=labels)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    per_class: dict[str, dict] = {}
    aucs, aps = [], []
    for c, name in enumerate(classes):
        pos = y == c
        auc = ap = None
        if 0 < pos.sum() < len(y):
            auc = float(skm.roc_auc_score(pos, probs[:, c]))
            ap = float(skm.average_precision_score(pos, probs[:, c]))
            aucs.append(auc)
            aps.append(ap)
        per_class[name] = {
            "precision": float(prec[c]),
            "recall": float(rec[c]),
            "f1": float(f1[c]),
            "support": int(sup[c]),
            "roc_auc": auc,
            "pr_auc": ap,
        }
    present = sup > 0
    return {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        # sklearn's balanced accuracy = mean recall over the classes present in y
        "balanced_accuracy": float(rec[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "weighted_f1": float(skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "roc_auc_macro": _f(np.mean(aucs)) if aucs else None,
        "pr_auc_macro": _f(np.mean(aps)) if aps else None,
        "per_class": per_class,
        "confusion": {
            "labels": list(classes),
            "counts": cm.astype(int).tolist(),
            "normalized": np.round(norm, 6).tolist(),
        },
    }


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
                "mean_probability": _f(mean_conf[b]),
                "observed_frequency": _f(freq[b]),
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
    pred = np.asarray(score, dtype=np.float64) >= threshold
    tp = int(np.sum(pred & y01))
    fn = int(np.sum(~pred & y01))
    fp = int(np.sum(pred & ~y01))
    tn = int(np.sum(~pred & ~y01))

    def ratio(a, b):
        return a / b if b else None

    return {
        "threshold": float(threshold),
        "tp": tp, "fn": fn, "fp": fp, "tn": tn,
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


# ----------------------------------------------------------------------------------------------
# vectorised weighted metrics (one row of weights per bootstrap replicate)


def resample_weights(groups: Sequence, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n) weights: how often each sample's group is drawn when the G groups are
    resampled G times with replacement (a cluster bootstrap)."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    g = int(inverse.max()) + 1
    counts = rng.multinomial(g, np.full(g, 1.0 / g), size=n_boot)  # (B, G)
    return counts[:, inverse].astype(np.float64)


def w_confusion(w: np.ndarray, y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(B, k, k) weighted confusion matrices [true, pred]."""
    cell = np.asarray(y, dtype=np.int64) * k + np.asarray(pred, dtype=np.int64)
    onehot = np.zeros((len(cell), k * k))
    onehot[np.arange(len(cell)), cell] = 1.0
    return (w @ onehot).reshape(-1, k, k)


def confusion_stats(cm: np.ndarray) -> dict[str, np.ndarray]:
    """accuracy, balanced accuracy and macro F1 (over classes present) of (B, k, k) matrices."""
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    total = cm.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        denom = support + predicted
        f1 = np.where(denom > 0, 2 * tp / denom, 0.0)
        present = support > 0
        n_present = present.sum(axis=1)
        return {
            "accuracy": tp.sum(axis=1) / total,
            "balanced_accuracy": np.nansum(recall, axis=1) / n_present,
            "macro_f1": np.where(present, f1, 0.0).sum(axis=1) / n_present,
        }


def w_binary_curves(w: np.ndarray, y01: np.ndarray, score: np.ndarray):
    """Weighted cumulative (tp, fp) at each distinct threshold, highest first: (B, U) each, plus
    the positive and negative totals (B,)."""
    y01 = np.asarray(y01).astype(np.float64)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s = np.asarray(score, dtype=np.float64)[order]
    ws = w[:, order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each tie group
    tp = np.cumsum(ws * y01[order], axis=1)[:, last]
    fp = np.cumsum(ws * (1.0 - y01[order]), axis=1)[:, last]
    return tp, fp, tp[:, -1], fp[:, -1]


def _rates(w, y01, score):
    tp, fp, p, n = w_binary_curves(w, y01, score)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / p[:, None]
        fpr = fp / n[:, None]
    zeros = np.zeros((len(tp), 1))
    return np.hstack([zeros, tpr]), np.hstack([zeros, fpr]), tp, fp, p


def w_roc_auc(w: np.ndarray, y01: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(B,) weighted ROC-AUC (trapezoidal, ties handled like scikit-learn); NaN without both classes."""
    tpr, fpr, *_ = _rates(w, y01, score)
    return np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2.0, axis=1)


def w_average_precision(w: np.ndarray, y01: np.ndarray, score: np.ndarray) -> np.ndarray:
    """(B,) weighted average precision (scikit-learn's definition)."""
    tpr, _, tp, fp, p = _rates(w, y01, score)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
    ap = np.sum(np.diff(tpr, axis=1) * precision, axis=1)
    return np.where(p > 0, ap, np.nan)


def w_sensitivity_at_specificity(w: np.ndarray, y01: np.ndarray, score: np.ndarray, specificity: float) -> np.ndarray:
    """(B,) highest sensitivity at a specificity of at least ``specificity``."""
    tpr, fpr, *_ = _rates(w, y01, score)
    ok = (1.0 - fpr) >= specificity - 1e-12
    return np.where(ok, tpr, 0.0).max(axis=1)


def multiclass_statistic(y: Sequence[int], probs: np.ndarray) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A bootstrap statistic: weights (B, n) -> accuracy, balanced accuracy, macro F1, macro AUC."""
    y = np.asarray(y, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(1)
    present = [c for c in range(k) if 0 < np.sum(y == c) < len(y)]

    def stat(w: np.ndarray) -> dict[str, np.ndarray]:
        out = confusion_stats(w_confusion(w, y, pred, k))
        if present:
            aucs = np.stack([w_roc_auc(w, (y == c).astype(int), probs[:, c]) for c in present], axis=1)
            valid = np.isfinite(aucs)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["roc_auc_macro"] = np.where(valid, aucs, 0.0).sum(axis=1) / valid.sum(axis=1)
        return out

    return stat


def binary_statistic(
    y01: Sequence[int], score: Sequence[float], threshold: float | None = None,
    specificities: Iterable[float] = (0.90, 0.95),
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A bootstrap statistic: weights -> ROC-AUC, PR-AUC, sensitivity at the given specificities
    and, with a ``threshold``, ``sensitivity_at_operating_point`` and
    ``specificity_at_operating_point`` of ``score >= threshold``."""
    y01 = np.asarray(y01).astype(int)
    score = np.asarray(score, dtype=np.float64)
    specs = list(specificities)

    def stat(w: np.ndarray) -> dict[str, np.ndarray]:
        out = {"roc_auc": w_roc_auc(w, y01, score), "pr_auc": w_average_precision(w, y01, score)}
        for s in specs:
            out[f"sensitivity_at_specificity_{round(s * 100)}"] = w_sensitivity_at_specificity(w, y01, score, s)
        if threshold is not None:
            pred = (score >= threshold).astype(int)
            cm = w_confusion(w, y01, pred, 2)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["sensitivity_at_operating_point"] = cm[:, 1, 1] / cm[:, 1].sum(axis=1)
                out["specificity_at_operating_point"] = cm[:, 0, 0] / cm[:, 0].sum(axis=1)
        return out

    return stat


def bootstrap(
    statistic: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    groups: Sequence,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk: int = 200,
) -> dict[str, dict]:
    """Percentile confidence intervals of every value of ``statistic`` under a group bootstrap.

    ``statistic`` maps a (B, n) weight matrix to named (B,) arrays (see :func:`multiclass_statistic`);
    the point estimate is its value with all weights 1. Returns
    ``{name: {"estimate", "low", "high", "std", "n_boot", "n_groups"}}``.
    """
    groups = np.asarray(groups)
    n = len(groups)
    rng = np.random.default_rng(seed)
    point = statistic(np.ones((1, n)))
    draws: dict[str, list[np.ndarray]] = {k: [] for k in point}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        vals = statistic(resample_weights(groups, b, rng))
        for k in draws:
            draws[k].append(np.asarray(vals[k], dtype=np.float64))
        done += b
    alpha = (1.0 - confidence) / 2.0
    out = {}
    n_groups = int(len(np.unique(groups)))
    for k, parts in draws.items():
        arr = np.concatenate(parts)
        arr = arr[np.isfinite(arr)]
        out[k] = {
            "estimate": _f(point[k][0]),
            "low": _f(np.quantile(arr, alpha)) if arr.size else None,
            "high": _f(np.quantile(arr, 1 - alpha)) if arr.size else None,
            "std": _f(arr.std(ddof=1)) if arr.size > 1 else None,
            "n_boot": int(n_boot),
            "n_valid": int(arr.size),
            "n_groups": n_groups,
        }
    return out


# ----------------------------------------------------------------------------------------------
# subgroups


def age_bands(age: Sequence[float], edges: Sequence[float]) -> list[str]:
    """Label ages with bands ``[e_i, e_{i+1})`` named like ``"30-44"``; the last band is
    ``">=e_last"``-open when the last edge is exceeded; missing ages are ``"unknown"``."""
    edges = list(edges)
    out = []
    for a in age:
        if a is None or (isinstance(a, float) and math.isnan(a)):
            out.append("unknown")
            continue
        i = int(np.searchsorted(edges, a, side="right")) - 1
        if i < 0:
            out.append(f"<{edges[0]:g}")
        elif i >= len(edges) - 1:
            out.append(f">={edges[-1]:g}")
        else:
            out.append(f"{edges[i]:g}-{edges[i + 1] - 1:g}")
    return out


def subgroup_table(
    attributes: Mapping[str, Sequence[str]],
    y_dx: Sequence[int],
    dx_probs: np.ndarray,
    y01: Sequence[int],
    score: Sequence[float],
    threshold: float,
    margin: float,
    min_positives: int = 10,
) -> pd.DataFrame:
    """Main metrics per subgroup of each attribute (e.g. ``{"sex": [...], "age_band": [...]}``).

    Columns: attribute, group, n_images, n_positive, accuracy_dx, balanced_accuracy_dx, roc_auc
    (binary), sensitivity and specificity at ``threshold``, and ``flag``: ``"low_sensitivity"`` when
    the group's sensitivity is more than ``margin`` below the overall one and the group has at
    least ``min_positives`` positives; ``"too_few_positives"`` when the sensitivity is too
    uncertain to judge; empty otherwise.
    """
    y_dx = np.asarray(y_dx, dtype=np.int64)
    dx_probs = np.asarray(dx_probs, dtype=np.float64)
    y01 = np.asarray(y01).astype(int)
    score = np.asarray(score, dtype=np.float64)
    overall = at_threshold(y01, score, threshold)["sensitivity"]
    rows = []
    for attr, values in attributes.items():
        values = np.asarray(values, dtype=object)
        if len(values) != len(y01):
            raise ValueError(f"subgroup attribute {attr!r}: {len(values)} values for {len(y01)} samples")
        for group in sorted(set(values.tolist()), key=str):
            m = values == group
            yd, pd_ = y_dx[m], dx_probs[m].argmax(1)
            yb, sb = y01[m], score[m]
            op = at_threshold(yb, sb, threshold)
            recalls = [np.mean(pd_[yd == c] == c) for c in np.unique(yd)]
            n_pos = int(yb.sum())
            flag = ""
            if n_pos < min_positives:
                flag = "too_few_positives"
            elif overall is not None and op["sensitivity"] is not None and op["sensitivity"] < overall - margin:
                flag = "low_sensitivity"
            rows.append({
                "attribute": attr,
                "group": str(group),
                "n_images": int(m.sum()),
                "n_positive": n_pos,
                "accuracy_dx": float(np.mean(pd_ == yd)),
                "balanced_accuracy_dx": float(np.mean(recalls)),
                "roc_auc": float(skm.roc_auc_score(yb, sb)) if 0 < n_pos < len(yb) else None,
                "sensitivity": op["sensitivity"],
                "specificity": op["specificity"],
                "flag": flag,
            })
    return pd.DataFrame(rows)
