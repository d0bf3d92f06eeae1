"""Classification quality on a labelled current batch, next to the reference's (Evidently's
classification report plus accuracy, balanced accuracy and macro F1 computed directly)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.predictions import pred_column, prob_column
from pipeline.monitoring.profile import Reference


def _frame(df: pd.DataFrame, label: str, pred: str, classes: list[str], probs: list[str]) -> pd.DataFrame:
    """Evidently's multiclass layout of the labelled rows: target, prediction, one column per class."""
    df = df[df[label].notna()]
    out = pd.DataFrame({"target": df[label].astype(str).to_numpy(), "prediction": df[pred].astype(str).to_numpy()})
    for c, pc in zip(classes, probs):
        out[c] = pd.to_numeric(df[pc]).to_numpy() if pc in df else np.nan
    if len(out) and all(pc in df for pc in probs):  # stored rounded: renormalise, so that they sum to one
        out[classes] = out[classes].div(out[classes].sum(axis=1), axis=0)
    return out


def _scores(df: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    y, p = df["target"].to_numpy(), df["prediction"].to_numpy()
    # mean recall over the classes present in y (scikit-learn's balanced accuracy, without its warning
    # when a class is predicted that no labelled image has)
    recalls = [float(np.mean(p[y == c] == c)) for c in np.unique(y)]
    return {
        "n": int(len(df)),
        "accuracy": round(float(accuracy_score(y, p)), 4),
        "balanced_accuracy": round(float(np.mean(recalls)), 4) if recalls else float("nan"),
        "macro_f1": round(float(f1_score(y, p, average="macro", labels=classes, zero_division=0)), 4),
    }


def _report(r: pd.DataFrame, c: pd.DataFrame, classes: list[str]) -> Any:
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset

    dd = DataDefinition(
        categorical_columns=["target", "prediction"],
        numerical_columns=classes,
        classification=[
            MulticlassClassification(target="target", prediction_labels="prediction", prediction_probas=classes)
        ],
    )
    from sklearn.exceptions import UndefinedMetricWarning

    with warnings.catch_warnings():  # classes absent or never predicted: said by classification() itself
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        return Report([ClassificationPreset()]).run(
            reference_data=Dataset.from_pandas(r, data_definition=dd),
            current_data=Dataset.from_pandas(c, data_definition=dd),
        )


def classification(reference: Reference, current: pd.DataFrame) -> tuple[dict[str, Any], Any]:
    """Scores of the reference and of the labelled current rows, and Evidently's report (None, with
    ``report_error`` saying why, when Evidently cannot build it)."""
    classes = list(reference.schema["classes"])
    level = reference.schema.get("native_level", "dx")
    args = (reference.columns["label"], pred_column(level), classes, [prob_column(level, c) for c in classes])
    r, c = _frame(reference.frame, *args), _frame(current, *args)
    out: dict[str, Any] = {
        "reference": _scores(r, classes),
        "current": _scores(c, classes),
        "note": "reference scores are on training images (optimistic)",
    }
    absent, unpredicted = sorted(set(classes) - set(c["target"])), sorted(set(classes) - set(c["prediction"]))
    if absent or unpredicted:
        out["not_defined"] = (
            f"per-class recall and F1 not defined for classes without a labelled image in the current batch "
            f"({', '.join(absent) or 'none'}), precision not defined for classes never predicted in it "
            f"({', '.join(unpredicted) or 'none'}); Evidently's report shows them as 0"
        )
    try:
        return out, _report(r, c, classes)
    except (KeyError, ValueError, IndexError) as exc:
        # Evidently 0.7's per-class quality metric fails when a class has no labelled image in the
        # current batch (KeyError on the class name): keep the scores and say why the report is
        # missing instead of failing the whole drift check.
        absent = sorted(set(classes) - set(c["target"]))
        out["report_error"] = (
            f"Evidently classification report not produced ({type(exc).__name__}: {exc}); "
            f"classes without a labelled image in the current batch: {', '.join(absent) or 'none'}"
        )
        return out, None
