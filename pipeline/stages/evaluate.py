"""Stage ``evaluate``: may this model ship, and why? Metrics, explanations, gates, model card
(:mod:`pipeline.evaluation`).

    python -m pipeline.stages.evaluate [--model DIR] [--splits DIR] [--images DIR] [--eda DIR] [--champion DIR]

Reads the trained model, the split, the images and, when present, the champion (the packaged model
the flow exports to ``artifacts/champion``) and the EDA stage's feature-table classifier. Writes:

``artifacts/evaluate/`` (machine-readable)
    ``predictions_{val,test}.csv`` (prediction rows: :mod:`pipeline.core.predictions`),
    ``operating_point.json`` (the binary decision threshold chosen on val: it travels with the
    model), ``metrics_full.json`` (per-class metrics, confusion matrices, curves, calibration bins,
    baselines, champion), ``lineage.json``.
``reports/evaluate/`` (for people; DVC metrics and plots)
    ``metrics.json`` (the DVC metrics: the key test numbers, referral first), ``scores.json``
    (every headline test number per taxonomy), ``confidence.json`` (their 95 % lesion-bootstrap
    CIs), ``lineage.json``, ``gates.json`` + ``gates.md`` (the verdict), ``subgroups.csv``,
    ``baselines.csv``, ``plots/*.csv`` (DVC plots), ``figures/*.png``, ``gradcam/<class>.png``,
    ``model_card.md`` + ``model_card.html``.

The stage exits 0 when the gates fail: the verdict (``passed: false``) is data that the flow acts
on. It exits 2 on a user-causable error (missing model, split or image; bad params) with a message
naming the file.
"""

from __future__ import annotations

import sys
import time
from argparse import ArgumentParser, Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import fsutil, images, lineage, params, stagecli
from pipeline.core.errors import EXIT_OK, LesionflowError
from pipeline.core.layout import LAYOUT
from pipeline.core.taxonomy import LEVELS, Taxonomy
from pipeline.data import splits
from pipeline.evaluation import baselines, figures, gates, metrics, modelcard, oodsets, subgroups, summary, trust
from pipeline.evaluation.champion import evaluate_champion
from pipeline.evaluation.predictions import Predictions, binary_truth, cached_predictions, prediction_table
from pipeline.evaluation.retrieval import knn_evidence
from pipeline.model import checkpoint, explain, inference
from pipeline.model.retrieval import RetrievalError, RetrievalIndex

#: Columns of baselines.csv shown in the model card.
BASELINE_COLUMNS = [
    "model",
    "dx.accuracy",
    "dx.balanced_accuracy",
    "dx.macro_f1",
    "dx.roc_auc_macro",
    "risk.balanced_accuracy",
    "binary.roc_auc",
    "binary.pr_auc",
    "binary.sensitivity_at_operating_point",
    "binary.specificity_at_operating_point",
]


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


# ----------------------------------------------------------------------------------------------
# the steps


def load(args: Namespace) -> Evaluation:
    """The split files and the model under evaluation."""
    predictor = inference.load_model(args.model, device=args.device)
    return Evaluation(
        frames=splits.read_splits(args.splits),
        predictor=predictor,
        config=checkpoint.read_config(args.model),
        model_md5=lineage.file_md5(args.model / checkpoint.MODEL_FILE),
    )


def predict(ev: Evaluation, args: Namespace, p: params.EvaluateParams) -> None:
    """Val and test predictions (through the cache)."""
    cache = None if args.no_cache else args.cache_dir
    for s in ("val", "test"):
        ev.preds[s] = cached_predictions(
            args.model,
            lambda: ev.predictor,
            ev.frames[s],
            args.images,
            p.batch_size,
            f"predict {s}",
            cache,
            not args.no_progress,
        )


