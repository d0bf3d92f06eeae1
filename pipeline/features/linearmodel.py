"""The feature-only baseline's file format: a linear softmax classifier as plain JSON.

The ``eda`` stage fits a scikit-learn pipeline (median imputation, standardisation, logistic
regression) on the feature table and saves it with :func:`to_json`; the ``evaluate`` stage scores
it on the test split with :func:`predict_proba`. Plain numbers in a documented format, so nothing
is ever unpickled, and one owner for the formula::

    x = features (NaN -> impute[i]); z = (x - mean) / scale
    logits = z @ coef.T + intercept; probs = softmax(logits) over classes
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

FORMAT = "lesionflow.linear-softmax/v1"
FORMULA = (
    "x = features (NaN -> impute[i]); z = (x - mean) / scale; "
    "logits = z @ coef.T + intercept; probs = softmax(logits) over classes"
)


def to_json(model: Any, features: Sequence[str], classes: Sequence[str], **extra: Any) -> dict[str, Any]:
    """Serialise a fitted ``Pipeline(impute=SimpleImputer, scale=StandardScaler, clf=LogisticRegression)``."""
    imputer, scaler, clf = (model.named_steps[k] for k in ("impute", "scale", "clf"))
    return {
        "format": FORMAT,
        "formula": FORMULA,
        "classes": list(classes),
        "features": list(features),
        "impute": [float(v) for v in imputer.statistics_],
        "mean": [float(v) for v in scaler.mean_],
        "scale": [float(v) for v in scaler.scale_],
        "coef": [[float(v) for v in row] for row in clf.coef_],
        "intercept": [float(v) for v in clf.intercept_],
        **extra,
    }


def predict_proba(model_json: Mapping[str, Any], features: pd.DataFrame) -> np.ndarray:
    """Class probabilities (rows sum to one) of a model saved by :func:`to_json`, numpy only."""
    if model_json.get("format") != FORMAT:
        raise ValueError(f"unsupported baseline format {model_json.get('format')!r} (expected {FORMAT})")
    missing = [c for c in model_json["features"] if c not in features.columns]
    if missing:
        raise ValueError(f"features missing from the table: {', '.join(missing[:5])}")
    x = features[model_json["features"]].to_numpy(dtype=np.float64)
    x = np.where(np.isnan(x), np.asarray(model_json["impute"], dtype=np.float64), x)
    z = (x - np.asarray(model_json["mean"], dtype=np.float64)) / np.asarray(model_json["scale"], dtype=np.float64)
    coef = np.asarray(model_json["coef"], dtype=np.float64)
    logits = z @ coef.T + np.asarray(model_json["intercept"], dtype=np.float64)
    if coef.shape[0] == 1:  # binary logistic regression: one row of coefficients
        logits = np.hstack([-logits, logits]) / 2
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)
