"""Out-of-distribution (OOD) detection: is this image like the dermoscopic images the model was
trained on, or something it cannot judge (a photo of a room, a blank frame, a screenshot)?

Three scores (``train.trust.ood_method``); higher is more unusual:

* ``mahalanobis_layers`` (the default): the backbone is looked at in five places (the
  global-average-pooled outputs of four evenly spaced blocks, :meth:`LesionClassifier.blocks`, and
  the penultimate embedding). Each gets one Gaussian fitted on the training split (its mean,
  spread and a covariance shrunk towards the identity, ``train.trust.ood_shrinkage``); an image's
  Mahalanobis distance to each is standardised by the validation split's mean and spread of that
  distance, and the five are summed. Early blocks see colour, texture and focus, late ones the
  lesion's structure, so a photograph, a close-up of skin without a dermoscope or a near-blank
  frame is unusual somewhere even when its embedding alone looks ordinary. Chosen, with its
  shrinkage 0.1, on one half of nine kinds of non-dermoscopic images and measured on the other,
  over the champion and three seeds of a small recipe (``benchmarks/ood_scores.py``,
  ``docs/trust.md``): 99.5 % of the held-out images refused (with the image-quality checks)
  against 86.9 % for the penultimate distance alone, at 1.3 % of the test split flagged.
* ``mahalanobis``: the penultimate embedding's distance to the nearest of the class-conditional
  Gaussians with one shared covariance (Lee et al., "A Simple Unified Framework for Detecting
  Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018); models packaged before the
  multi-layer score carry it.
* ``energy``: ``-T log sum exp(logits / T)`` (Liu et al., NeurIPS 2020), from the logits alone.

The threshold is the ``pass_share`` quantile (default 99 %) of the validation split's scores: that
share of in-distribution images passes. The fitted statistics are plain arrays in ``ood.npz``
beside the model (read with ``allow_pickle=False``), the method and threshold are in its
``config.json`` (``ood``); :mod:`pipeline.model.runtime` scores every prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.model.bundle import OOD_FILE  # the file beside model.pt holding the statistics

__all__ = ["DESCRIPTIONS", "MESSAGE", "METHODS", "OodDetector", "energy", "layer_statistics", "mahalanobis_statistics"]

METHODS = ("mahalanobis", "mahalanobis_layers", "energy")
#: The arrays of the multi-layer score besides each layer's ``layer<i>_{mean,scale,whitener}``.
LAYER_ARRAYS = {"layer_dims", "val_mean", "val_std"}
#: Each score in a sentence, for the model card.
DESCRIPTIONS = {
    "mahalanobis_layers": "sum, over the pooled outputs of four blocks of the backbone and the penultimate "
    "embedding, of the Mahalanobis distance to one Gaussian fitted on the training split (shrunk "
    "covariance), each standardised by the validation split's mean and spread of that distance",
    "mahalanobis": "Mahalanobis distance of its penultimate embedding to the nearest class-conditional "
    "Gaussian fitted on the training split (shared, Ledoit-Wolf shrunk covariance)",
    "energy": "energy of its calibrated logits",
}
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


def _whitener(x: np.ndarray, shrinkage: float | None = None) -> np.ndarray:
    """``W`` with ``W W^T`` the inverse of the shrunk covariance of ``x`` (rows centred, columns
    standardised): ``(1 - s) C + s I`` with ``s = shrinkage``, or Ledoit-Wolf's estimate of ``s``
    when None."""
    from sklearn.covariance import LedoitWolf, ShrunkCovariance

    est = (
        LedoitWolf(assume_centered=True)
        if shrinkage is None
        else ShrunkCovariance(shrinkage=shrinkage, assume_centered=True)
    )
    cov = est.fit(x).covariance_
    return np.linalg.inv(np.linalg.cholesky(cov)).T


def _layers(blocks: np.ndarray, embeddings: np.ndarray, dims: np.ndarray) -> list[np.ndarray]:
    """The pooled outputs of each block (split by ``dims``) and the embedding: the score's layers."""
    parts = np.split(np.asarray(blocks, dtype=np.float64), np.cumsum(dims)[:-1], axis=1)
    return [*parts, np.asarray(embeddings, dtype=np.float64)]