def operating_point(ev: Evaluation, args: Namespace, tax: Taxonomy, p: params.EvaluateParams) -> None:
    """The binary threshold chosen on val for the target sensitivity, and what it gives on test."""
    truth = {s: binary_truth(ev.frames[s], tax) for s in ("val", "test")}
    for s, y in truth.items():
        if not 0 < y.sum() < len(y):
            raise LesionflowError(
                f"{LAYOUT.split_file(s, args.splits)}: needs both malignant and benign images for "
                f"the binary metrics and the operating point (has {int(y.sum())} malignant of {len(y)})"
            )
    ev.op_val = metrics.choose_threshold(truth["val"], ev.preds["val"].p_malignant, p.target_sensitivity)
    ev.op_test = metrics.at_threshold(truth["test"], ev.preds["test"].p_malignant, ev.threshold)


def measure_trust(ev: Evaluation, tax: Taxonomy, p: params.EvaluateParams) -> None:
    """Calibration before/after on test, and the OOD detector against non-dermoscopic images."""
    ev.calibration = trust.calibration_effect(ev.preds["test"], tax, p.calibration_bins)
    ev.ood = trust.ood_effect(ev.predictor, ev.preds["test"], oodsets.ood_images(p.seed))


def judge(ev: Evaluation, args: Namespace, tax: Taxonomy, p: params.EvaluateParams) -> None:
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
        args.champion,
        args.model,
        ev.preds,
        ev.frames,
        args.images,
        tax,
        p,
        inference.load_model,
        None if args.no_cache else args.cache_dir,
        not args.no_progress,
    )
    spec = gates.GateSpec(p.gates.absolute, p.gates.regression_margin, tuple(p.gates.lower_is_better))
    ev.verdict = gates.evaluate_gates(
        summary.flat_for_gates(ev.head), spec, ev.champion["flat"] if ev.champion else None
    )
    ev.verdict["champion"] = (
        {k: ev.champion[k] for k in ("dir", "md5", "threshold", "threshold_source")} if ev.champion else None
    )
    ev.verdict["model_md5"] = ev.model_md5


def compare(ev: Evaluation, args: Namespace, tax: Taxonomy, p: params.EvaluateParams) -> None:
    """Baselines and subgroups on the test split."""
    ev.baselines, ev.curves, ev.eda_note = baselines.baseline_table(ev.frames, ev.preds, args.eda, tax, p)
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


def similar_cases(ev: Evaluation, args: Namespace, tax: Taxonomy, k: int) -> None:
    """The retrieval index's kNN evidence on the test split, beside the softmax."""
    try:
        index = RetrievalIndex.load(args.retrieval, model_md5=ev.model_md5)
    except RetrievalError as exc:
        ev.retrieval_note = str(exc)
        return
    ev.retrieval = knn_evidence(index, ev.preds["test"], tax, k)


def attribute(ev: Evaluation, args: Namespace, p: params.EvaluateParams) -> None:
    """Metadata attribution (fusion models only) on a seeded sample of 64 test images."""
    parts = explain.explain_parts(ev.predictor)
    if parts.encode_metadata is None or p.gradcam_per_class == 0:
        return
    f = ev.frames["test"]
    idx = np.sort(np.random.default_rng(p.seed).choice(len(f), size=min(64, len(f)), replace=False))
    sample = f.iloc[idx].reset_index(drop=True)
    files = images.index_images(args.images)
    imgs = [images.decode_rgb(images.image_file(files, i, args.images)) for i in sample["image_id"]]
    native = ev.preds["test"].probs[ev.predictor.native_level]
    attr = explain.metadata_attribution(ev.predictor, imgs, sample, native[idx].argmax(1))
    ev.attribution = explain.attribution_by_field(attr, parts.metadata_fields)


# ----------------------------------------------------------------------------------------------
# writing


