"""Classification quality on a labelled current batch, next to the reference's (Evidently's
classification report plus accuracy, balanced accuracy and macro F1 computed directly)."""

from __future__ import annotations

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
    return out


def _scores(df: pd.DataFrame, classes: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y, p = df["target"], df["prediction"]
    return {
        "n": int(len(df)),
        "accuracy": round(float(accuracy_score(y, p)), 4),
        "balanced_accuracy": round(float(balanced_accuracy_score(y, p)), 4),
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
    out = {
        "reference": _scores(r, classes),
        "current": _scores(c, classes),
        "note": "reference scores are on training images (optimistic)",
    }
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
