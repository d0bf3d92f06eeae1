"""The evaluation of one model, step by step: what the evaluate stage runs.

    ev = steps.run(steps.load(inputs), inputs, tax, p, k)   # every step, in order, each timed
    outputs.write_outputs(ev, inputs, tax, p, lineage)       # pipeline.evaluation.outputs

Each step reads what the earlier ones put on :class:`Evaluation` and adds its own part: the val
and test predictions (through the prediction cache), the operating point chosen on val, calibration
and the OOD check, the test metrics with CIs and the gates' verdict against the champion, baselines
and subgroups, the similar-cases evidence and the metadata attribution. Writing the outputs is
:mod:`pipeline.evaluation.outputs`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import images
from pipeline.core.errors import LesionflowError
from pipeline.core.layout import LAYOUT
from pipeline.core.params import EvaluateParams
from pipeline.core.taxonomy import Taxonomy
from pipeline.data import splits
from pipeline.evaluation import baselines, gates, metrics, oodsets, subgroups, summary, trust
from pipeline.evaluation.champion import evaluate_champion
from pipeline.evaluation.predictions import Predictions, binary_truth, cached_predictions
from pipeline.evaluation.retrieval import knn_evidence
from pipeline.model import bundle, checkpoint, explain, inference
from pipeline.model.retrieval import RetrievalError, RetrievalIndex


@dataclass(frozen=True)
class Inputs:
    """Where an evaluation reads and writes (the evaluate stage's command line)."""

    model: Path
    splits: Path
    images: Path
    eda: Path
    retrieval: Path
    champion: Path
    out: Path
    reports: Path
    cache_dir: Path | None = None
    progress: bool = True
    device: str | None = None


@dataclass
class Evaluation:
    """Everything one evaluation computes, step by step."""

    frames: dict[str, pd.DataFrame]
    predictor: Any
    config: dict[str, Any]
    model_md5: str
    preds: dict[str, Predictions] = field(default_factory=dict)
    op_val: dict[str, Any] = field(default_factory=dict)
    op_test: dict[str, Any] = field(default_factory=dict)
    full: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)
    champion: dict[str, Any] | None = None
    verdict: dict[str, Any] = field(default_factory=dict)
    baselines: pd.DataFrame | None = None
    curves: dict[str, Any] = field(default_factory=dict)
    eda_note: str = ""
    calibration: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] | None = None
    retrieval: dict[str, Any] | None = None
    retrieval_note: str = ""
    subgroups: pd.DataFrame | None = None
    attribution: dict[str, float] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def threshold(self) -> float:
        return float(self.op_val["threshold"])


def load(inputs: Inputs) -> Evaluation:
    """The split files and the model under evaluation."""
    return Evaluation(
        frames=splits.read_splits(inputs.splits),
        predictor=inference.load_model(inputs.model, device=inputs.device),
        config=checkpoint.read_config(inputs.model),
        model_md5=bundle.model_md5(inputs.model),
    )


def predict(ev: Evaluation, inputs: Inputs, p: EvaluateParams) -> None:
    """Val and test predictions (through the cache)."""
    for s in ("val", "test"):
        ev.preds[s] = cached_predictions(
            inputs.model,
            lambda: ev.predictor,
            ev.frames[s],
            inputs.images,
            p.batch_size,
            f"predict {s}",
            inputs.cache_dir,
            inputs.progress,
        )


def operating_point(ev: Evaluation, inputs: Inputs, tax: Taxonomy, p: EvaluateParams) -> None:
    """The binary threshold chosen on val for the target sensitivity, and what it gives on test."""
    truth = {s: binary_truth(ev.frames[s], tax) for s in ("val", "test")}
    for s, y in truth.items():
        if not 0 < y.sum() < len(y):
            raise LesionflowError(
                f"{LAYOUT.split_file(s, inputs.splits)}: needs both malignant and benign images for "
                f"the binary metrics and the operating point (has {int(y.sum())} malignant of {len(y)})"
            )
    ev.op_val = metrics.choose_threshold(truth["val"], ev.preds["val"].p_malignant, p.target_sensitivity)
    ev.op_test = metrics.at_threshold(truth["test"], ev.preds["test"].p_malignant, ev.threshold)


def measure_trust(ev: Evaluation, tax: Taxonomy, p: EvaluateParams) -> None:
    """Calibration before/after on test, and the OOD detector against non-dermoscopic images."""
    ev.calibration = trust.calibration_effect(ev.preds["test"], tax, p.calibration_bins)
    ev.ood = trust.ood_effect(ev.predictor, ev.preds["test"], oodsets.ood_images(p.seed, half="report"))


