"""External validation: how does a packaged model do on someone else's labelled images?

    lesionflow validate-external IMAGES_DIR LABELS_CSV [--model TAG] [--name NAME] [--record]

The images are predicted through THE prediction path (:mod:`pipeline.model.inference`: the
model's calibration, TTA and OOD check), and scored with the evaluation's own metrics code
(:mod:`pipeline.evaluation.summary`: all three taxonomies, bootstrap CIs over lesions when the
labels have a ``lesion_id`` column, else over images). Reported next to the internal test
figures: what the model's operating threshold gives there (sensitivity, specificity), the
threshold that would restore the target sensitivity on this set, the share of images the OOD check
flags, and a drift check of the set against the model's reference profile
(:mod:`pipeline.monitoring.drift`).

Writes ``<out>/``: ``summary.json`` (everything), ``predictions.csv`` (prediction rows),
``report.md`` + ``report.html`` and ``drift/`` (the drift check's reports).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import fsutil, params
from pipeline.core.errors import LesionflowError
from pipeline.core.metadata import read_metadata_csv
from pipeline.core.reporting import fmt, render_template
from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation import metrics, summary
from pipeline.evaluation.modelcard import render_html
from pipeline.evaluation.predictions import Predictions, binary_truth, predict_split, prediction_table
from pipeline.model import bundle, quality
from pipeline.model.inference import load_model
from pipeline.monitoring import batch, drift, profile

TEMPLATES = Path(__file__).resolve().parent / "templates"


class ExternalError(LesionflowError, ValueError):
    """External validation cannot run on these inputs; the message names the file and the problem."""


@dataclass
class ExternalInputs:
    """What an external validation takes: the model, the images, their labels and where to write."""

    name: str
    model_dir: Path
    model_label: str
    images_dir: Path
    labels_csv: Path
    out_dir: Path
    evaluate: params.EvaluateParams
    monitor: params.MonitorParams


def read_labels(path: Path, tax: Taxonomy) -> pd.DataFrame:
    """The labels table: ``image_id`` and ``dx`` required (checked against the taxonomy), optional
    ``lesion_id`` and metadata. Without ``lesion_id`` every image is its own lesion."""
    df = read_metadata_csv(path, tax)
    if "dx" not in df:
        raise ExternalError(f"{path}: no 'dx' column: external validation needs a label per image")
    missing = df.index[df["dx"].isna()]
    if len(missing):
        raise ExternalError(f"{path}: row {missing[0] + 2}: field 'dx' is empty")
    grouped = "lesion_id" in df
    if not grouped:
        df["lesion_id"] = df["image_id"]
    df["lesion_id"] = df["lesion_id"].astype(str)
    df.attrs["grouped_by"] = "lesion" if grouped else "image"
    return df


def operating_points(pred: Predictions, tax: Taxonomy, threshold: float, target: float) -> dict[str, Any]:
    """What the model's threshold gives on this set, and the threshold restoring ``target`` sensitivity."""
    y01 = binary_truth(pred.frame, tax)
    out: dict[str, Any] = {"model_threshold": metrics.at_threshold(y01, pred.p_malignant, threshold)}
    out["restoring_target"] = metrics.choose_threshold(y01, pred.p_malignant, target)
    return out


def _drift(inputs: ExternalInputs, predictor: Any, tax: Taxonomy, progress: bool) -> dict[str, Any]:
    ref_dir = inputs.model_dir / bundle.REFERENCE_DIR
    if not ref_dir.is_dir():
        return {"decision": None, "reason": f"{ref_dir}: the model carries no reference profile: no drift check"}
    ref = profile.load_reference(ref_dir)
    current, skipped = batch.current_from_folder(
        inputs.images_dir,
        ref,
        predictor,
        metadata_csv=inputs.labels_csv,
        taxonomy=tax,
        workers=inputs.monitor.workers,
        chunk_size=inputs.monitor.chunk_size,
        batch_size=inputs.monitor.batch_size,
        progress=progress,
    )
    source = {"kind": "external", "path": str(inputs.images_dir), "metadata_csv": str(inputs.labels_csv)}
    s = drift.run_check(ref, current, inputs.monitor, inputs.out_dir / "drift", source, skipped, html=False)
    keep = ("decision", "reason", "n_current", "drift_share", "key_features_drifted", "embedding_drift", "report_dir")
    return {k: s.get(k) for k in keep}


