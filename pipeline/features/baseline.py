"""The feature-only baseline the CNN must beat: a logistic regression on the EDA statistics,
trained on the train split and scored on val, saved as plain JSON (:mod:`pipeline.features.linearmodel`,
no pickle)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import LesionflowError
from pipeline.core.params import EdaParams
from pipeline.core.taxonomy import Taxonomy
from pipeline.features import linearmodel
from pipeline.features.analysis import feature_group


@dataclass
class Baseline:
    """The fitted feature-only baseline and its validation scores."""

    model: Any  # sklearn Pipeline(imputer, scaler, logistic regression)
    features: list[str]
    classes: list[str]
    level: str
    metrics: dict[str, Any]
    importances: pd.DataFrame
    confusion: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """The fitted model as plain numbers (:mod:`pipeline.features.linearmodel`)."""
        return linearmodel.to_json(self.model, self.features, self.classes, level=self.level, val_metrics=self.metrics)


class BaselineError(LesionflowError, ValueError):
    """A table the baseline cannot be fitted on."""


def _pipeline(p: EdaParams) -> Any:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    return Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(C=p.baseline_c, max_iter=p.baseline_max_iter, class_weight="balanced")),
        ]
    )


def _macro_auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    """Macro one-vs-rest AUC over the classes present (NaN when undefined)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    try:
        if n_classes == 2:
            return float(roc_auc_score(y, proba[:, 1]))
        p = proba[:, present] / proba[:, present].sum(axis=1, keepdims=True)
        return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=present))
    except ValueError:
        return float("nan")


def fit_baseline(table: pd.DataFrame, features: list[str], taxonomy: Taxonomy, p: EdaParams) -> Baseline:
    """Logistic regression (median imputation, standardisation, balanced class weights) on the
    train split, scored on val; permutation importances (balanced accuracy) on val."""
    from sklearn.inspection import permutation_importance
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    level, classes = p.baseline_level, list(taxonomy.classes(p.baseline_level))
    train, val = table[table["split"] == "train"], table[table["split"] == "val"]
    if len(train) == 0 or len(val) == 0:
        raise BaselineError("the baseline needs rows in both the train and the val split")
    y_train, y_val = taxonomy.encode(train["dx"], level), taxonomy.encode(val["dx"], level)
    x_train, x_val = train[features].astype(np.float64), val[features].astype(np.float64)
    model = _pipeline(p).fit(x_train, y_train)
    proba = np.zeros((len(val), len(classes)))
    proba[:, model.classes_] = model.predict_proba(x_val)
    pred = proba.argmax(axis=1)
    metrics = {
        "level": level,
        "n_train": int(len(train)),
        "n_val": int(len(val)),
        "n_features": len(features),
        "balanced_accuracy": float(balanced_accuracy_score(y_val, pred)),
        "accuracy": float(accuracy_score(y_val, pred)),
        "macro_auc_ovr": _macro_auc(y_val, proba, len(classes)),
        "recall": {
            c: float((pred[y_val == i] == i).mean()) if (y_val == i).any() else float("nan")
            for i, c in enumerate(classes)
        },
    }
    perm = permutation_importance(
        model, x_val, y_val, scoring="balanced_accuracy", n_repeats=p.permutation_repeats, random_state=p.seed
    )
    importances = (
        pd.DataFrame(
            {
                "feature": features,
                "group": [feature_group(f) for f in features],
                "importance_mean": perm.importances_mean,
                "importance_std": perm.importances_std,
            }
        )
        .sort_values("importance_mean", ascending=False)
        .reset_index(drop=True)
    )
    importances.insert(0, "rank", np.arange(1, len(importances) + 1))
    cm = confusion_matrix(y_val, pred, labels=list(range(len(classes))))
    return Baseline(model, features, classes, level, metrics, importances, cm)