def operating_point_record(ev: Evaluation, tax: Taxonomy, p: params.EvaluateParams, lin: dict) -> dict[str, Any]:
    """``operating_point.json``: the threshold, how it was chosen and what it gives (travels with the model)."""
    return {
        "threshold": ev.threshold,
        "target_sensitivity": p.target_sensitivity,
        "rule": f"{tax.binary_positive} if p({tax.binary_positive}) >= threshold",
        "positive_class": tax.binary_positive,
        "chosen_on": "val",
        "val": ev.op_val,
        "test": ev.op_test,
        "model_md5": ev.model_md5,
        "lineage": {k: lin[k] for k in ("created_at", "git", "data")},
    }


def write_artifacts(ev: Evaluation, out: Path, tax: Taxonomy, op_record: dict, lin: dict) -> None:
    prediction_table(ev.preds["test"], tax, ev.threshold).to_csv(out / "predictions_test.csv", index=False)
    prediction_table(ev.preds["val"], tax, ev.threshold).to_csv(out / "predictions_val.csv", index=False)
    fsutil.write_json(out / "operating_point.json", op_record)
    fsutil.write_json(out / "lineage.json", lin)
    fsutil.write_json(
        out / "metrics_full.json",
        {
            "test": ev.full,
            "operating_point": op_record,
            "baselines": ev.baselines.to_dict("records"),
            "champion": ev.champion,
            "eda_note": ev.eda_note,
            "metadata_attribution": ev.attribution,
            "trust": {"calibration": ev.calibration, "ood": ev.ood},
            "retrieval": ev.retrieval or {"note": ev.retrieval_note},
        },
    )


def scores(ev: Evaluation) -> dict[str, Any]:
    """``scores.json``: every headline number of the test split (what the model's record keeps)."""
    r = ev.retrieval
    similar = {}
    if r:
        similar = {
            "similar_cases": {
                "knn_balanced_accuracy": round(r["knn"]["balanced_accuracy"], 6),
                "knn_binary_roc_auc": round(r["knn"]["binary_roc_auc"], 6),
                "precision_at_k": round(r["precision_at_k"], 6),
            }
        }
    return {
        **ev.head,
        **similar,
        "gates_passed": int(bool(ev.verdict["passed"])),
        "gates_failed": len(ev.verdict["failed"]),
        "val_sensitivity_at_operating_point": ev.op_val["sensitivity"],
        "val_specificity_at_operating_point": ev.op_val["specificity"],
        "n_val": len(ev.frames["val"]),
        "n_test": len(ev.frames["test"]),
    }


def dvc_metrics(ev: Evaluation) -> dict[str, Any]:
    """``metrics.json`` (the DVC metrics): the key numbers only (:data:`summary.KEY_METRICS`)."""
    return {**summary.key_metrics(ev.head), "gates_passed": int(bool(ev.verdict["passed"]))}


def write_tables(ev: Evaluation, rep: Path, lin: dict) -> None:
    fsutil.write_json(rep / "metrics.json", dvc_metrics(ev), sort_keys=False)
    fsutil.write_json(rep / "scores.json", scores(ev), sort_keys=False)
    fsutil.write_json(rep / "confidence.json", summary.confidence(ev.full))
    fsutil.write_json(rep / "lineage.json", lin)
    fsutil.write_json(rep / "gates.json", ev.verdict)
    fsutil.atomic_write_text(rep / "gates.md", "# Evaluation gates\n\n" + gates.verdict_markdown(ev.verdict))
    ev.subgroups.round(4).to_csv(rep / "subgroups.csv", index=False)
    ev.baselines.round(4).to_csv(rep / "baselines.csv", index=False)


