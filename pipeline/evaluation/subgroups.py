"""Performance per subgroup (sex, age band, body site, how the diagnosis was confirmed), with a
flag on groups whose binary sensitivity falls more than a margin below the overall figure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline.core.params import EvaluateParams
from pipeline.evaluation.metrics import at_threshold


def subgroup_attributes(frame: pd.DataFrame, p: EvaluateParams) -> dict[str, list[str]]:
    """The subgroup of every row per attribute: sex, age band (``evaluate.age_bands``; 0 and blank
    are unknown in HAM10000), body-site group (``evaluate.localization_groups``) and dx_type."""
    attrs: dict[str, list[str]] = {}
    if "sex" in frame:
        attrs["sex"] = frame["sex"].fillna("unknown").astype(str).tolist()
    if "age" in frame:
        ages = pd.to_numeric(frame["age"], errors="coerce")
        attrs["age_band"] = age_bands(ages.where(ages > 0).tolist(), p.age_bands)
    if "localization" in frame:
        lookup = {loc: g for g, locs in p.localization_groups.items() for loc in locs}
        locs = frame["localization"].fillna("unknown").astype(str)
        attrs["localization_group"] = [lookup.get(v, "other") if lookup else v for v in locs]
    if "dx_type" in frame:
        attrs["dx_type"] = frame["dx_type"].fillna("unknown").astype(str).tolist()
    return attrs


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


def _group_metrics(
    y_dx: np.ndarray, dx_probs: np.ndarray, y01: np.ndarray, score: np.ndarray, threshold: float
) -> dict[str, float | int | None]:
    """One subgroup's counts, diagnosis accuracy, binary ROC-AUC and operating point."""
    pred = dx_probs.argmax(1)
    op = at_threshold(y01, score, threshold)
    n_pos = int(y01.sum())
    return {
        "n_images": len(y01),
        "n_positive": n_pos,
        "accuracy_dx": float(np.mean(pred == y_dx)),
        "balanced_accuracy_dx": float(np.mean([np.mean(pred[y_dx == c] == c) for c in np.unique(y_dx)])),
        "roc_auc": float(skm.roc_auc_score(y01, score)) if 0 < n_pos < len(y01) else None,
        "sensitivity": op["sensitivity"],
        "specificity": op["specificity"],
    }


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
            row = _group_metrics(y_dx[m], dx_probs[m], y01[m], score[m], threshold)
            flag = ""
            if row["n_positive"] < min_positives:
                flag = "too_few_positives"
            elif overall is not None and row["sensitivity"] is not None and row["sensitivity"] < overall - margin:
                flag = "low_sensitivity"
            rows.append({"attribute": attr, "group": str(group), **row, "flag": flag})
    return pd.DataFrame(rows)
