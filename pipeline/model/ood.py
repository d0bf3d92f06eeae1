"""Out-of-distribution (OOD) detection: is this image like the dermoscopic images the model was
trained on, or something it cannot judge (a photo of a room, a blank frame, a screenshot)?

The score is the **Mahalanobis distance** of an image's penultimate embedding to the nearest of
the class-conditional Gaussians fitted on the training split, with one covariance shared by all
classes (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018); the covariance is Ledoit-Wolf shrunk, so 1,280 dimensions
are well conditioned from a few thousand images. The **energy** score (Liu et al., NeurIPS 2020:
``-T log sum exp(logits / T)``, from the logits alone) is the alternative; the Mahalanobis score
was chosen because it separated non-dermoscopic photographs and synthetic images from the test
split far better on this model (``benchmarks/ood_scores.py``, figures in
``benchmarks/results/ood_scores.json``). Higher scores are more unusual.

The threshold is the ``pass_share`` quantile (default 99 %) of the validation split's scores: that
share of in-distribution images passes. The fitted statistics are plain arrays in ``ood.npz``
beside the model (read with ``allow_pickle=False``), the method and threshold are in its
``config.json`` (``ood``); :mod:`pipeline.model.inference` scores every prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.model.bundle import OOD_FILE  # the file beside model.pt holding the statistics

__all__ = ["MESSAGE", "METHODS", "OodDetector", "energy", "mahalanobis_statistics"]

METHODS = ("mahalanobis", "energy")
#: What a person is told about an image the model cannot judge.
MESSAGE = "this does not look like the dermoscopic images the model was trained on; no risk estimate is given"


def mahalanobis_statistics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Class means and the whitening matrix ``W`` (``W W^T`` = the inverse of the Ledoit-Wolf shrunk,
    shared covariance), stored as ``means_w`` (the means times ``W``) and ``whitener``. Classes
    without a training image get no mean."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
    # W = L^-T with cov = L L^T  ->  W W^T = cov^-1, and the squared distance is |(e - mu) W|^2
    chol = np.linalg.cholesky(cov)
    whitener = np.linalg.inv(chol).T
    return {
        "means_w": (means @ whitener).astype(np.float32),
        "whitener": whitener.astype(np.float32),
        "classes": classes.astype(np.int64),
    }


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-T log sum exp(logits / T)`` of the plain view (``logits``: ``(views, n, k)`` or ``(n, k)``);
    higher (less negative) is more unusual."""
    from scipy.special import logsumexp

    z = np.asarray(logits, dtype=np.float64)
    z = z[0] if z.ndim == 3 else z
    return -temperature * logsumexp(z / temperature, axis=1)


@dataclass
class OodDetector:
    """A fitted OOD score and its threshold (see the module docstring)."""

    method: str
    threshold: float
    arrays: dict[str, np.ndarray]
    temperature: float = 1.0

    def score(self, embeddings: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """The OOD score of each image (higher: more unusual)."""
        if self.method == "energy":
            return energy(logits, self.temperature)
        ew = np.asarray(embeddings, dtype=np.float32) @ self.arrays["whitener"]
        means = self.arrays["means_w"]
        # |a - b|^2 = |a|^2 - 2 a.b + |b|^2, for every image and class at once
        d2 = (ew**2).sum(1, keepdims=True) - 2.0 * ew @ means.T + (means**2).sum(1)[None, :]
        return np.sqrt(np.maximum(d2.min(1), 0.0)).astype(np.float64)

    def in_distribution(self, scores: np.ndarray) -> np.ndarray:
        """True where a score is at or below the threshold."""
        return np.asarray(scores) <= self.threshold

    def record(self, pass_share: float, val_scores: np.ndarray) -> dict[str, Any]:
        """The ``ood`` entry of a model's ``config.json``."""
        return {
            "method": self.method,
            "threshold": float(self.threshold),
            "pass_share": pass_share,
            "fitted_on": "train" if self.method == "mahalanobis" else None,
            "threshold_on": "val",
            "val_flagged_share": round(float(np.mean(~self.in_distribution(val_scores))), 6),
            "file": OOD_FILE if self.arrays else None,
            "message": MESSAGE,
        }

    @classmethod
    def from_config(cls, entry: dict[str, Any], arrays: dict[str, np.ndarray], temperature: float) -> OodDetector:
        """The detector a model's ``config.json`` ``ood`` entry and ``ood.npz`` describe."""
        method = entry.get("method")
        if method not in METHODS:
            raise ValueError(f"ood.method: expected one of {', '.join(METHODS)}, got {method!r}")
        if method == "mahalanobis" and not {"means_w", "whitener"} <= set(arrays):
            raise ValueError(f"{OOD_FILE}: missing the Mahalanobis statistics (means_w, whitener)")
        return cls(method, float(entry["threshold"]), arrays, temperature)


def fit(
    method: str,
    train_embeddings: np.ndarray,
    train_labels: np.ndarray,
    val_embeddings: np.ndarray,
    val_logits: np.ndarray,
    pass_share: float,
    temperature: float = 1.0,
) -> tuple[OodDetector, np.ndarray]:
    """Fit the score (Mahalanobis: on the training split), then set the threshold so that
    ``pass_share`` of the validation split passes. Returns the detector and the val scores."""
    if method not in METHODS:
        raise ValueError(f"ood method: expected one of {', '.join(METHODS)}, got {method!r}")
    arrays = mahalanobis_statistics(train_embeddings, train_labels) if method == "mahalanobis" else {}
    detector = OodDetector(method, np.inf, arrays, temperature)
    val_scores = detector.score(val_embeddings, val_logits)
    detector.threshold = float(np.quantile(val_scores, pass_share, method="higher"))
    return detector, val_scores