def write_plots(ev: Evaluation, rep: Path, tax: Taxonomy, table: pd.DataFrame) -> None:
    """DVC plot data (``plots/*.csv``) and the PNG figures."""
    (rep / "plots").mkdir()
    (rep / "figures").mkdir()
    for name, frame in summary.plot_frames(ev.full, table).items():
        frame.to_csv(rep / "plots" / name, index=False)
    y = ev.frames["test"]["dx"]
    for lvl in ev.full:
        report, note = ev.full[lvl], "argmax"
        if lvl == "binary":  # the confusion at the operating point, not at argmax
            decided = np.where(ev.preds["test"].p_malignant >= ev.threshold, tax.positive_index, 1 - tax.positive_index)
            report = metrics.multiclass_report(tax.encode(y, "binary"), np.eye(2)[decided], tax.classes("binary"))
            note = f"binary decision at the operating point (p >= {ev.threshold:.3f})"
        title = f"Confusion matrix, {modelcard.LEVEL_TITLES[lvl]} (test)"
        figures.plot_confusion(report, title, rep / "figures" / f"confusion_{lvl}.png", note)
    figures.plot_roc_pr(ev.curves, ev.op_test, rep / "figures" / "roc_pr.png")
    figures.plot_reliability(summary.calibration_panels(ev.full), rep / "figures" / "reliability.png")
    before_after = {
        f"{name}, {when} calibration": ev.calibration[key]["reliability"][when]
        for key, name in (("dx", "7 diagnoses"), ("p_malignant", "p(malignant)"))
        if key in ev.calibration
        for when in ("before", "after")
    }
    if before_after:
        figures.plot_reliability(before_after, rep / "figures" / "calibration_before_after.png")
    if ev.ood is not None:
        figures.plot_ood_scores(ev.ood, rep / "figures" / "ood_scores.png")
    if ev.attribution:
        figures.plot_attribution(ev.attribution, rep / "figures" / "metadata_attribution.png")


def write_card(
    ev: Evaluation,
    rep: Path,
    args: Namespace,
    tax: Taxonomy,
    p: params.EvaluateParams,
    op_record: dict,
    lin: dict,
    gradcam: dict[str, str],
) -> None:
    shown = ev.baselines[[c for c in BASELINE_COLUMNS if c in ev.baselines]]
    card = modelcard.model_card(
        modelcard.CardInputs(
            config=ev.config,
            full=ev.full,
            model_dir=str(args.model),
            model_md5=ev.model_md5,
            operating_point=op_record,
            lineage=lin,
            sizes=summary.sizes(ev.frames, tax),
            test_distribution=ev.frames["test"]["dx"].value_counts().to_dict(),
            confidence=p.confidence,
            n_boot=p.bootstrap,
            verdict=ev.verdict,
            verdict_md=gates.verdict_markdown(ev.verdict),
            baselines=shown,
            eda_note=ev.eda_note,
            champion=ev.champion,
            flat=summary.flat_for_gates(ev.head),
            subgroups=ev.subgroups,
            subgroup_margin=p.subgroup_margin,
            subgroup_min_positives=p.subgroup_min_positives,
            gradcam=gradcam,
            attribution=ev.attribution,
            calibration=ev.calibration,
            ood=ev.ood,
            retrieval=ev.retrieval,
            retrieval_note=ev.retrieval_note,
        )
    )
    fsutil.atomic_write_text(rep / "model_card.md", card)
    fsutil.atomic_write_text(rep / "model_card.html", modelcard.render_html(card, "lesionflow model card"))


def write_outputs(ev: Evaluation, args: Namespace, tax: Taxonomy, p: params.EvaluateParams, lin: dict) -> None:
    """Every output; each output directory is replaced only once complete."""
    op_record = operating_point_record(ev, tax, p, lin)
    table = prediction_table(ev.preds["test"], tax, ev.threshold)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.staged_dir(args.reports) as rep, fsutil.staged_dir(args.out) as art:
        write_artifacts(ev, art, tax, op_record, lin)
        write_tables(ev, rep, lin)
        write_plots(ev, rep, tax, table)
        gradcam = figures.gradcam_grids(
            ev.predictor, table, ev.frames["test"], tax, args.images, p.gradcam_per_class, p.seed, rep / "gradcam"
        )
        write_card(ev, rep, args, tax, p, op_record, lin, gradcam)


# ----------------------------------------------------------------------------------------------
# the stage


