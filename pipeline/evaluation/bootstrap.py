"""Confidence intervals by a cluster bootstrap over **lesions** (images of one lesion are not
independent), vectorised: each replicate is a row of integer weights (how many times each image's
lesion was drawn) and the ``w_*`` functions compute metrics for all replicates at once (confusion
via a one-hot matmul, AUC/AP from cumulative weighted counts over tie groups), so 1000 replicates
of 1,500 images take about a second. A statistic is a function ``weights (B, n) -> {name: (B,)}``
(:func:`multiclass_statistic`, :func:`binary_statistic`); :func:`bootstrap` gives percentile CIs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from pipeline.core.predictions import refers
from pipeline.evaluation.metrics import json_float


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
    y01: Sequence[int],
    score: Sequence[float],
    threshold: float | None = None,
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
            pred = refers(score, threshold).astype(int)
            cm = w_confusion(w, y01, pred, 2)
            with np.errstate(invalid="ignore", divide="ignore"):
                out["sensitivity_at_operating_point"] = cm[:, 1, 1] / cm[:, 1].sum(axis=1)
                out["specificity_at_operating_point"] = cm[:, 0, 0] / cm[:, 0].sum(axis=1)
        return out

    return stat


def threshold_statistic(
    y01: Sequence[int], score: Sequence[float], target_sensitivity: float, threshold: float
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """A bootstrap statistic for a site's operating point: weights -> ``threshold`` (the highest
    score reaching ``target_sensitivity``, chosen again in each replicate, as
    :func:`pipeline.evaluation.metrics.choose_threshold` does), ``specificity_at_target`` (the
    specificity there) and, at the fixed ``threshold`` chosen on all the data,
    ``sensitivity_at_threshold`` and ``specificity_at_threshold``."""
    y01 = np.asarray(y01).astype(int)
    score = np.asarray(score, dtype=np.float64)
    distinct = np.unique(score)[::-1]  # the thresholds of w_binary_curves' columns, highest first
    fixed = refers(score, threshold).astype(int)

    def stat(w: np.ndarray) -> dict[str, np.ndarray]:
        tp, fp, p, n = w_binary_curves(w, y01, score)
        with np.errstate(invalid="ignore", divide="ignore"):
            reached = tp / p[:, None] >= target_sensitivity - 1e-12
            first = np.argmax(reached, axis=1)  # tpr reaches 1 at the last column
            rows = np.arange(len(w))
            cm = w_confusion(w, y01, fixed, 2)
            return {
                "threshold": np.where(p > 0, distinct[first], np.nan),
                "specificity_at_target": 1.0 - fp[rows, first] / n,
                "sensitivity_at_threshold": cm[:, 1, 1] / cm[:, 1].sum(axis=1),
                "specificity_at_threshold": cm[:, 0, 0] / cm[:, 0].sum(axis=1),
            }

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
            "estimate": json_float(point[k][0]),
            "low": json_float(np.quantile(arr, alpha)) if arr.size else None,
            "high": json_float(np.quantile(arr, 1 - alpha)) if arr.size else None,
            "std": json_float(arr.std(ddof=1)) if arr.size > 1 else None,
            "n_boot": int(n_boot),
            "n_valid": int(arr.size),
            "n_groups": n_groups,
        }
    return out
