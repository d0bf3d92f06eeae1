"""Image-quality checks before the model: an image the model cannot judge gets no decision, with the
reason named.

The checks look at what the model sees: the uint8 image at the model's input size (the same array
the forward pass normalises), so they cost a few NumPy passes over about 50,000 pixels and hold
for every path that predicts (:meth:`pipeline.model.runtime.BasePredictor.predict`: the service,
``lesionflow predict``, ``monitor``, ``validate-external``, evaluation). Five features per image,
on the luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (0-255) and the chromaticities:

* ``contrast``: the standard deviation of Y; below its low threshold: **blank** (no visible
  structure: a plain, near-uniform or covered image);
* ``brightness``: the mean of Y; below its low threshold **under-exposed**, above its high one
  **over-exposed**;
* ``sharpness``: the mean absolute 4-neighbour Laplacian of Y divided by ``contrast + 1`` (edges
  relative to the image's own contrast, so a dim sharp image is not called blurred); below its low
  threshold: **out of focus**;
* ``red_share`` and ``blue_share``: the means of R/(R+G+B) and B/(R+G+B); outside their range:
  **implausible colour** (dermoscopy of skin is reddish to brown: a grey, green or blue image is
  not one).

Thresholds are the ``quantile`` and ``1 - quantile`` of each feature over the training split's
images (``train.trust.quality_quantile``, 0.001 by default: a tail of 0.1%), fitted with the
temperature and the OOD detector (:mod:`pipeline.model.trust`) and stored in the model's
``config.json`` (``quality``), so the packaged model carries them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Reason code -> what the answer, the CSV and the page say.
REASONS: dict[str, str] = {
    "blank": "blank or without visible structure",
    "underexposed": "under-exposed (too dark)",
    "overexposed": "over-exposed (too bright)",
    "out_of_focus": "out of focus",
    "implausible_colour": "implausible colour for a dermoscopic image of skin",
}
#: Feature -> (reason below its low threshold, reason above its high threshold); None: not checked.
CHECKS: dict[str, tuple[str | None, str | None]] = {
    "contrast": ("blank", None),
    "brightness": ("underexposed", "overexposed"),
    "sharpness": ("out_of_focus", None),
    "red_share": ("implausible_colour", "implausible_colour"),
    "blue_share": ("implausible_colour", "implausible_colour"),
}
FEATURES = tuple(CHECKS)
MESSAGE = "the image cannot be judged ({reasons}); no risk estimate is given: retake it with the dermoscope"


def quality_features(u8: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
    """The five features of every image of a uint8 ``(N, 3, H, W)`` batch (see the module
    docstring), float64 arrays of length N; computed ``chunk`` images at a time."""
    u8 = np.asarray(u8)
    if u8.ndim != 4 or u8.shape[1] != 3:
        raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {u8.dtype} {u8.shape}")
    parts: list[dict[str, np.ndarray]] = [_features(u8[s : s + chunk]) for s in range(0, len(u8), chunk)]
    if not parts:
        return {f: np.zeros(0) for f in FEATURES}
    return {f: np.concatenate([p[f] for p in parts]) for f in FEATURES}


def _features(u8: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`quality_features` of one chunk."""
    x = u8.astype(np.float32)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    contrast = y.std(axis=(1, 2))
    lap = 4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    total = r + g + b + 1.0
    return {
        "contrast": contrast.astype(np.float64),
        "brightness": y.mean(axis=(1, 2)).astype(np.float64),
        "sharpness": (np.abs(lap).mean(axis=(1, 2)) / (contrast + 1.0)).astype(np.float64),
        "red_share": (r / total).mean(axis=(1, 2)).astype(np.float64),
        "blue_share": (b / total).mean(axis=(1, 2)).astype(np.float64),
    }