def run(args: Namespace, p: params.EvaluateParams, tax: Taxonomy, lineage_params: dict[str, Any], k: int) -> Evaluation:
    """Evaluate the model of ``args.model`` (``k``: similar cases per query); write every output;
    return the evaluation."""
    t0 = time.perf_counter()
    ev = load(args)
    steps = (
        ("predict", lambda: predict(ev, args, p)),
        ("operating_point", lambda: operating_point(ev, args, tax, p)),
        ("trust", lambda: measure_trust(ev, tax, p)),
        ("judge", lambda: judge(ev, args, tax, p)),
        ("compare", lambda: compare(ev, args, tax, p)),
        ("similar_cases", lambda: similar_cases(ev, args, tax, k)),
        ("attribute", lambda: attribute(ev, args, p)),
    )
    for name, step in steps:
        t = time.perf_counter()
        step()
        ev.seconds[name] = time.perf_counter() - t
    lin = lineage.lineage(
        params=lineage_params,
        files=[
            args.model / checkpoint.MODEL_FILE,
            args.model / checkpoint.CONFIG_FILE,
            LAYOUT.split_file("val", args.splits),
            LAYOUT.split_file("test", args.splits),
        ],
    )
    t = time.perf_counter()
    write_outputs(ev, args, tax, p, lin)
    ev.seconds["write"] = time.perf_counter() - t
    ev.seconds["total"] = time.perf_counter() - t0
    return ev


def predict_only(args: Namespace, p: params.EvaluateParams) -> int:
    """Only predict val and test into the cache (e.g. on a GPU machine), then stop."""
    ev = load(args)
    predict(ev, args, p)
    print(f"evaluate: predictions of {args.model} on val and test cached in {args.cache_dir}")
    return EXIT_OK


def print_summary(ev: Evaluation, args: Namespace) -> None:
    parts = [
        f"{lvl}: acc {ev.head[lvl].get('accuracy', float('nan')):.3f}, bal.acc "
        f"{ev.head[lvl].get('balanced_accuracy', float('nan')):.3f}, macro AUC "
        f"{ev.head[lvl].get('roc_auc_macro') or float('nan'):.3f}"
        for lvl in LEVELS
        if lvl in ev.head
    ]
    print("evaluate: " + "; ".join(parts))
    print(
        f"evaluate: binary ROC-AUC {ev.head['binary']['roc_auc']:.3f}; operating point p >= {ev.threshold:.4f}: "
        f"test sensitivity {ev.op_test['sensitivity']:.3f}, specificity {ev.op_test['specificity']:.3f}"
    )
    passed = ev.verdict["passed"]
    print(
        f"evaluate: gates {'PASSED' if passed else 'FAILED: ' + ', '.join(ev.verdict['failed'])} "
        f"(verdict in {args.reports / 'gates.json'})"
    )
    print("evaluate: seconds " + ", ".join(f"{k} {v:.0f}" for k, v in ev.seconds.items()))


def extra_flags(ap: ArgumentParser) -> None:
    ap.add_argument(
        "--champion",
        type=Path,
        default=LAYOUT.champion_dir,
        help="the champion exported by the flow (absent: absolute gates only)",
    )
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--no-cache", action="store_true", help="always predict (no reuse of cached predictions)")
    ap.add_argument("--cache-dir", type=Path, default=LAYOUT.prediction_cache, help="cached predictions")
    ap.add_argument(
        "--predict-only",
        action="store_true",
        help="only predict val and test into the cache (e.g. on a GPU machine), then stop",
    )


def body(args: Namespace) -> int:
    p = params.load_section("evaluate", args.params)
    if args.predict_only:
        return predict_only(args, p)
    tax = params.load_taxonomy(args.params)
    k = params.load_section("retrieval", args.params).k
    ev = run(args, p, tax, {"evaluate": params.to_dict(p), "labels": tax.to_dict(), "retrieval": {"k": k}}, k)
    print_summary(ev, args)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("evaluate", __doc__, body, argv, extra=extra_flags)


if __name__ == "__main__":
    sys.exit(main())
