"""Onboarding a site: the threshold that keeps the target sensitivity on a clinic's own images.

    lesionflow site add NAME IMAGES LABELS [--model TAG]

An external validation (:mod:`pipeline.audit.external`) on the site's labelled images, plus the
site's operating point: the highest threshold reaching the model's target sensitivity there
(:func:`pipeline.evaluation.metrics.choose_threshold`), with percentile intervals of a bootstrap
over the site's lesions (of the threshold, chosen again in each resample, and of the sensitivity
and specificity at it). Refused up front (:class:`pipeline.model.sites.SiteError`) when the site has
fewer malignant cases than :func:`minimum_malignant` asks for ``serving.site_interval_width``: a
threshold chosen on fewer would be known too loosely to act on. A site whose specificity at the
target is below ``serving.min_site_specificity`` is recorded as not suitable: the service answers
there with probabilities and no decision (:mod:`pipeline.model.sites`).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from pipeline.audit import external
from pipeline.core.servicesections import ServingParams
from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation import bootstrap, metrics
from pipeline.evaluation.predictions import Predictions, binary_truth
from pipeline.model import bundle
from pipeline.model.sites import SiteError, check_name


def wilson_width(p: float, n: int, confidence: float) -> float:
    """Width of the Wilson score interval of a proportion ``p`` measured on ``n`` cases."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    return 2.0 * z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / (1.0 + z * z / n)


def minimum_malignant(target: float, width: float, confidence: float) -> int:
    """The fewest malignant cases on which a sensitivity of ``target`` has a confidence interval
    (Wilson) no wider than ``width``: below it a site's threshold is too uncertain to record."""
    n = 1
    while wilson_width(target, n, confidence) > width:
        n += 1
    return n


def check_cases(
    name: str, labels: pd.DataFrame, tax: Taxonomy, target: float, serving: ServingParams, confidence: float
) -> int:
    """The fewest malignant cases a site needs (:func:`minimum_malignant`) when its labels have
    them, and a benign case; :class:`SiteError` saying how many it has and needs otherwise
    (``name``, already checked by the caller, names the site in the message)."""
    y01 = binary_truth(labels, tax)
    n_mal, needed = int(y01.sum()), minimum_malignant(target, serving.site_interval_width, confidence)
    if n_mal < needed:
        raise SiteError(
            f"site {name!r}: {n_mal} malignant case(s) in its labels; knowing a sensitivity of {target:.2f} "
            f"within an interval {serving.site_interval_width:.2f} wide (params.yaml serving.site_interval_width) "
            f"needs at least {needed}: add labelled malignant cases and run `lesionflow site add` again"
        )
    if n_mal == len(y01):
        raise SiteError(f"site {name!r}: no benign case in its labels: its specificity cannot be measured")
    return needed


def _interval(ci: dict[str, Any]) -> list[float | None]:
    return [ci.get("low"), ci.get("high")]


def operating_point(
    pred: Predictions, labels: pd.DataFrame, tax: Taxonomy, target: float, n_boot: int, confidence: float, seed: int
) -> dict[str, Any]:
    """The site's threshold for ``target`` sensitivity and its lesion-bootstrap intervals."""
    y01, score = binary_truth(labels, tax), np.asarray(pred.p_malignant, dtype=np.float64)
    chosen = metrics.choose_threshold(y01, score, target)
    n_boot = max(n_boot, 100)  # evaluate.bootstrap 0 (no CIs) still gets the site its interval
    stat = bootstrap.threshold_statistic(y01, score, target, chosen["threshold"])
    ci = bootstrap.bootstrap(stat, labels["lesion_id"].to_numpy(), n_boot, seed, confidence)
    return {
        "threshold": chosen["threshold"],
        "threshold_interval": _interval(ci["threshold"]),
        "sensitivity": chosen["sensitivity"],
        "sensitivity_interval": _interval(ci["sensitivity_at_threshold"]),
        "specificity": chosen["specificity"],
        "specificity_interval": _interval(ci["specificity_at_threshold"]),
        # the specificity at the target with the threshold chosen again in each resample: the
        # uncertainty of the figure compared with serving.min_site_specificity
        "specificity_at_target_interval": _interval(ci["specificity_at_target"]),
        "at_threshold": chosen,
        "n_boot": n_boot,
        "confidence": confidence,
    }


def site_record(
    name: str, validation: dict[str, Any], point: dict[str, Any], serving: ServingParams, min_malignant: int
) -> dict[str, Any]:
    """The record kept with the model (:func:`pipeline.model.sites.write`): the operating point,
    whether the site is suitable and why not, and the validation it comes from."""
    spec = point["specificity"]
    suitable = spec is not None and spec >= serving.min_site_specificity
    reason = None
    if not suitable:
        reason = (
            f"specificity {spec:.3f} at sensitivity {point['sensitivity']:.3f} is below "
            f"serving.min_site_specificity {serving.min_site_specificity:.2f}"
        )
    counts = validation["model_threshold"]
    return {
        "name": name,
        "created_at": validation["created_at"],
        "model": validation["model"],
        "model_md5": validation["model_md5"],
        "images_dir": validation["images_dir"],
        "labels_csv": validation["labels_csv"],
        "n_images": validation["n_images"],
        "n_lesions": validation["n_lesions"],
        "n_malignant": int(counts["tp"] + counts["fn"]),
        "ci_over": validation["ci_over"],
        "target_sensitivity": validation["target_sensitivity"],
        **point,
        "model_threshold": validation["threshold"],
        "at_model_threshold": counts,
        "suitable": suitable,
        "reason": reason,
        "min_site_specificity": serving.min_site_specificity,
        "site_interval_width": serving.site_interval_width,
        "min_malignant": min_malignant,
        "ood_flagged_share": validation.get("ood_flagged_share"),
        "quality_refused_share": validation.get("quality_refused_share"),
    }


def onboard(
    inputs: external.ExternalInputs, serving: ServingParams, tax: Taxonomy, progress: bool = True
) -> dict[str, Any]:
    """Validate the model on the site's images (:func:`pipeline.audit.external.validate_external`,
    report in ``inputs.out_dir``) and compute its operating point; returns the validation's summary
    with the site's record under ``site``. :class:`SiteError` before any work when the site has too
    few malignant cases (:func:`check_cases`)."""
    name = check_name(inputs.name)
    point = bundle.require_operating_point(inputs.model_dir)
    target = point.target_sensitivity or inputs.evaluate.target_sensitivity
    confidence = inputs.evaluate.confidence
    labels = external.read_labels(inputs.labels_csv, tax)
    needed = check_cases(name, labels, tax, target, serving, confidence)

    def site(pred: Predictions, frame: pd.DataFrame, validation: dict[str, Any]) -> dict[str, Any]:
        ev = inputs.evaluate
        found = operating_point(pred, frame, tax, target, ev.bootstrap, confidence, ev.seed)
        return site_record(name, validation, found, serving, needed)

    return external.validate_external(inputs, tax, progress, site=site)
