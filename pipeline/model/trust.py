"""Fitting what makes a trained model's answers trustworthy, through THE prediction path: the
image-quality checks (:mod:`pipeline.model.quality`, thresholds on train), the temperature
(:mod:`pipeline.model.calibration`, on val) and the out-of-distribution detector
(:mod:`pipeline.model.ood`, statistics on train, threshold on val). The train stage calls
:func:`fit_trust` on the best epoch's model before it saves it; the results go into the model's
``config.json`` (``quality``, ``calibration``, ``ood``) and ``ood.npz``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.core.params import TrustParams
from pipeline.model import bundle, calibration, ood, quality
from pipeline.model.inference import Predictor


@dataclass
class SplitInputs:
    """One split as the predictor takes it: uint8 images at the input size, metadata, labels."""

    images: torch.Tensor
    metadata: pd.DataFrame | None
    labels: np.ndarray


@dataclass
class Trust:
    """The ``config.json`` entries and the arrays file of a model's calibration and OOD detector,
    and its image-quality checks."""

    calibration: dict[str, Any] | None
    ood: dict[str, Any] | None
    arrays: dict[str, dict[str, np.ndarray]]
    quality: dict[str, Any] | None = None


def fit_quality(predictor: Predictor, train: SplitInputs, val: SplitInputs, q: float) -> dict[str, Any] | None:
    """Fit the image-quality thresholds on the training split's images at the input size (None
    when ``q`` is 0: no checks) and set them on ``predictor``; their ``config.json`` entry."""
    predictor.quality = None
    if q <= 0:
        return None
    checks, train_refused = quality.fit(_u8(train.images), q)
    predictor.quality = checks
    return checks.record(train_refused, checks.refused_share(_u8(val.images)))


def _u8(images: torch.Tensor) -> np.ndarray:
    """A split's uint8 ``(N, 3, H, W)`` images as a NumPy array (on the CPU)."""
    return images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)


def fit_trust(predictor: Predictor, train: SplitInputs, val: SplitInputs, p: TrustParams, batch_size: int) -> Trust:
    """Fit the temperature on val, then the OOD score (on train) and its threshold (on val, with the
    fitted temperature), all on ``predictor``'s own outputs (its TTA setting included); first the
    image-quality thresholds (on train)."""
    checks = fit_quality(predictor, train, val, p.quality_quantile)
    predictor.temperature = 1.0
    predictor.ood = None
    predictor.blocks_wanted = p.ood_method == "mahalanobis_layers"
    try:
        val_out = predictor.predict(val.images, metadata=val.metadata, batch_size=batch_size)
        calib = None
        if p.calibration == "temperature":
            calib = calibration.calibration_record(val_out["logits"], val.labels)
            predictor.temperature = calib["temperature"]
        if p.ood_method == "none":
            return Trust(calib, None, {}, checks)
        fitting: dict[str, Any] = {"labels": train.labels}
        if p.ood_method != "energy":
            out = predictor.predict(train.images, metadata=train.metadata, tta=False, batch_size=batch_size)
            fitting |= {"embeddings": out["embeddings"], "blocks": out["blocks"]}
            fitting["block_dims"] = predictor.model.block_dims() if out["blocks"] is not None else None
        detector, val_scores = ood.fit(
            p.ood_method, fitting, val_out, p.ood_pass_share, predictor.temperature, p.ood_shrinkage
        )
    finally:
        predictor.blocks_wanted = False
    predictor.ood = detector
    arrays = {bundle.OOD_FILE: detector.arrays} if detector.arrays else {}
    record = detector.record(p.ood_pass_share, val_scores)
    if p.ood_method == "mahalanobis_layers":
        record["shrinkage"] = "ledoit_wolf" if p.ood_shrinkage is None else p.ood_shrinkage
    return Trust(calib, record, arrays, checks)