def layer_statistics(
    train_blocks: np.ndarray, train_embeddings: np.ndarray, dims: Any, shrinkage: float | None = None
) -> dict[str, np.ndarray]:
    """Per layer (each block's pooled outputs, then the embedding): the training split's mean,
    spread and the whitener of its shrunk covariance (one Gaussian, all classes; ``shrinkage`` as
    in :func:`_whitener`)."""
    dims = np.asarray(dims, dtype=np.int64)
    out: dict[str, np.ndarray] = {"layer_dims": dims}
    for i, x in enumerate(_layers(train_blocks, train_embeddings, dims)):
        mean, scale = x.mean(0), x.std(0) + 1e-6
        out[f"layer{i}_mean"], out[f"layer{i}_scale"] = mean.astype(np.float32), scale.astype(np.float32)
        out[f"layer{i}_whitener"] = _whitener((x - mean) / scale, shrinkage).astype(np.float32)
    return out


def layer_distances(arrays: dict[str, np.ndarray], blocks: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """(n, layers): each image's Mahalanobis distance to each layer's Gaussian."""
    found = []
    for i, x in enumerate(_layers(blocks, embeddings, arrays["layer_dims"])):
        z = ((x - arrays[f"layer{i}_mean"]) / arrays[f"layer{i}_scale"]).astype(np.float32)
        found.append(np.sqrt(((z @ arrays[f"layer{i}_whitener"]) ** 2).sum(1)))
    return np.stack(found, axis=1).astype(np.float64)


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

    @property
    def needs_blocks(self) -> bool:
        """Whether the score needs the pooled block outputs of the backbone."""
        return self.method == "mahalanobis_layers"

    def score(self, embeddings: np.ndarray, logits: np.ndarray, blocks: np.ndarray | None = None) -> np.ndarray:
        """The OOD score of each image (higher: more unusual); ``blocks``: the pooled block outputs
        (the multi-layer score needs them)."""
        if self.method == "energy":
            return energy(logits, self.temperature)
        if self.method == "mahalanobis_layers":
            if blocks is None:
                raise ValueError("the multi-layer OOD score needs the pooled block outputs")
            d = layer_distances(self.arrays, blocks, embeddings)
            return ((d - self.arrays["val_mean"]) / self.arrays["val_std"]).sum(1)
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
            "fitted_on": "train" if self.method != "energy" else None,
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
        if method == "mahalanobis_layers" and not set(arrays) >= LAYER_ARRAYS:
            raise ValueError(f"{OOD_FILE}: missing the multi-layer statistics ({', '.join(sorted(LAYER_ARRAYS))})")
        return cls(method, float(entry["threshold"]), arrays, temperature)


def fit(
    method: str,
    train: Mapping[str, Any],
    val: Mapping[str, Any],
    pass_share: float,
    temperature: float = 1.0,
    shrinkage: float | None = None,
) -> tuple[OodDetector, np.ndarray]:
    """Fit the score on the training split (``train``: ``embeddings``, ``labels`` and, for the
    multi-layer score, ``blocks``), standardise each layer's distances on the validation split
    (``val``: ``embeddings``, ``logits``, ``blocks``), then set the threshold so that
    ``pass_share`` of it passes; ``shrinkage``: the multi-layer score's covariance shrinkage
    (:func:`_whitener`). Returns the detector and the val scores."""
    if method not in METHODS:
        raise ValueError(f"ood method: expected one of {', '.join(METHODS)}, got {method!r}")
    arrays: dict[str, np.ndarray] = {}
    if method == "mahalanobis":
        arrays = mahalanobis_statistics(train["embeddings"], train["labels"])
    elif method == "mahalanobis_layers":
        dims = [int(d) for d in train["block_dims"]]
        arrays = layer_statistics(train["blocks"], train["embeddings"], dims, shrinkage)
        d = layer_distances(arrays, val["blocks"], val["embeddings"])
        arrays["val_mean"], arrays["val_std"] = d.mean(0), d.std(0) + 1e-6
    detector = OodDetector(method, np.inf, arrays, temperature)
    val_scores = detector.score(val["embeddings"], val["logits"], val.get("blocks"))
    detector.threshold = float(np.quantile(val_scores, pass_share, method="higher"))
    return detector, val_scores
