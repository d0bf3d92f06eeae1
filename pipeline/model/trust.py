"""Fitting what makes a trained model's answers trustworthy, through THE prediction path: the
temperature (:mod:`pipeline.model.calibration`, on val) and the out-of-distribution detector
(:mod:`pipeline.model.ood`, statistics on train, threshold on val). The train stage calls
:func:`fit_trust` on the best epoch's model before it saves it; the results go into the model's
``config.json`` (``calibration``, ``ood``) and ``ood.npz``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.core.params import TrustParams
from pipeline.model import bundle, calibration, ood
from pipeline.model.inference import Predictor


@dataclass
class SplitInputs:
    """One split as the predictor takes it: uint8 images at the input size, metadata, labels."""

    images: torch.Tensor
    metadata: pd.DataFrame | None
    labels: np.ndarray


@dataclass
class Trust:
    """The ``config.json`` entries and the arrays file of a model's calibration and OOD detector."""

    calibration: dict[str, Any] | None
    ood: dict[str, Any] | None
    arrays: dict[str, dict[str, np.ndarray]]


def fit_trust(predictor: Predictor, train: SplitInputs, val: SplitInputs, p: TrustParams, batch_size: int) -> Trust:
    """Fit the temperature on val, then the OOD score (on train) and its threshold (on val, with the
    fitted temperature), all on ``predictor``'s own outputs (its TTA setting included)."""
    predictor.temperature = 1.0
    predictor.ood = None
    val_out = predictor.predict(val.images, metadata=val.metadata, batch_size=batch_size)
    calib = None
    if p.calibration == "temperature":
        calib = calibration.calibration_record(val_out["logits"], val.labels)
        predictor.temperature = calib["temperature"]
    if p.ood_method == "none":
        return Trust(calib, None, {})
    train_emb = None
    if p.ood_method == "mahalanobis":
        train_emb = predictor.predict(train.images, metadata=train.metadata, tta=False, batch_size=batch_size)[
            "embeddings"
        ]
    detector, val_scores = ood.fit(
        p.ood_method,
        train_emb,
        train.labels,
        val_out["embeddings"],
        val_out["logits"],
        p.ood_pass_share,
        predictor.temperature,
    )
    predictor.ood = detector
    arrays = {bundle.OOD_FILE: detector.arrays} if detector.arrays else {}
    return Trust(calib, detector.record(p.ood_pass_share, val_scores), arrays)
