"""Can an answer be trusted? What the evaluation measures of the model's calibration and of its
out-of-distribution (OOD) detector, both fitted by the train stage (:mod:`pipeline.model.trust`).

* **calibration**: top-label expected calibration error (ECE) per level, and of p(malignant), on
  the test split before and after temperature scaling, with their reliability bins;
* **OOD**: the detector's scores on the test split (in distribution) and on images that are not
  dermoscopic lesions (:mod:`pipeline.evaluation.oodsets`): AUROC (overall and per group), the
  share of OOD images caught and of test images flagged, and which OOD images got through. An
  image counts as flagged (no answer given) when the detector or an image-quality check
  (:mod:`pipeline.model.quality`) refuses it; how many each refused, and for which reasons, is
  under ``quality`` and ``detector_*``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from pipeline.core.taxonomy import LEVELS, Taxonomy
from pipeline.evaluation import metrics, oodsets
from pipeline.evaluation.oodsets import OodImage
from pipeline.evaluation.predictions import Predictions, binary_truth
from pipeline.model import quality


def calibration_effect(pred: Predictions, tax: Taxonomy, n_bins: int) -> dict[str, Any]:
    """Per level (and ``p_malignant``): ``ece_before``, ``ece_after``, the reliability data of both
    (:func:`pipeline.evaluation.metrics.reliability`) and the ROC-AUC before and after (macro
    one-vs-rest for a level). Temperature scaling keeps each image's predicted class, but with
    test-time augmentation (a mean of softmaxes) and across images (one class's probability, the
    summed p(malignant)) it can reorder scores, so the AUCs are measured, not assumed equal."""
    out: dict[str, Any] = {}
    y_dx = pred.frame["dx"]
    for lvl in LEVELS:
        after, before = pred.level(lvl), pred.uncalibrated.get(lvl)
        if after is None or before is None:
            continue
        y = tax.encode(y_dx, lvl)
        rel = {k: metrics.top_label_reliability(y, v, n_bins) for k, v in (("before", before), ("after", after))}
        out[lvl] = {
            "ece_before": rel["before"]["ece"],
            "ece_after": rel["after"]["ece"],
            "roc_auc_before": metrics.roc_auc_macro(y, before),
            "roc_auc_after": metrics.roc_auc_macro(y, after),
            "reliability": rel,
        }
    before_b, after_b = pred.uncalibrated.get("binary"), pred.level("binary")
    if before_b is not None and after_b is not None:
        y01 = binary_truth(pred.frame, tax)
        scores = {k: v[:, tax.positive_index] for k, v in (("before", before_b), ("after", after_b))}
        rel = {k: metrics.reliability(y01, v, n_bins) for k, v in scores.items()}
        auc = {k: metrics.one_vs_rest(y01, v, 1)[0] for k, v in scores.items()}
        out["p_malignant"] = {
            "ece_before": rel["before"]["ece"],
            "ece_after": rel["after"]["ece"],
            "roc_auc_before": auc["before"],
            "roc_auc_after": auc["after"],
            "reliability": rel,
        }
    return out


def ood_effect(predictor: Any, test: Predictions, others: Sequence[OodImage]) -> dict[str, Any] | None:
    """The detector measured on ``test`` (in distribution) against ``others``; None when the model
    has no detector."""
    detector = getattr(predictor, "ood", None)
    if detector is None or test.ood_score is None:
        return None
    out = predictor.predict([o.rgb for o in others], tta=False) if others else None
    scores = np.asarray(out["ood_score"]) if out is not None else np.zeros(0)
    groups = np.array([o.group for o in others])
    kinds = np.array([o.kind or o.group for o in others])
    by_detector = scores > detector.threshold
    other_reasons = (out or {}).get("quality_reasons") or [[] for _ in others]
    test_reasons = quality.from_mask(test.quality) if test.quality is not None else [[] for _ in test.ood_score]
    caught = by_detector | np.array([bool(r) for r in other_reasons], dtype=bool)
    test_flagged = ~np.asarray(test.in_distribution, dtype=bool) | np.array([bool(r) for r in test_reasons])

    def auroc(mask: np.ndarray) -> float | None:
        if not mask.any():
            return None
        y = np.r_[np.zeros(len(test.ood_score)), np.ones(int(mask.sum()))]
        return float(roc_auc_score(y, np.r_[test.ood_score, scores[mask]]))

    everything = np.ones(len(others), dtype=bool)
    result: dict[str, Any] = {
        "method": detector.method,
        "threshold": float(detector.threshold),
        "auroc": auroc(everything),
        "test_flagged_share": float(np.mean(test_flagged)),
        "caught_share": float(caught.mean()) if len(caught) else None,
        "detector_test_flagged_share": float(np.mean(~test.in_distribution)),
        "detector_caught_share": float(by_detector.mean()) if len(by_detector) else None,
        "quality": _refusals(test.quality is not None, test_reasons, other_reasons),
        "n_test": int(len(test.ood_score)),
        "n_ood": int(len(others)),
        "groups": {},
        "missed": sorted(o.name for o, c in zip(others, caught) if not c),
        "scores": {
            "test": np.round(test.ood_score, 4).tolist(),
            **{g: np.round(scores[groups == g], 4).tolist() for g in sorted(set(groups))},
        },
    }
    for g in [k for k in oodsets.KINDS if k in set(kinds)] + sorted(set(kinds) - set(oodsets.KINDS)):
        m = kinds == g
        result["groups"][g] = {
            "n": int(m.sum()),
            "auroc": auroc(m),
            "caught_share": float(caught[m].mean()),
            "detector_caught_share": float(by_detector[m].mean()),
        }
    return result


def _refusals(checked: bool, test: list[list[str]], others: list[list[str]]) -> dict[str, Any]:
    """The image-quality checks' refusals per reason on the test split and on the OOD images."""
    return {
        "checked": checked,
        "test": quality.counts(test),
        "test_refused": int(sum(bool(r) for r in test)),
        "ood_sets": quality.counts(others),
        "ood_sets_refused": int(sum(bool(r) for r in others)),
    }


def headline(calib: dict[str, Any], ood: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, float]]:
    """The DVC metrics of trust: the ``ood`` block (AUROC, test flagged share, OOD caught share) and
    each level's ECE before calibration (binary: of p(malignant), like the level's own ``ece``)."""
    block = None
    if ood is not None:
        block = {
            "auroc": ood["auroc"],
            "test_flagged_share": ood["test_flagged_share"],
            "caught_share": ood["caught_share"],
        }
        block = {k: round(v, 6) for k, v in block.items() if v is not None}
    before = {lvl: round(v["ece_before"], 6) for lvl, v in calib.items() if lvl != "binary"}
    if "p_malignant" in calib:
        before["binary"] = before.pop("p_malignant")
    return block, before
