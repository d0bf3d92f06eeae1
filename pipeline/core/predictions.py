"""Prediction rows: the one column schema of a prediction, wherever it is written down.

``lesionflow predict``'s CSV, the evaluate stage's ``predictions_{val,test}.csv``, the service's
inference log (as :func:`pipeline.monitoring.inferencelog.read` flattens it) and the monitoring
reference profile all name their columns this way:

==========================  ============================================================
``p_<level>_<class>``       probability of a class at a level (``dx``, ``risk``, ``binary``)
``<level>_pred``            the most probable class of that level
``p_malignant``             probability of the positive binary class (the referral score)
``threshold``               the operating threshold applied to ``p_malignant``
``decision``                the binary class at that threshold (positive iff ``p >= threshold``);
                            empty where the answer is withheld (out of distribution)
``in_distribution``         whether the image looks like the training images (the model's
                            out-of-distribution check; absent for a model without one)
``ood_score``               the out-of-distribution score behind it (higher: more unusual)
==========================  ============================================================

A level a model cannot give (a finer one than it was trained on) has no columns. Callers add their
own identifying columns (``file``, ``image_id``, ``request_id``) and, with labels, the truth
(``dx``, ``<level>_true``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.taxonomy import LEVELS, Taxonomy

if TYPE_CHECKING:
    import pandas as pd

P_MALIGNANT = "p_malignant"
THRESHOLD = "threshold"
DECISION = "decision"
IN_DISTRIBUTION = "in_distribution"
OOD_SCORE = "ood_score"
#: The image-quality reasons an image was refused for (codes of pipeline.model.quality, "; "-joined; empty: passed).
QUALITY = "quality_reasons"
_REASON_SEP = "; "
#: Decimals kept in written probabilities.
DIGITS = 6


def prob_column(level: str, cls: str) -> str:
    """``p_<level>_<class>``."""
    return f"p_{level}_{cls}"


def pred_column(level: str) -> str:
    """``<level>_pred``."""
    return f"{level}_pred"


def true_column(level: str) -> str:
    """``<level>_true`` (``dx`` itself for the diagnoses)."""
    return "dx" if level == "dx" else f"{level}_true"


def refers(p_malignant: np.ndarray | float, threshold: float) -> np.ndarray:
    """THE decision rule, the only place it is written: an image is referred (the positive binary
    class) iff ``p_malignant >= threshold``. Evaluation, its metrics and bootstrap, the service and
    ``lesionflow predict`` all decide through it."""
    return np.asarray(p_malignant, dtype=np.float64) >= threshold


def rule_text(positive: str) -> str:
    """The decision rule in words, as a model's ``operating_point.json`` records it."""
    return f"{positive} if p({positive}) >= threshold"


def decide(p_malignant: np.ndarray | float, threshold: float, taxonomy: Taxonomy) -> np.ndarray:
    """The binary class of each probability at ``threshold`` (:func:`refers`)."""
    pos = taxonomy.binary_positive
    neg = next(c for c in taxonomy.classes("binary") if c != pos)
    return np.where(refers(p_malignant, threshold), pos, neg)


def join_reasons(reasons: Sequence[str]) -> str:
    """The :data:`QUALITY` cell of an image's reason codes ("" when it passed)."""
    return _REASON_SEP.join(reasons)


def split_reasons(cell: Any) -> list[str]:
    """The reason codes of a :data:`QUALITY` cell (none for "", None or NaN)."""
    return [r for r in cell.split(_REASON_SEP) if r] if isinstance(cell, str) else []


def prediction_frame(
    levels: Mapping[str, np.ndarray | None],
    taxonomy: Taxonomy,
    p_malignant: Sequence[float] | np.ndarray,
    threshold: float | None = None,
    digits: int | None = DIGITS,
    in_distribution: Sequence[bool] | np.ndarray | None = None,
    ood_score: Sequence[float] | np.ndarray | None = None,
    withhold: bool = False,
    quality_reasons: Sequence[Sequence[str]] | None = None,
) -> pd.DataFrame:
    """The prediction columns of ``n`` images from their probabilities per level (``None`` for a
    level the model cannot give): ``p_<level>_<class>`` and ``<level>_pred`` per level, then
    ``p_malignant``, with a ``threshold`` ``threshold`` and ``decision``, and with the
    out-of-distribution verdicts ``in_distribution`` and ``ood_score``, and with the image-quality
    reasons ``quality_reasons``. ``withhold``: no decision (empty) for an image out of distribution
    or refused by a quality check (what a person is shown)."""
    cols: dict[str, object] = {}
    for level in LEVELS:
        probs = levels.get(level)
        if probs is None:
            continue
        probs = np.asarray(probs, dtype=np.float64)
        classes = taxonomy.classes(level)
        for j, c in enumerate(classes):
            cols[prob_column(level, c)] = np.round(probs[:, j], digits) if digits is not None else probs[:, j]
        cols[pred_column(level)] = np.asarray(classes, dtype=object)[probs.argmax(axis=1)]
    p = np.asarray(p_malignant, dtype=np.float64)
    cols[P_MALIGNANT] = np.round(p, digits) if digits is not None else p
    if threshold is not None:
        cols[THRESHOLD] = np.full(len(p), float(threshold))
        cols[DECISION] = decide(p, threshold, taxonomy).astype(object)
    if in_distribution is not None:
        inside = np.asarray(in_distribution, dtype=bool)
        cols[IN_DISTRIBUTION] = inside
        cols[OOD_SCORE] = np.round(np.asarray(ood_score, dtype=np.float64), 4)
        if withhold and DECISION in cols:
            cols[DECISION] = np.where(inside, cols[DECISION], None)
    if quality_reasons is not None:
        cols[QUALITY] = np.array([join_reasons(r) for r in quality_reasons], dtype=object)
        if withhold and DECISION in cols:
            cols[DECISION] = np.where(cols[QUALITY] == "", cols[DECISION], None)
    import pandas as pd

    return pd.DataFrame(cols)


def truth_frame(dx: Sequence[str], taxonomy: Taxonomy) -> pd.DataFrame:
    """The truth columns of labelled images: ``dx`` and ``<level>_true`` of the coarser levels."""
    import pandas as pd

    dx = list(dx)
    return pd.DataFrame({true_column(level): (dx if level == "dx" else taxonomy.labels(dx, level)) for level in LEVELS})