@dataclass(frozen=True)
class QualityChecks:
    """Fitted thresholds: feature -> ``(low, high)`` (None where that side is not checked)."""

    thresholds: dict[str, tuple[float | None, float | None]]
    quantile: float

    def reasons(self, u8: np.ndarray) -> list[list[str]]:
        """The reason codes of every image of a uint8 ``(N, 3, H, W)`` batch, in
        :data:`REASONS` order, each at most once (empty: the image passes)."""
        return self.reasons_of(quality_features(u8))

    def reasons_of(self, features: dict[str, np.ndarray]) -> list[list[str]]:
        """:meth:`reasons` of features already computed."""
        n = len(next(iter(features.values()))) if features else 0
        found: list[set[str]] = [set() for _ in range(n)]
        for name, (low, high) in self.thresholds.items():
            below, above = CHECKS[name]
            values = np.asarray(features[name])
            sides = ((below, low, values < (low or 0.0)), (above, high, values > (high or 0.0)))
            for reason, bound, outside in sides:
                if reason is not None and bound is not None:
                    for i in np.flatnonzero(outside):
                        found[i].add(reason)
        return [[r for r in REASONS if r in f] for f in found]

    def refused_share(self, u8: np.ndarray) -> float:
        """The share of the images of ``u8`` refused for any reason."""
        refused = self.reasons(u8)
        return float(np.mean([bool(r) for r in refused])) if refused else 0.0

    def record(self, train_refused: float, val_refused: float) -> dict[str, Any]:
        """The ``quality`` entry of a model's ``config.json`` (the refused shares of the training
        split, in sample, and of the validation split)."""
        return {
            "quantile": self.quantile,
            "fitted_on": "train",
            "thresholds": {k: [lo, hi] for k, (lo, hi) in self.thresholds.items()},
            "train_refused_share": round(float(train_refused), 6),
            "val_refused_share": round(float(val_refused), 6),
            "reasons": dict(REASONS),
        }

    @classmethod
    def from_config(cls, entry: dict[str, Any]) -> QualityChecks:
        """The checks a model's ``config.json`` ``quality`` entry describes."""
        thresholds: dict[str, tuple[float | None, float | None]] = {}
        for name, pair in (entry.get("thresholds") or {}).items():
            if name not in CHECKS:
                raise ValueError(f"quality.thresholds: unknown feature {name!r} (known: {', '.join(FEATURES)})")
            lo, hi = pair
            thresholds[name] = (None if lo is None else float(lo), None if hi is None else float(hi))
        return cls(thresholds, float(entry.get("quantile", 0.0)))


def fit(u8: np.ndarray, quantile: float) -> tuple[QualityChecks, float]:
    """Thresholds at the ``quantile`` and ``1 - quantile`` of each checked side of each feature over
    the images of ``u8`` (the training split); returns the checks and the share of those images
    they refuse."""
    if not 0.0 < quantile < 0.5:
        raise ValueError(f"quality quantile: must be in (0, 0.5), got {quantile}")
    feats = quality_features(u8)
    thresholds = {
        name: (
            float(np.quantile(feats[name], quantile)) if below else None,
            float(np.quantile(feats[name], 1.0 - quantile)) if above else None,
        )
        for name, (below, above) in CHECKS.items()
    }
    checks = QualityChecks(thresholds, quantile)
    refused = checks.reasons_of(feats)
    return checks, float(np.mean([bool(r) for r in refused])) if refused else 0.0


def to_mask(reasons: list[list[str]]) -> np.ndarray:
    """Reason codes per image as a uint8 bit mask (bit ``i``: the ``i``-th reason of :data:`REASONS`),
    for arrays that must be plain numbers (a cache, a DataFrame column)."""
    order = list(REASONS)
    return np.array([sum(1 << order.index(r) for r in rs) for rs in reasons], dtype=np.uint8)


def from_mask(mask: np.ndarray) -> list[list[str]]:
    """The reason codes of each bit mask of :func:`to_mask`."""
    return [[r for i, r in enumerate(REASONS) if int(m) >> i & 1] for m in np.asarray(mask)]


def counts(reasons: list[list[str]]) -> dict[str, int]:
    """How many images were refused for each reason (an image may have several)."""
    return {r: sum(r in rs for rs in reasons) for r in REASONS}


def message(reasons: list[str]) -> str:
    """The answer's message for an image refused for ``reasons`` (codes of :data:`REASONS`)."""
    return MESSAGE.format(reasons="; ".join(REASONS[r] for r in reasons))
