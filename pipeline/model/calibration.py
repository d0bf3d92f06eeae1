"""Temperature scaling: one scalar ``T`` that divides the model's logits before the softmax, fitted
on the validation split to minimise the negative log-likelihood (Guo et al., "On Calibration of
Modern Neural Networks", ICML 2017). It changes the confidence of each image's prediction, not
its predicted class (the argmax of ``logits / T`` is the argmax of the logits; with test-time
augmentation, a mean of softmaxes, nearly always). It can reorder images by one class's
probability or by a sum of classes (p(malignant)), so ROC curves and AUCs can change: the
evaluation reports them before and after (:func:`pipeline.evaluation.trust.calibration_effect`).

With test-time augmentation the probabilities are the mean over the flip views of
``softmax(logits_view / T)``, so ``T`` is fitted on exactly that (``logits`` of shape
``(views, n, classes)``). The fitted ``T`` is stored in the model's ``config.json``
(``calibration``) and applied by :mod:`pipeline.model.inference`, the one prediction path, so that
evaluate, the service, ``lesionflow predict`` and monitoring all see calibrated probabilities.
NumPy and SciPy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

#: The range searched for T (log scale): a T outside it means something else is wrong.
T_RANGE = (0.05, 20.0)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``mean over views of softmax(logits / T)``; ``logits``: ``(views, n, classes)`` or ``(n, classes)``."""
    z = np.asarray(logits, dtype=np.float64)
    z = z[None] if z.ndim == 2 else z
    return np.exp(log_softmax(z / temperature, axis=2)).mean(axis=0)


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes ``y`` under :func:`probabilities`."""
    p = probabilities(logits, temperature)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), np.asarray(y)], 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The ``T`` minimising :func:`nll` on ``(logits, y)`` (a bounded 1-D search over log T)."""
    y = np.asarray(y)
    if len(y) == 0:
        raise ValueError("temperature scaling needs at least one labelled example")
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    res = minimize_scalar(lambda lt: nll(logits, y, float(np.exp(lt))), bounds=(lo, hi), method="bounded")
    return float(np.exp(res.x))


def calibration_record(logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Fit ``T`` on ``(logits, y)`` (the validation split) and say what it did there: the
    ``calibration`` entry of a model's ``config.json`` (the evaluation measures ECE on test)."""
    t = fit_temperature(logits, y)
    return {
        "method": "temperature",
        "temperature": round(t, 6),
        "fitted_on": "val",
        "n": int(len(y)),
        "val_nll_before": round(nll(logits, y), 6),
        "val_nll_after": round(nll(logits, y, t), 6),
    }
