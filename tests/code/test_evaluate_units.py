"""Units of the evaluation that need no model: the EDA baseline scorer, baselines, the prediction
rows (one schema for evaluate, predict and the service log)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.core.predictions import prediction_frame
from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation import baselines, summary
from pipeline.evaluation.predictions import Predictions, prediction_table
from pipeline.features import linearmodel

TAX = Taxonomy.default()


def _frame(dx):
    return pd.DataFrame(
        {
            "image_id": [f"ISIC_{i:07d}" for i in range(len(dx))],
            "lesion_id": [f"HAM_{i // 2:07d}" for i in range(len(dx))],
            "dx": dx,
        }
    )


@pytest.mark.parametrize("n_classes", [2, 3])
def test_linear_softmax_matches_sklearn_logistic_regression(n_classes):
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)) * [1, 5, 0.1, 2] + [0, 3, 0, -1]
    x[::7, 1] = np.nan
    y = rng.integers(0, n_classes, 120)
    pipe = Pipeline(
        [
            ("impute", SimpleImputer(strategy="median")),
            ("scale", StandardScaler()),
            ("clf", LogisticRegression(max_iter=500)),
        ]
    ).fit(x, y)
    imp, sc, clf = (pipe.named_steps[k] for k in ("impute", "scale", "clf"))
    model = {
        "format": linearmodel.FORMAT,
        "features": ["a", "b", "c", "d"],
        "impute": imp.statistics_.tolist(),
        "mean": sc.mean_.tolist(),
        "scale": sc.scale_.tolist(),
        "coef": clf.coef_.tolist(),
        "intercept": clf.intercept_.tolist(),
    }
    got = linearmodel.predict_proba(model, pd.DataFrame(x, columns=list("abcd")))
    assert got == pytest.approx(pipe.predict_proba(x), abs=1e-9)
    with pytest.raises(ValueError, match="features missing"):
        linearmodel.predict_proba(model, pd.DataFrame(x[:, :3], columns=list("abc")))


def test_majority_baseline_predicts_the_training_prior():
    train = _frame(["nv"] * 6 + ["mel"] * 3 + ["bcc"])
    test = _frame(["nv", "mel", "bkl", "nv"])
    pred = baselines.baseline_predictions("majority", train, test, TAX, seed=0)
    dx = pred.level("dx")
    assert np.all(dx.argmax(1) == TAX.diagnoses.index("nv"))
    assert dx[0, TAX.diagnoses.index("mel")] == pytest.approx(0.3)
    assert pred.p_malignant == pytest.approx(np.full(4, 0.4))  # mel + bcc
    strat = baselines.baseline_predictions("stratified", train, test, TAX, seed=0).level("dx")
    assert set(np.unique(strat)) <= {0.0, 1.0} and np.all(strat.sum(1) == 1)


def test_prediction_table_has_every_level_and_the_thresholded_decision():
    frame = _frame(["mel", "nv"])
    dx = np.array([[0.05, 0.05, 0.1, 0.0, 0.6, 0.2, 0.0], [0.0, 0.0, 0.1, 0.0, 0.1, 0.8, 0.0]])
    probs = {lvl: TAX.derive(dx, lvl) for lvl in ("dx", "risk", "binary")}
    pred = Predictions(frame, probs, probs["binary"][:, TAX.positive_index])
    t = prediction_table(pred, TAX, threshold=0.5)
    assert list(t["dx_pred"]) == ["mel", "nv"]
    assert list(t["risk_true"]) == ["malignant", "benign"]
    assert t.loc[0, "p_malignant"] == pytest.approx(0.7)
    assert list(t["decision"]) == ["malignant", "benign"] and (t["threshold"] == 0.5).all()
    # the same columns as every other prediction row (lesionflow predict, the service log's read-back)
    rows = prediction_frame(probs, TAX, pred.p_malignant, 0.5)
    assert list(t.columns) == ["image_id", "lesion_id", "dx", "risk_true", "binary_true", *rows.columns]
    conf = summary.confusion_csv(t, "binary")
    assert list(conf.columns) == ["actual", "predicted"] and list(conf["actual"]) == ["malignant", "benign"]