def _point_and_truth(inputs: ExternalInputs, labels: pd.DataFrame, tax: Taxonomy) -> bundle.OperatingPoint:
    """The model's operating point; :class:`ExternalError` without one, or when the labels lack a
    malignant or a benign image (the binary metrics need both)."""
    point = bundle.operating_point(inputs.model_dir)
    if point is None:
        raise ExternalError(
            f"{inputs.model_dir}: no {bundle.OPERATING_POINT_FILE} (validate a packaged model: --model TAG)"
        )
    y01 = binary_truth(labels, tax)
    if not 0 < y01.sum() < len(y01):
        raise ExternalError(
            f"{inputs.labels_csv}: needs both malignant and benign images for the binary metrics "
            f"(has {int(y01.sum())} malignant of {len(y01)})"
        )
    return point


def _summary(
    inputs: ExternalInputs, labels: pd.DataFrame, pred: Predictions, tax: Taxonomy, point: bundle.OperatingPoint
) -> dict[str, Any]:
    """The validation's figures next to the internal test split's."""
    op = dict(point.record or {})
    full = summary.level_metrics(pred, tax, point.threshold, inputs.evaluate)
    result = {
        "name": inputs.name,
        "created_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "model": inputs.model_label,
        "model_md5": bundle.model_md5(inputs.model_dir),
        "images_dir": str(inputs.images_dir),
        "labels_csv": str(inputs.labels_csv),
        "n_images": int(len(labels)),
        "n_lesions": int(labels["lesion_id"].nunique()),
        "ci_over": labels.attrs["grouped_by"],
        "class_counts": labels["dx"].value_counts().sort_index().to_dict(),
        "threshold": point.threshold,
        "target_sensitivity": float(op.get("target_sensitivity", inputs.evaluate.target_sensitivity)),
        "metrics": summary.headline(full),
        "per_class": dict(full["dx"]["per_class"]) if "dx" in full else {},
        "confidence": summary.confidence(full),
        "internal": {"test": op.get("test"), "metrics": fsutil.read_json(inputs.model_dir / bundle.SCORES_FILE) or {}},
        "ood_flagged_share": None if pred.in_distribution is None else float(np.mean(~pred.in_distribution)),
        "quality_refused": None if pred.quality is None else quality.counts(quality.from_mask(pred.quality)),
        "quality_refused_share": None if pred.quality is None else float(np.mean(pred.quality > 0)),
    }
    result.update(operating_points(pred, tax, point.threshold, result["target_sensitivity"]))
    return result


#: What a caller adds to the summary from the predictions (``lesionflow site add``'s operating point).
Extension = Callable[[Predictions, pd.DataFrame, dict[str, Any]], dict[str, Any]]


def validate_external(
    inputs: ExternalInputs, tax: Taxonomy, progress: bool = True, site: Extension | None = None
) -> dict[str, Any]:
    """Run the external validation (see the module docstring) and write its outputs; returns the
    summary. ``site``: computes the summary's ``site`` entry from the predictions, the labels and
    the summary, before anything is written (:mod:`pipeline.audit.sites`)."""
    t0 = time.perf_counter()
    labels = read_labels(inputs.labels_csv, tax)
    predictor = load_model(inputs.model_dir, device="cpu")
    point = _point_and_truth(inputs, labels, tax)
    pred = predict_split(
        predictor, labels, inputs.images_dir, inputs.evaluate.batch_size, str(inputs.labels_csv), progress
    )
    result = _summary(inputs, labels, pred, tax, point)
    if site is not None:
        result["site"] = site(pred, labels, result)
    with fsutil.staged_dir(inputs.out_dir) as stage:
        prediction_table(pred, tax, point.threshold).to_csv(stage / "predictions.csv", index=False)
        result["drift"] = _drift(replace(inputs, out_dir=stage), predictor, tax, progress)
        if result["drift"].get("report_dir"):
            result["drift"]["report_dir"] = str(inputs.out_dir / Path(result["drift"]["report_dir"]).relative_to(stage))
        result["seconds"] = round(time.perf_counter() - t0, 1)
        fsutil.write_json(stage / "summary.json", result)
        md = render_template(TEMPLATES, "external_report.md.j2", r=result, fmt=fmt)
        fsutil.atomic_write_text(stage / "report.md", md)
        fsutil.atomic_write_text(stage / "report.html", render_html(md, f"External validation: {result['name']}"))
    return result
