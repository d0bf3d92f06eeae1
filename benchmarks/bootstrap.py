"""Benchmark: lesion-level bootstrap CIs of the evaluate stage, vectorised vs the usual loop.

Side by side in one run, on a synthetic test split shaped like HAM10000's (1,500 images of about
1,120 lesions, 7 classes, 20% malignant):
* lesionflow's :func:`pipeline.evaluation.bootstrap.bootstrap` (each replicate a row of integer lesion weights;
  confusion by one-hot matmul, AUC/AP/sensitivity-at-specificity from cumulative weighted counts);
* the baseline a user would otherwise write: a Python loop that resamples lesions, gathers their
  images and calls scikit-learn's metric functions on each replicate.
Both compute the same statistics (7-class accuracy, balanced accuracy, macro F1, macro OvR AUC;
binary ROC-AUC, PR-AUC, sensitivity at 90/95% specificity, sensitivity/specificity at a threshold)
and the figures are checked to agree.

Run from the project root: `python benchmarks/bootstrap.py [n_boot]` -> benchmarks/results/bootstrap.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from benchmarks._machine import machine  # noqa: E402
from pipeline.evaluation import bootstrap  # noqa: E402


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    n_lesions = 1120
    sizes = rng.choice([1, 1, 1, 2, 2, 3], size=n_lesions)
    lesion = np.repeat(np.arange(n_lesions), sizes)[:1500]
    y_lesion = rng.choice(7, size=n_lesions, p=[0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    y = y_lesion[lesion]
    logits = rng.normal(size=(len(y), 7))
    logits[np.arange(len(y)), y] += 2.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p, lesion


def ours(y, p, groups, n_boot, threshold):
    yb = np.isin(y, [0, 1, 4]).astype(int)
    score = p[:, [0, 1, 4]].sum(1)
    stat = lambda w: {
        **bootstrap.multiclass_statistic(y, p)(w),  # noqa: E731
        **bootstrap.binary_statistic(yb, score, threshold)(w),
    }
    return bootstrap.bootstrap(stat, groups, n_boot=n_boot, seed=0)


def loop(y, p, groups, n_boot, threshold):
    yb = np.isin(y, [0, 1, 4]).astype(int)
    score = p[:, [0, 1, 4]].sum(1)
    rng = np.random.default_rng(0)
    uniq = np.unique(groups)
    members = {g: np.flatnonzero(groups == g) for g in uniq}
    draws: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = np.concatenate([members[g] for g in rng.choice(uniq, size=len(uniq), replace=True)])
        yy, pp, yyb, ss = y[idx], p[idx], yb[idx], score[idx]
        pred = pp.argmax(1)
        fpr, tpr, _ = skm.roc_curve(yyb, ss, drop_intermediate=False)
        vals = {
            "accuracy": skm.accuracy_score(yy, pred),
            "balanced_accuracy": skm.balanced_accuracy_score(yy, pred),
            "macro_f1": skm.f1_score(yy, pred, average="macro", labels=np.unique(yy)),
            "roc_auc_macro": np.mean([skm.roc_auc_score(yy == c, pp[:, c]) for c in np.unique(yy)]),
            "roc_auc": skm.roc_auc_score(yyb, ss),
            "pr_auc": skm.average_precision_score(yyb, ss),
            "sensitivity_at_specificity_90": tpr[(1 - fpr) >= 0.9].max(),
            "sensitivity_at_specificity_95": tpr[(1 - fpr) >= 0.95].max(),
            "sensitivity_at_operating_point": np.mean(ss[yyb == 1] >= threshold),
            "specificity_at_operating_point": np.mean(ss[yyb == 0] < threshold),
        }
        for k, v in vals.items():
            draws.setdefault(k, []).append(float(v))
    return {k: {"low": float(np.quantile(v, 0.025)), "high": float(np.quantile(v, 0.975))} for k, v in draws.items()}


def main() -> None:
    n_boot = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    y, p, groups = data()
    t0 = time.perf_counter()
    a = ours(y, p, groups, n_boot, 0.3)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    b = loop(y, p, groups, n_boot, 0.3)
    t_loop = time.perf_counter() - t0
    # different random draws (multinomial counts vs choice): compare interval ends loosely
    max_gap = max(max(abs(a[k]["low"] - b[k]["low"]), abs(a[k]["high"] - b[k]["high"])) for k in b)
    result = {
        "benchmark": "lesion-level bootstrap, 10 statistics",
        "n_images": int(len(y)),
        "n_lesions": int(len(np.unique(groups))),
        "n_boot": n_boot,
        "seconds": {"lesionflow_vectorised": round(t_ours, 3), "sklearn_loop": round(t_loop, 3)},
        "speedup": round(t_loop / t_ours, 1),
        "max_ci_end_difference": round(max_gap, 4),
        "machine": machine(),
    }
    out = ROOT / "benchmarks/results/bootstrap.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["seconds"]), "speedup", result["speedup"], "max CI gap", result["max_ci_end_difference"])


if __name__ == "__main__":
    main()
