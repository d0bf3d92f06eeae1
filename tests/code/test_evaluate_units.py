"""Units of the evaluate stage that need no model: the EDA baseline scorer, baselines, tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline import evaluate, linearmodel
from pipeline.taxonomy import Taxonomy

TAX = Taxonomy.default()


def _frame(dx):
    return pd.DataFrame({"image_id": [f"ISIC_{i:07d}" for i in range(len(dx))],
                         "lesion_id": [f"HAM_{i // 2:07d}" for i in range(len(dx))], "dx": dx})


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
    pipe = Pipeline([("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler()),
                     ("clf", LogisticRegression(max_iter=500))]).fit(x, y)
    imp, sc, clf = (pipe.named_steps[k] for k in ("impute", "scale", "clf"))
    model = {"format": linearmodel.FORMAT, "features": ["a", "b", "c", "d"], "impute": imp.statistics_.tolist(),
             "mean": sc.mean_.tolist(), "scale": sc.scale_.tolist(), "coef": clf.coef_.tolist(),
             "intercept": clf.intercept_.tolist()}
    got = linearmodel.predict_proba(model, pd.DataFrame(x, columns=list("abcd")))
    assert got == pytest.approx(pipe.predict_proba(x), abs=1e-9)
    with pytest.raises(ValueError, match="features missing"):
        linearmodel.predict_proba(model, pd.DataFrame(x[:, :3], columns=list("abc")))


def test_majority_baseline_predicts_the_training_prior():
    train = _frame(["nv"] * 6 + ["mel"] * 3 + ["bcc"])
    test = _frame(["nv", "mel", "bkl", "nv"])
    pred = evaluate.baseline_predictions("majority", train, test, TAX, seed=0)
    dx = pred.level("dx")
    assert np.all(dx.argmax(1) == TAX.diagnoses.index("nv"))
    assert dx[0, TAX.diagnoses.index("mel")] == pytest.approx(0.3)
    assert pred.p_malignant == pytest.approx(np.full(4, 0.4))  # mel + bcc
    strat = evaluate.baseline_predictions("stratified", train, test, TAX, seed=0).level("dx")
    assert set(np.unique(strat)) <= {0.0, 1.0} and np.all(strat.sum(1) == 1)


def test_prediction_table_has_every_level_and_the_thresholded_decision():
    frame = _frame(["mel", "nv"])
    dx = np.array([[0.05, 0.05, 0.1, 0.0, 0.6, 0.2, 0.0], [0.0, 0.0, 0.1, 0.0, 0.1, 0.8, 0.0]])
    probs = {lvl: TAX.derive(dx, lvl) for lvl in ("dx", "risk", "binary")}
    pred = evaluate.Predictions(frame, probs, probs["binary"][:, TAX.positive_index])
    t = evaluate.prediction_table(pred, TAX, threshold=0.5)
    assert list(t["dx_pred"]) == ["mel", "nv"]
    assert list(t["risk_true"]) == ["malignant", "benign"]
    assert t.loc[0, "p_malignant"] == pytest.approx(0.7)
    assert list(t["binary_pred_at_threshold"]) == ["malignant", "benign"]
    conf = evaluate.confusion_csv(t, "binary")
    assert list(conf.columns) == ["actual", "predicted"] and list(conf["actual"]) == ["malignant", "benign"]