def judge(ev: Evaluation, inputs: Inputs, tax: Taxonomy, p: EvaluateParams) -> None:
    """Test metrics with CIs, the champion on the same split, and the gates' verdict."""
    ev.full = summary.level_metrics(ev.preds["test"], tax, ev.threshold, p)
    ev.head = summary.headline(ev.full)
    ood_block, ece_before = trust.headline(ev.calibration, ev.ood)
    for lvl, value in ece_before.items():
        if lvl in ev.head:
            ev.head[lvl]["ece_before_calibration"] = value
    if ood_block is not None:
        ev.head["ood"] = ood_block
    ev.champion = evaluate_champion(
        inputs.champion,
        inputs.model,
        ev.preds,
        ev.frames,
        inputs.images,
        tax,
        p,
        inference.load_model,
        inputs.cache_dir,
        inputs.progress,
    )
    spec = gates.GateSpec(p.gates.absolute, p.gates.regression_margin, tuple(p.gates.lower_is_better))
    ev.verdict = gates.evaluate_gates(
        summary.flat_for_gates(ev.head), spec, ev.champion["flat"] if ev.champion else None
    )
    ev.verdict["champion"] = (
        {k: ev.champion[k] for k in ("dir", "md5", "threshold", "threshold_source")} if ev.champion else None
    )
    ev.verdict["model_md5"] = ev.model_md5


def compare(ev: Evaluation, inputs: Inputs, tax: Taxonomy, p: EvaluateParams) -> None:
    """Baselines and subgroups on the test split."""
    ev.baselines, ev.curves, ev.eda_note = baselines.baseline_table(ev.frames, ev.preds, inputs.eda, tax, p)
    b = ev.full["binary"]["binary"]
    ev.curves = {"CNN": {**b["curves"], "roc_auc": b["roc_auc"], "pr_auc": b["pr_auc"]}, **ev.curves}
    f, test = ev.frames["test"], ev.preds["test"]
    level = "dx" if test.level("dx") is not None else "binary"  # a coarser model: subgroups on binary
    ev.subgroups = subgroups.subgroup_table(
        subgroups.subgroup_attributes(f, p),
        tax.encode(f["dx"], level),
        test.level(level),
        binary_truth(f, tax),
        test.p_malignant,
        ev.threshold,
        p.subgroup_margin,
        p.subgroup_min_positives,
    )


def similar_cases(ev: Evaluation, inputs: Inputs, tax: Taxonomy, k: int) -> None:
    """The retrieval index's kNN evidence on the test split, beside the softmax."""
    try:
        index = RetrievalIndex.load(inputs.retrieval, model_md5=ev.model_md5)
    except RetrievalError as exc:
        ev.retrieval_note = str(exc)
        return
    ev.retrieval = knn_evidence(index, ev.preds["test"], tax, k)


def attribute(ev: Evaluation, inputs: Inputs, p: EvaluateParams) -> None:
    """Metadata attribution (fusion models only) on a seeded sample of 64 test images."""
    parts = explain.explain_parts(ev.predictor)
    if parts.encode_metadata is None or p.gradcam_per_class == 0:
        return
    f = ev.frames["test"]
    idx = np.sort(np.random.default_rng(p.seed).choice(len(f), size=min(64, len(f)), replace=False))
    sample = f.iloc[idx].reset_index(drop=True)
    files = images.index_images(inputs.images)
    imgs = [images.decode_rgb(images.image_file(files, i, inputs.images)) for i in sample["image_id"]]
    native = ev.preds["test"].probs[ev.predictor.native_level]
    attr = explain.metadata_attribution(ev.predictor, imgs, sample, native[idx].argmax(1))
    ev.attribution = explain.attribution_by_field(attr, parts.metadata_fields)


def run(ev: Evaluation, inputs: Inputs, tax: Taxonomy, p: EvaluateParams, k: int) -> Evaluation:
    """Every step in order (``k``: similar cases per query), each one timed in ``ev.seconds``."""
    named: tuple[tuple[str, Callable[[], None]], ...] = (
        ("predict", lambda: predict(ev, inputs, p)),
        ("operating_point", lambda: operating_point(ev, inputs, tax, p)),
        ("trust", lambda: measure_trust(ev, tax, p)),
        ("judge", lambda: judge(ev, inputs, tax, p)),
        ("compare", lambda: compare(ev, inputs, tax, p)),
        ("similar_cases", lambda: similar_cases(ev, inputs, tax, k)),
        ("attribute", lambda: attribute(ev, inputs, p)),
    )
    for name, step in named:
        t = time.perf_counter()
        step()
        ev.seconds[name] = time.perf_counter() - t
    return ev
