"""Stage ``evaluate``: may this model ship, and why? Metrics, explanations, gates, model card.

Reads the trained model (``artifacts/model``), the split (``artifacts/splits/{val,test}.csv``), the
images and, when present, the champion (the packaged model, ``evaluate.champion_dir``) and the EDA
stage's feature-table classifier (``evaluate.eda_dir``). Writes:

``artifacts/evaluate/`` (machine-readable)
    ``predictions_test.csv``, ``predictions_val.csv`` (image_id, lesion_id, true dx, every class
    probability, derived risk/binary probabilities and labels), ``operating_point.json`` (the
    binary decision threshold chosen on val: it travels with the model), ``metrics_full.json``
    (per-class metrics, confusion matrices, curves, calibration bins, baselines, champion),
    ``lineage.json``.
``reports/evaluate/`` (for people; DVC metrics and plots)
    ``metrics.json`` (headline metrics with 95 % lesion-bootstrap CIs per taxonomy; DVC metrics),
    ``gates.json`` + ``gates.md`` (the verdict), ``subgroups.csv``, ``baselines.csv``,
    ``plots/*.csv`` (confusion actual/predicted, ROC, PR, calibration; DVC plots),
    ``figures/*.png`` (confusion matrices, ROC/PR, reliability diagram, metadata attribution),
    ``gradcam/<class>.png`` (Grad-CAM grids with correct and wrong predictions),
    ``model_card.md`` + ``model_card.html``.

The stage exits 0 when the gates fail: the verdict (``passed: false``) is data that the flow
acts on. It exits 2 on a user-causable error (missing model, split or image; bad params) with a
message naming the file, and crashes otherwise.

Run: ``python -m pipeline.evaluate [--params params.yaml] [--splits DIR] [--images DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from pipeline import fsutil, gates, images, lineage, linearmodel, metrics, params
from pipeline.core import project
from pipeline.taxonomy import DIAGNOSIS_NAMES, LEVELS, Taxonomy

SPLITS_DIR = Path("artifacts/splits")
IMAGES_DIR = Path("data/images")
OUT_DIR = Path("artifacts/evaluate")
REPORT_DIR = Path("reports/evaluate")
LEVEL_TITLES = {"dx": "7 diagnoses", "risk": "3 risk classes", "binary": "benign vs malignant"}


class EvaluateError(RuntimeError):
    """A user-causable problem (missing model, split or image); the message names the file."""


# ----------------------------------------------------------------------------------------------
# predictions


@dataclass
class Predictions:
    """Probabilities of one model on one split, at every label level it can give."""

    frame: pd.DataFrame  # the split rows (metadata), in order
    probs: dict[str, np.ndarray | None]  # level -> (n, K) or None
    p_malignant: np.ndarray

    def level(self, level: str) -> np.ndarray | None:
        return self.probs.get(level)


def _read_split(splits_dir: Path, name: str) -> pd.DataFrame:
    path = splits_dir / f"{name}.csv"
    if not path.exists():
        raise EvaluateError(f"{path}: split file not found (run the split stage first: dvc repro split)")
    df = pd.read_csv(path, dtype={"lesion_id": str, "image_id": str})
    missing = {"lesion_id", "image_id", "dx"} - set(df.columns)
    if missing:
        raise EvaluateError(f"{path}: missing columns {sorted(missing)}")
    if df.empty:
        raise EvaluateError(f"{path}: no rows")
    return df.reset_index(drop=True)


def _image_path(images_dir: Path, image_id: str) -> Path:
    for ext in (".jpg", ".jpeg", ".png", ".JPG"):
        p = images_dir / f"{image_id}{ext}"
        if p.exists():
            return p
    raise EvaluateError(f"{images_dir / (image_id + '.jpg')}: image file not found (image_id {image_id})")


def load_rgb(images_dir: Path, image_id: str) -> np.ndarray:
    path = _image_path(images_dir, image_id)
    try:
        return images.decode_rgb(path, str(path))
    except images.ImageError as exc:
        raise EvaluateError(str(exc)) from None


def predict_split(predictor: Any, frame: pd.DataFrame, images_dir: Path, batch_size: int, desc: str) -> Predictions:
    """Run ``predictor`` over a split in batches (decode, predict, forget: memory stays flat)."""
    from tqdm import tqdm

    parts: dict[str, list[np.ndarray]] = {lvl: [] for lvl in LEVELS}
    has: dict[str, bool] = {}
    p_mal: list[np.ndarray] = []
    meta_cols = [c for c in ("age", "sex", "localization") if c in frame.columns]
    with tqdm(total=len(frame), desc=desc, unit="img", leave=False) as bar:
        for s in range(0, len(frame), batch_size):
            chunk = frame.iloc[s : s + batch_size]
            imgs = [load_rgb(images_dir, i) for i in chunk["image_id"]]
            meta = chunk[meta_cols].reset_index(drop=True) if meta_cols else None
            out = predictor.predict(imgs, metadata=meta, batch_size=batch_size)
            for lvl in LEVELS:
                arr = out.get(f"{lvl}_probs")
                has[lvl] = arr is not None
                if arr is not None:
                    parts[lvl].append(np.asarray(arr, dtype=np.float64))
            p_mal.append(np.asarray(out["p_malignant"], dtype=np.float64))
            bar.update(len(chunk))
    probs = {lvl: (np.concatenate(parts[lvl]) if has.get(lvl) else None) for lvl in LEVELS}
    return Predictions(frame, probs, np.concatenate(p_mal))


PREDICTION_CACHE = Path(".lesionflow/cache/evaluate")
CACHE_KEEP = 6  # prediction files kept (newest first)


def prediction_key(model_dir: Path, frame: pd.DataFrame, images_dir: Path) -> str:
    """What predictions depend on: the model's weights and config (preprocessing, TTA), the
    image list, the images directory and the data version."""
    h = hashlib.md5()
    for name in ("model.pt", "config.json"):
        h.update(_md5(model_dir / name).encode())
    h.update("\n".join(frame["image_id"]).encode())
    h.update(str(images_dir).encode())  # as given (not resolved): the same key on a GPU machine's copy
    h.update(str(lineage.data_version().get("md5")).encode())
    h.update(b"evaluate-predictions/1")
    return h.hexdigest()


def cached_predictions(model_dir: Path, load: Any, frame: pd.DataFrame, images_dir: Path, batch_size: int,
                       desc: str, cache_dir: Path | None) -> Predictions:
    """:func:`predict_split` through a small local cache (``.npz``, read without pickle), so that a
    re-run for new gates, bootstrap or report settings, or the previous candidate judged again as
    the champion, does not predict again. ``load()`` gives the predictor on a cache miss."""
    key = prediction_key(model_dir, frame, images_dir) if cache_dir is not None else None
    path = cache_dir / f"{key}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                if list(z["image_id"]) == list(frame["image_id"]):
                    probs = {lvl: (z[lvl] if lvl in z.files else None) for lvl in LEVELS}
                    print(f"evaluate: {desc}: predictions reused from {path}", flush=True)
                    return Predictions(frame, probs, z["p_malignant"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: predict again
    pred = predict_split(load(), frame, images_dir, batch_size, desc)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {lvl: v for lvl, v in pred.probs.items() if v is not None}
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, image_id=np.asarray(frame["image_id"], dtype=str), p_malignant=pred.p_malignant, **arrays)
        tmp.replace(path)
        for old in sorted(path.parent.glob("*.npz"), key=lambda q: q.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    return pred


def prediction_table(pred: Predictions, tax: Taxonomy, threshold: float) -> pd.DataFrame:
    """One row per image: ids, true labels, every class probability, predicted labels."""
    f = pred.frame
    out = pd.DataFrame({"image_id": f["image_id"], "lesion_id": f["lesion_id"], "dx": f["dx"]})
    for lvl in LEVELS:
        classes = tax.classes(lvl)
        if lvl != "dx":
            out[f"{lvl}_true"] = tax.labels(f["dx"], lvl)
        probs = pred.level(lvl)
        if probs is None:
            continue
        for j, c in enumerate(classes):
            out[f"p_{lvl}_{c}"] = np.round(probs[:, j], 6)
        out[f"{lvl}_pred"] = [classes[j] for j in probs.argmax(1)]
    out["p_malignant"] = np.round(pred.p_malignant, 6)
    pos = tax.binary_positive
    neg = [c for c in tax.classes("binary") if c != pos][0]
    out["binary_pred_at_threshold"] = np.where(pred.p_malignant >= threshold, pos, neg)
    return out


# ----------------------------------------------------------------------------------------------
# metrics


def level_metrics(pred: Predictions, tax: Taxonomy, threshold: float, p: params.EvaluateParams,
                  with_ci: bool = True) -> dict[str, Any]:
    """Full metrics of every available level, with lesion-bootstrap CIs of the headline values."""
    f = pred.frame
    groups = f["lesion_id"].to_numpy()
    full: dict[str, Any] = {}
    for lvl in LEVELS:
        probs = pred.level(lvl)
        if probs is None:
            continue
        y = tax.encode(f["dx"], lvl)
        rep = metrics.multiclass_report(y, probs, tax.classes(lvl))
        rep["calibration"] = metrics.top_label_reliability(y, probs, p.calibration_bins)
        stat = metrics.multiclass_statistic(y, probs)
        if lvl == "binary":
            y01 = (y == tax.positive_index).astype(int)
            rep["binary"] = metrics.binary_report(y01, pred.p_malignant, curve_points=p.curve_points)
            rep["binary"]["calibration"] = metrics.reliability(y01, pred.p_malignant, p.calibration_bins)
            rep["operating_point"] = metrics.at_threshold(y01, pred.p_malignant, threshold)
            bstat = metrics.binary_statistic(y01, pred.p_malignant, threshold)
            stat = _merge_stats(stat, bstat)
        if with_ci and p.bootstrap:
            rep["ci"] = metrics.bootstrap(stat, groups, n_boot=p.bootstrap, seed=p.seed, confidence=p.confidence)
        full[lvl] = rep
    return full


def _merge_stats(a, b):
    def stat(w):
        out = dict(a(w))
        out.update(b(w))
        return out

    return stat


HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "roc_auc_macro", "pr_auc_macro")
BINARY_HEADLINE = ("roc_auc", "pr_auc", "sensitivity_at_specificity_90", "sensitivity_at_specificity_95",
                   "specificity_at_sensitivity_90", "specificity_at_sensitivity_95", "pauc_above_sensitivity_80")


def headline(full: Mapping[str, Any]) -> dict[str, Any]:
    """The DVC metrics: a compact, diffable dict per level (+ ``ci`` low/high)."""
    out: dict[str, Any] = {}
    for lvl, rep in full.items():
        h = {k: rep[k] for k in HEADLINE if rep.get(k) is not None}
        h["ece"] = rep["calibration"]["ece"]
        if lvl == "binary":
            b = rep["binary"]
            h.update({k: b[k] for k in BINARY_HEADLINE})
            h["ece"] = b["calibration"]["ece"]  # calibration of p(malignant)
            op = rep["operating_point"]
            h["threshold"] = op["threshold"]
            for k in ("sensitivity", "specificity", "ppv", "npv"):
                if op[k] is not None:
                    h[f"{k}_at_operating_point"] = op[k]
        if "ci" in rep:
            h["ci"] = {k: {"low": _r(v["low"]), "high": _r(v["high"])} for k, v in rep["ci"].items()}
        out[lvl] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in h.items()}
    return out


def _r(v: Any, nd: int = 6) -> Any:
    return round(v, nd) if isinstance(v, float) else v


def flat_for_gates(head: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in gates.flatten(head).items() if ".ci." not in k}


# ----------------------------------------------------------------------------------------------
# baselines


def baseline_predictions(kind: str, train: pd.DataFrame, frame: pd.DataFrame, tax: Taxonomy, seed: int) -> Predictions:
    """``majority``: the training prior for every image (argmax = the majority class);
    ``stratified``: a class drawn at random from the training prior, as a one-hot prediction."""
    prior = np.bincount(tax.encode(train["dx"], "dx"), minlength=len(tax.diagnoses)).astype(float)
    prior /= prior.sum()
    n = len(frame)
    if kind == "majority":
        dx = np.tile(prior, (n, 1))
    elif kind == "stratified":
        rng = np.random.default_rng(seed)
        dx = np.eye(len(prior))[rng.choice(len(prior), size=n, p=prior)]
    else:
        raise ValueError(kind)
    probs = {lvl: tax.derive(dx, lvl) for lvl in LEVELS}
    return Predictions(frame, probs, probs["binary"][:, tax.positive_index])


def eda_baseline(eda_dir: Path, splits: Mapping[str, pd.DataFrame], tax: Taxonomy) -> tuple[dict[str, Predictions] | None, str]:
    """The EDA stage's feature-table classifier (``baseline_model.json`` applied to the image
    features of ``features.parquet``) on each split, or ``(None, reason)``."""
    from pipeline.inference import derive_levels

    model_file, table_file = eda_dir / "baseline_model.json", eda_dir / "features.parquet"
    for f in (model_file, table_file):
        if not f.exists():
            return None, f"{f} not found (run the eda stage)"
    try:
        model_json = json.loads(model_file.read_text())
        level = model_json.get("level", "dx")
        if list(model_json.get("classes", [])) != list(tax.classes(level)):
            raise ValueError(f"classes {model_json.get('classes')} differ from the taxonomy's {list(tax.classes(level))}")
        table = pd.read_parquet(table_file).drop_duplicates("image_id").set_index("image_id")
        out = {}
        for name, frame in splits.items():
            missing = set(frame["image_id"]) - set(table.index)
            if missing:
                raise ValueError(f"{len(missing)} {name} images have no features, e.g. {sorted(missing)[0]}")
            native = linearmodel.predict_proba(model_json, table.loc[frame["image_id"]].reset_index())
            probs = derive_levels(native, level, tax)
            out[name] = Predictions(frame, probs, probs["binary"][:, tax.positive_index])
        return out, f"logistic regression on {len(model_json['features'])} image features, level {level}"
    except Exception as exc:  # a baseline must not take the evaluation down: say why it is missing
        return None, f"EDA feature classifier not scored: {type(exc).__name__}: {exc}"


def baseline_row(name: str, val: Predictions, test: Predictions, tax: Taxonomy, p: params.EvaluateParams) -> dict[str, Any]:
    """Headline test metrics of a baseline, its binary threshold chosen on val like the CNN's."""
    yv = (tax.encode(val.frame["dx"], "binary") == tax.positive_index).astype(int)
    thr = metrics.choose_threshold(yv, val.p_malignant, p.target_sensitivity)["threshold"]
    full = level_metrics(test, tax, thr, p, with_ci=False)
    head = headline(full)
    row: dict[str, Any] = {"model": name}
    for lvl in LEVELS:
        for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_macro"):
            row[f"{lvl}.{k}"] = head.get(lvl, {}).get(k)
    b = head.get("binary", {})
    for k in ("roc_auc", "pr_auc", "sensitivity_at_operating_point", "specificity_at_operating_point"):
        row[f"binary.{k}"] = b.get(k)
    return row


# ----------------------------------------------------------------------------------------------
# subgroups


def subgroup_attributes(frame: pd.DataFrame, p: params.EvaluateParams) -> dict[str, list[str]]:
    attrs: dict[str, list[str]] = {}
    if "sex" in frame:
        attrs["sex"] = frame["sex"].fillna("unknown").astype(str).tolist()
    if "age" in frame:
        ages = pd.to_numeric(frame["age"], errors="coerce")
        ages = ages.where(ages > 0)  # HAM10000 uses 0 and blank for unknown
        attrs["age_band"] = metrics.age_bands(ages.tolist(), p.age_bands)
    if "localization" in frame:
        lookup = {loc: g for g, locs in p.localization_groups.items() for loc in locs}
        locs = frame["localization"].fillna("unknown").astype(str)
        attrs["localization_group"] = [lookup.get(v, "other") if lookup else v for v in locs]
    if "dx_type" in frame:
        attrs["dx_type"] = frame["dx_type"].fillna("unknown").astype(str).tolist()
    return attrs


# ----------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(rep: Mapping[str, Any], title: str, path: Path, note: str = "") -> None:
    plt = _plt()
    labels = rep["confusion"]["labels"]
    counts = np.array(rep["confusion"]["counts"])
    norm = np.array(rep["confusion"]["normalized"])
    k = len(labels)
    size = max(4.2, 3.2 + 0.55 * k)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size + 0.6), layout="constrained")
    for ax, mat, sub, fmt in ((axes[0], counts, "counts", "d"), (axes[1], norm, "row-normalised (recall on the diagonal)", ".2f")):
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                v = mat[i, j]
                ax.text(j, i, format(int(v) if fmt == "d" else v, fmt), ha="center", va="center",
                        color="white" if norm[i, j] > 0.55 else "black", fontsize=9)
        ax.set_xticks(range(k), labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(sub, fontsize=10)
    fig.colorbar(im, ax=axes, fraction=0.025)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc_pr(curves: Mapping[str, Mapping[str, Any]], op: Mapping[str, Any], path: Path) -> None:
    """ROC and PR of the binary score for the CNN (and baselines), operating point marked."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name, c in curves.items():
        lw = 2.0 if name == "CNN" else 1.2
        a.plot(c["roc"]["fpr"], c["roc"]["tpr"], lw=lw, label=f"{name} (AUC {c['roc_auc']:.3f})")
        b.plot(c["pr"]["recall"], c["pr"]["precision"], lw=lw, label=f"{name} (AP {c['pr_auc']:.3f})")
    a.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    if op.get("sensitivity") is not None:
        a.scatter([1 - op["specificity"]], [op["sensitivity"]], c="red", zorder=5,
                  label=f"operating point t={op['threshold']:.3f}\nsens {op['sensitivity']:.3f}, spec {op['specificity']:.3f}")
        if op.get("ppv") is not None:
            b.scatter([op["sensitivity"]], [op["ppv"]], c="red", zorder=5, label="operating point")
    a.axhspan(0.8, 1.0, color="orange", alpha=0.08, label="pAUC region (sens >= 0.8)")
    a.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity", title="ROC, malignant vs benign (test)",
          xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    b.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall (test)",
          xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    a.legend(fontsize=8, loc="lower right")
    b.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(cals: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(cals), figsize=(4.6 * len(cals), 4.6), squeeze=False)
    for ax, (title, cal) in zip(axes[0], cals.items()):
        bins = [bn for bn in cal["bins"] if bn["count"] > 0]
        centers = [(bn["lower"] + bn["upper"]) / 2 for bn in bins]
        width = 1.0 / cal["n_bins"]
        ax.bar(centers, [bn["observed_frequency"] for bn in bins], width=width * 0.9, alpha=0.75,
               edgecolor="k", label="observed")
        ax.plot([0, 1], [0, 1], ls="--", c="grey", label="perfect calibration")
        ax.plot([bn["mean_probability"] for bn in bins], [bn["observed_frequency"] for bn in bins], "o-",
                c="C3", ms=4, label="mean predicted vs observed")
        for c, bn in zip(centers, bins):
            ax.text(c, 0.02, str(bn["count"]), ha="center", fontsize=7, rotation=90)
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{title}\nECE {cal['ece']:.3f}",
               xlabel="predicted probability", ylabel="observed frequency")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attribution(by_field: Mapping[str, float], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    names = list(by_field)
    ax.barh(names, [by_field[n] for n in names], color="C2")
    ax.xaxis.set_major_locator(plt.MaxNLocator(4))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("mean |integrated gradients| on p(predicted class)")
    ax.set_title("Metadata attribution (test sample)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradcam_grids(predictor: Any, table: pd.DataFrame, frame: pd.DataFrame, tax: Taxonomy, images_dir: Path,
                  per_class: int, seed: int, out_dir: Path) -> dict[str, str]:
    """For each diagnosis: a grid of up to ``per_class`` correct and ``per_class`` wrong test
    predictions, Grad-CAM of the predicted class over the image."""
    from tqdm import tqdm

    from pipeline import explain

    plt = _plt()
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written: dict[str, str] = {}
    if "dx_pred" not in table or per_class == 0:
        return written
    classes = tax.classes("dx")
    meta_cols = [c for c in ("age", "sex", "localization") if c in frame.columns]
    jobs = []
    for c in classes:
        rows = {}
        for kind, mask in (("correct", (table["dx"] == c) & (table["dx_pred"] == c)),
                           ("wrong", (table["dx"] == c) & (table["dx_pred"] != c))):
            idx = np.flatnonzero(mask.to_numpy())
            rows[kind] = sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()) if len(idx) else []
        jobs.append((c, rows))
    total = sum(len(r["correct"]) + len(r["wrong"]) for _, r in jobs)
    with tqdm(total=total, desc="Grad-CAM", unit="img", leave=False) as bar:
        for c, rows in jobs:
            fig, axes = plt.subplots(2, per_class, figsize=(2.6 * per_class, 5.6), squeeze=False)
            for r, kind in enumerate(("correct", "wrong")):
                for j in range(per_class):
                    ax = axes[r, j]
                    ax.axis("off")
                    if j >= len(rows[kind]):
                        if j == 0:
                            ax.text(0.5, 0.5, f"no {kind} predictions", ha="center", va="center", fontsize=9)
                        continue
                    i = rows[kind][j]
                    rec = table.iloc[i]
                    rgb = load_rgb(images_dir, rec["image_id"])
                    pred = rec["dx_pred"]
                    meta = frame.iloc[[i]][meta_cols].reset_index(drop=True) if meta_cols else None
                    heat = explain.gradcam(predictor, rgb, target_class=classes.index(pred), metadata=meta)
                    ax.imshow(explain.overlay(rgb, heat))
                    p_pred = rec.get(f"p_dx_{pred}", float("nan"))
                    ax.set_title(f"{rec['image_id']}\ntrue {rec['dx']} -> pred {pred} ({p_pred:.2f})",
                                 fontsize=8, color="green" if kind == "correct" else "red")
                    bar.update(1)
                axes[r, 0].text(-0.08, 0.5, kind, transform=axes[r, 0].transAxes, rotation=90,
                                va="center", ha="right", fontsize=11, weight="bold")
            fig.suptitle(f"Grad-CAM of the predicted class, true class {c} ({DIAGNOSIS_NAMES.get(c, c)})", fontsize=11)
            fig.tight_layout()
            path = out_dir / f"{c}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written[c] = str(path.name)
    return written


# ----------------------------------------------------------------------------------------------
# DVC plot data


def confusion_csv(table: pd.DataFrame, level: str) -> pd.DataFrame | None:
    actual = table["dx"] if level == "dx" else table.get(f"{level}_true")
    pred = table["binary_pred_at_threshold"] if level == "binary" else table.get(f"{level}_pred")
    if actual is None or pred is None:
        return None
    return pd.DataFrame({"actual": actual, "predicted": pred})


# ----------------------------------------------------------------------------------------------
# the model card


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _ci(rep: Mapping[str, Any], key: str, value: Any = None) -> str:
    value = rep.get(key) if value is None else value
    ci = rep.get("ci", {}).get(key)
    if ci and ci.get("low") is not None:
        return f"{_fmt(value)} [{_fmt(ci['low'])}, {_fmt(ci['high'])}]"
    return _fmt(value)


def _md_table(df: pd.DataFrame, nd: int = 3) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(_fmt(row[c], nd) if not isinstance(row[c], str) else row[c] for c in cols) + " |")
    return "\n".join(lines)


def model_card(ctx: Mapping[str, Any]) -> str:
    """The model card as Markdown (rendered to HTML by :func:`render_html`)."""
    cfg = ctx["config"]
    arch = cfg.get("architecture", {})
    full = ctx["full"]
    op = ctx["operating_point"]
    lin = ctx["lineage"]
    L: list[str] = []
    a = L.append
    a(f"# Model card: lesionflow skin-lesion classifier ({arch.get('backbone', '?')})")
    a("")
    a(f"Evaluated {lin['created_at']} on the held-out **test split** ({ctx['sizes']['test']['images']:,} images, "
      f"{ctx['sizes']['test']['lesions']:,} lesions). Gates: **{'PASSED' if ctx['verdict']['passed'] else 'FAILED'}** "
      "(see [Gates](#gates)).")
    a("")
    a("> **Not a diagnostic device.** This model is a research and engineering artefact. It has not been "
      "clinically validated or approved by any regulator and must not be used to diagnose, rule out or triage "
      "skin cancer. Any suspicious lesion must be examined by a qualified clinician.")
    a("")
    a("## Intended use")
    a("- Decision-support research and MLOps demonstration on dermoscopic images of pigmented skin lesions, "
      "as in HAM10000: ranking lesions by estimated probability of malignancy for review by a dermatologist.")
    a("- Outputs: probabilities of 7 diagnoses (akiec, bcc, bkl, df, mel, nv, vasc), of 3 risk classes and "
      "of malignant vs benign, plus a binary decision at the operating point below.")
    a("- Out of scope: clinical photographs (non-dermoscopic), non-pigmented lesions, other diagnoses than "
      "the 7 classes, children, and any use without a clinician in the loop.")
    a("")
    a("## Model")
    a(f"- Backbone: `{arch.get('backbone')}` ({arch.get('pretrained_weights', '')}); input "
      f"{cfg.get('preprocessing', {}).get('input_size')} (H, W); trained on level `{cfg.get('target_level')}`; "
      f"metadata fusion: {'yes (age, sex, localization)' if arch.get('metadata') else 'no'}.")
    a(f"- Weights: `{ctx['model_dir']}/model.pt` (md5 `{ctx['model_md5']}`).")
    a("")
    a("## Data")
    a(f"- HAM10000 (Tschandl et al. 2018, CC BY-NC-SA 4.0), data version md5 `{lin['data'].get('md5')}`.")
    a("- Split by lesion (no lesion in two splits), stratified by diagnosis:")
    a("")
    a("| split | images | lesions | malignant images |")
    a("|---|---:|---:|---:|")
    for s, v in ctx["sizes"].items():
        a(f"| {s} | {v['images']:,} | {v['lesions']:,} | {v.get('malignant', '-')} |")
    a("")
    dist = ctx["test_distribution"]
    a("Test images per diagnosis: " + ", ".join(f"{k} {v}" for k, v in dist.items()) + ".")
    a("")
    a("## Performance on the test split")
    a(f"Point estimates with {round(ctx['confidence'] * 100)} % confidence intervals from {ctx['n_boot']} "
      "bootstrap resamples of **lesions** (images of one lesion are not independent).")
    a("")
    a("Accuracy, balanced accuracy and F1 use the most probable class (for binary: p(malignant) >= 0.5; "
      "the clinical decision uses the operating point below).")
    a("")
    a("| taxonomy | accuracy | balanced accuracy | macro F1 | macro ROC-AUC | macro PR-AUC | ECE |")
    a("|---|---|---|---|---|---|---|")
    for lvl, rep in full.items():
        ece = rep["binary"]["calibration"]["ece"] if lvl == "binary" else rep["calibration"]["ece"]
        a(f"| {lvl} ({LEVEL_TITLES[lvl]}) | {_ci(rep, 'accuracy')} | {_ci(rep, 'balanced_accuracy')} | "
          f"{_ci(rep, 'macro_f1')} | {_ci(rep, 'roc_auc_macro')} | {_fmt(rep.get('pr_auc_macro'))} | {_fmt(ece)} |")
    a("")
    if "binary" in full:
        b = full["binary"]
        bb = b["binary"]
        a("### Malignant vs benign")
        a("")
        a("| metric | value |")
        a("|---|---|")
        a(f"| ROC-AUC | {_ci(b, 'roc_auc', bb['roc_auc'])} |")
        a(f"| PR-AUC (average precision; prevalence {bb['prevalence']:.3f}) | {_ci(b, 'pr_auc', bb['pr_auc'])} |")
        a(f"| sensitivity at 90 % specificity | {_ci(b, 'sensitivity_at_specificity_90', bb['sensitivity_at_specificity_90'])} |")
        a(f"| sensitivity at 95 % specificity | {_ci(b, 'sensitivity_at_specificity_95', bb['sensitivity_at_specificity_95'])} |")
        a(f"| specificity at 90 % sensitivity | {_fmt(bb['specificity_at_sensitivity_90'])} |")
        a(f"| specificity at 95 % sensitivity | {_fmt(bb['specificity_at_sensitivity_95'])} |")
        a(f"| partial AUC, sensitivity >= 80 % (max 0.2) | {_fmt(bb['pauc_above_sensitivity_80'])} |")
        a("")
        a("![ROC and PR curves](figures/roc_pr.png)")
        a("")
    a("## Operating point")
    a(f"Decision rule: **malignant if p(malignant) >= {op['threshold']:.4f}**. The threshold was chosen on the "
      f"validation split as the highest one reaching the target sensitivity of {op['target_sensitivity']:.2f} "
      "(a missed malignancy costs most); it is stored with the model (`operating_point.json`).")
    a("")
    a("| split | threshold | sensitivity | specificity | PPV | NPV | TP | FN | FP | TN |")
    a("|---|---:|---|---|---|---|---:|---:|---:|---:|")
    for s in ("val", "test"):
        o = op[s]
        sens = _ci(full["binary"], "sensitivity_at_operating_point", o["sensitivity"]) if s == "test" else _fmt(o["sensitivity"])
        spec = _ci(full["binary"], "specificity_at_operating_point", o["specificity"]) if s == "test" else _fmt(o["specificity"])
        a(f"| {s} | {o['threshold']:.4f} | {sens} | {spec} | {_fmt(o['ppv'])} | {_fmt(o['npv'])} | "
          f"{o['tp']} | {o['fn']} | {o['fp']} | {o['tn']} |")
    a("")
    if "dx" in full:
        a("## Per diagnosis (test)")
        a("")
        a("| diagnosis | support | precision | recall (sensitivity) | F1 | ROC-AUC (one-vs-rest) | PR-AUC |")
        a("|---|---:|---|---|---|---|---|")
        for c, v in full["dx"]["per_class"].items():
            a(f"| {c} - {DIAGNOSIS_NAMES.get(c, c)} | {v['support']} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | "
              f"{_fmt(v['f1'])} | {_fmt(v['roc_auc'])} | {_fmt(v['pr_auc'])} |")
        a("")
    a("### Confusion matrices")
    for lvl in full:
        a(f"![confusion {lvl}](figures/confusion_{lvl}.png)")
    a("")
    a("## Calibration")
    a("Expected calibration error (ECE, equal-width bins) of the top-label confidence for dx and risk, and of "
      "p(malignant) for binary: " + ", ".join(
          f"{lvl} {(_fmt(rep['binary']['calibration']['ece']) if lvl == 'binary' else _fmt(rep['calibration']['ece']))}"
          for lvl, rep in full.items()) + ".")
    a("")
    a("![reliability diagrams](figures/reliability.png)")
    a("")
    a("## Baselines (same test split)")
    a("Majority class (the training prior for every image), stratified random (a class drawn from the "
      "training prior) and the EDA stage's interpretable feature-table classifier. Binary thresholds of "
      "each are chosen on val like the CNN's.")
    a("")
    a(_md_table(ctx["baselines"]))
    if ctx.get("eda_note"):
        a("")
        a(f"_EDA feature classifier: {ctx['eda_note']}_")
    a("")
    if ctx.get("champion"):
        ch = ctx["champion"]
        a("## Champion (the packaged model, same test split)")
        a(f"Champion `{ch['dir']}` (md5 `{ch['md5']}`), threshold {ch['threshold']:.4f} ({ch['threshold_source']}).")
        a("")
        a("| metric | this model | champion |")
        a("|---|---:|---:|")
        for k in sorted(set(ctx["flat"]) & set(ch["flat"])):
            a(f"| `{k}` | {_fmt(ctx['flat'][k])} | {_fmt(ch['flat'][k])} |")
        a("")
    a("## Subgroups (test)")
    a(f"Binary sensitivity/specificity at the operating point. Flag `low_sensitivity`: more than "
      f"{ctx['subgroup_margin']:.2f} below the overall sensitivity ({_fmt(op['test']['sensitivity'])}); "
      f"`too_few_positives`: fewer than {ctx['subgroup_min_positives']} malignant images, too uncertain to judge.")
    a("")
    sub = ctx["subgroups"]
    a(_md_table(sub))
    flagged = sub[sub["flag"] == "low_sensitivity"]
    a("")
    a("Flagged groups: " + (", ".join(f"{r.attribute}={r.group}" for r in flagged.itertuples()) if len(flagged) else "none") + ".")
    a("")
    a("## Explanations")
    a("Grad-CAM heatmaps (the `grad-cam` package) of the predicted class over test images, per true diagnosis, "
      "correct predictions on top and errors below. They show which image regions drive the classification; "
      "compare with the EDA stage's feature ranking.")
    a("")
    for c, name in ctx["gradcam"].items():
        a(f"![Grad-CAM {c}](gradcam/{name})")
        a("")
    if ctx.get("attribution"):
        a("")
        a("Metadata attribution (integrated gradients from the all-missing baseline, mean |attribution| on "
          "p(predicted class)): " + ", ".join(f"{k} {v:.4f}" for k, v in ctx["attribution"].items()) + ".")
        a("")
        a("![metadata attribution](figures/metadata_attribution.png)")
    a("")
    a("## Gates")
    a(ctx["verdict_md"])
    a("## Limitations and known biases")
    a("- Images are 200x150 downsampled dermoscopy (HAM10000 release at 600x450 resampled); fine structures "
      "(dots, globules, vessels) are partly lost. Performance on full-resolution images is untested.")
    a("- Dataset bias: HAM10000 comes from two sites (Vienna, Queensland) and mostly fair-skinned patients; "
      "darker skin types (Fitzpatrick V-VI) are nearly absent, so performance on them is unknown and likely worse.")
    a("- Label noise and verification bias: only about half the lesions are histopathologically confirmed "
      "(`dx_type`); malignant classes are almost always histo-confirmed, benign ones often by follow-up or consensus.")
    a("- Class imbalance: nv is about two thirds of the data; df and vasc have few test lesions, so their "
      "per-class figures have wide intervals.")
    a("- Several images per lesion: metrics count images, CIs resample lesions.")
    a("- Operating point set on the validation split: its sensitivity on new data will vary (see the test row and CI).")
    a("")
    a("## Lineage")
    git = lin["git"]
    a(f"- Code: git commit `{git.get('commit')}`{' (dirty tree)' if git.get('dirty') else ''}.")
    a(f"- Data: `{lin['data'].get('path', 'data')}` md5 `{lin['data'].get('md5')}`.")
    if cfg.get("lineage"):
        tl = cfg["lineage"]
        a(f"- Training: commit `{tl.get('git', {}).get('commit')}`, data md5 `{tl.get('data', {}).get('md5')}`, "
          f"created {tl.get('created_at')}.")
    a(f"- Evaluation params: `{json.dumps(lin['params'].get('evaluate', {}), sort_keys=True)[:2000]}`")
    a(f"- Libraries: " + ", ".join(f"{k} {v}" for k, v in lin["libraries"].items()))
    a("")
    return "\n".join(L)


def render_html(md_text: str, title: str) -> str:
    import markdown

    body = markdown.markdown(md_text, extensions=["tables", "toc"])
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em}"
             "th{background:#f3f3f3}img{max-width:100%}blockquote{border-left:4px solid #c00;margin:1em 0;padding:.5em 1em;background:#fff4f4}"
             "code{background:#f5f5f5;padding:0 .2em}")
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head><body>\n{body}\n</body></html>\n")


# ----------------------------------------------------------------------------------------------
# the stage


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _binary_truth(frame: pd.DataFrame, tax: Taxonomy) -> np.ndarray:
    return (tax.encode(frame["dx"], "binary") == tax.positive_index).astype(int)


def _sizes(frames: Mapping[str, pd.DataFrame], tax: Taxonomy) -> dict[str, dict[str, int]]:
    return {s: {"images": int(len(f)), "lesions": int(f["lesion_id"].nunique()),
                "malignant": int(_binary_truth(f, tax).sum())} for s, f in frames.items()}


def evaluate_champion(champion_dir: Path, model_md5: str, own: Mapping[str, Predictions],
                      frames: Mapping[str, pd.DataFrame], images_dir: Path, tax: Taxonomy,
                      p: params.EvaluateParams, load_model, cache_dir: Path | None = None) -> dict[str, Any] | None:
    """The champion's headline metrics on the same test split (None when there is no champion)."""
    weights, config = champion_dir / "model.pt", champion_dir / "config.json"
    if not (weights.exists() and config.exists()):
        return None
    md5 = _md5(weights)
    loaded: list[Any] = []

    def champ() -> Any:
        if not loaded:
            loaded.append(load_model(champion_dir))
        return loaded[0]

    if md5 == model_md5 and (champion_dir / "config.json").read_bytes() == (Path(p.model_dir) / "config.json").read_bytes():
        preds = dict(own)  # the champion is this very model: no need to predict again
    else:
        preds = {"test": cached_predictions(champion_dir, champ, frames["test"], images_dir, p.batch_size,
                                            "champion test", cache_dir)}
    op_file = champion_dir / "operating_point.json"
    if op_file.exists():
        thr = float(json.loads(op_file.read_text())["threshold"])
        source = f"from {op_file}"
    else:
        if "val" not in preds:
            preds["val"] = cached_predictions(champion_dir, champ, frames["val"], images_dir, p.batch_size,
                                              "champion val", cache_dir)
        thr = metrics.choose_threshold(_binary_truth(frames["val"], tax), preds["val"].p_malignant,
                                       p.target_sensitivity)["threshold"]
        source = "chosen on val (no operating_point.json with the champion)"
    head = headline(level_metrics(preds["test"], tax, thr, p, with_ci=False))
    return {"dir": str(champion_dir), "md5": md5, "threshold": thr, "threshold_source": source,
            "metrics": head, "flat": flat_for_gates(head)}


def run(p: params.EvaluateParams, tax: Taxonomy, *, splits_dir: Path = SPLITS_DIR, images_dir: Path = IMAGES_DIR,
        out_dir: Path = OUT_DIR, report_dir: Path = REPORT_DIR, params_for_lineage: Mapping[str, Any] | None = None,
        device: str | None = None, cache_dir: Path | None = PREDICTION_CACHE) -> dict[str, Any]:
    """Evaluate the model of ``p.model_dir``; write every output; return the summary (metrics + verdict).

    Raises :class:`EvaluateError` for a missing model, split file or image.
    """
    from pipeline import inference

    t0 = time.perf_counter()
    model_dir = Path(p.model_dir)
    frames = {s: _read_split(splits_dir, s) for s in ("train", "val", "test")}
    try:
        predictor = inference.load_model(model_dir, device=device)
    except inference.ModelLoadError as exc:
        raise EvaluateError(str(exc)) from None
    cfg = inference.read_config(model_dir)
    model_md5 = _md5(model_dir / "model.pt")
    timings: dict[str, float] = {}

    preds = {s: cached_predictions(model_dir, lambda: predictor, frames[s], images_dir, p.batch_size,
                                   f"predict {s}", cache_dir) for s in ("val", "test")}
    timings["predict"] = time.perf_counter() - t0

    # operating point: chosen on val, reported on test
    yv, yt = _binary_truth(frames["val"], tax), _binary_truth(frames["test"], tax)
    for name, y in (("val", yv), ("test", yt)):
        if not 0 < y.sum() < len(y):
            raise EvaluateError(f"{splits_dir / (name + '.csv')}: needs both malignant and benign images "
                                f"for the binary metrics and the operating point (has {int(y.sum())} malignant "
                                f"of {len(y)})")
    op_val = metrics.choose_threshold(yv, preds["val"].p_malignant, p.target_sensitivity)
    thr = op_val["threshold"]
    op_test = metrics.at_threshold(yt, preds["test"].p_malignant, thr)

    full = level_metrics(preds["test"], tax, thr, p)
    head = headline(full)
    flat = flat_for_gates(head)
    timings["metrics"] = time.perf_counter() - t0 - sum(timings.values())

    # champion and gates
    champion = evaluate_champion(Path(p.champion_dir), model_md5, preds, frames, images_dir, tax, p,
                                 inference.load_model, cache_dir)
    timings["champion"] = time.perf_counter() - t0 - sum(timings.values())
    spec = gates.GateSpec(p.gates.absolute, p.gates.regression_margin, tuple(p.gates.lower_is_better))
    verdict = gates.evaluate_gates(flat, spec, champion["flat"] if champion else None)
    verdict["champion"] = {k: champion[k] for k in ("dir", "md5", "threshold", "threshold_source")} if champion else None
    verdict["model_md5"] = model_md5
    verdict_md = gates.verdict_markdown(verdict)

    # baselines
    base_rows = [baseline_row("CNN (this model)", preds["val"], preds["test"], tax, p)]
    curves = {"CNN": {**full["binary"]["binary"]["curves"], "roc_auc": full["binary"]["binary"]["roc_auc"],
                      "pr_auc": full["binary"]["binary"]["pr_auc"]}}
    for kind in ("majority", "stratified"):
        bv = baseline_predictions(kind, frames["train"], frames["val"], tax, p.seed)
        bt = baseline_predictions(kind, frames["train"], frames["test"], tax, p.seed + 1)
        base_rows.append(baseline_row(f"{kind} class" if kind == "majority" else "stratified random", bv, bt, tax, p))
    eda, eda_note = eda_baseline(Path(p.eda_dir), {"val": frames["val"], "test": frames["test"]}, tax)
    if eda is not None:
        base_rows.append(baseline_row("EDA feature classifier", eda["val"], eda["test"], tax, p))
        eb = metrics.binary_report(yt, eda["test"].p_malignant, curve_points=p.curve_points)
        curves["EDA feature classifier"] = {**eb["curves"], "roc_auc": eb["roc_auc"], "pr_auc": eb["pr_auc"]}
    baselines = pd.DataFrame(base_rows)
    shown = ["model", "dx.accuracy", "dx.balanced_accuracy", "dx.macro_f1", "dx.roc_auc_macro",
             "risk.balanced_accuracy", "binary.roc_auc", "binary.pr_auc",
             "binary.sensitivity_at_operating_point", "binary.specificity_at_operating_point"]
    baselines_shown = baselines[[c for c in shown if c in baselines]]

    # subgroups
    f = frames["test"]
    dxp = preds["test"].level("dx")
    if dxp is None:  # coarser model: subgroup accuracy on its native level is not comparable; use binary
        dxp = preds["test"].level("binary")
        ydx = tax.encode(f["dx"], "binary")
    else:
        ydx = tax.encode(f["dx"], "dx")
    subgroups = metrics.subgroup_table(subgroup_attributes(f, p), ydx, dxp, yt, preds["test"].p_malignant, thr,
                                       p.subgroup_margin, p.subgroup_min_positives)

    timings["baselines_subgroups"] = time.perf_counter() - t0 - sum(timings.values())
    table_test = prediction_table(preds["test"], tax, thr)
    table_val = prediction_table(preds["val"], tax, thr)
    lin = lineage.lineage(
        params=dict(params_for_lineage or {"evaluate": params.to_dict(p)}),
        files=[model_dir / "model.pt", model_dir / "config.json", splits_dir / "val.csv", splits_dir / "test.csv"],
    )
    operating_point = {
        "threshold": thr,
        "target_sensitivity": p.target_sensitivity,
        "rule": f"{tax.binary_positive} if p({tax.binary_positive}) >= threshold",
        "positive_class": tax.binary_positive,
        "chosen_on": "val",
        "val": op_val,
        "test": op_test,
        "model_md5": model_md5,
        "lineage": {k: lin[k] for k in ("created_at", "git", "data")},
    }

    # metadata attribution (fusion models only) on a small test sample
    attribution = None
    from pipeline import explain

    parts = explain.explain_parts(predictor)
    if parts.encode_metadata is not None and p.gradcam_per_class > 0:
        rng = np.random.default_rng(p.seed)
        idx = np.sort(rng.choice(len(f), size=min(64, len(f)), replace=False))
        imgs = [load_rgb(images_dir, f["image_id"].iloc[i]) for i in idx]
        native = preds["test"].probs[predictor.native_level]
        attr = explain.metadata_attribution(predictor, imgs, f.iloc[idx].reset_index(drop=True), native[idx].argmax(1))
        attribution = explain.attribution_by_field(attr, parts.metadata_fields)

    timings["attribution"] = time.perf_counter() - t0 - sum(timings.values())
    summary = {"metrics": head, "gates": {"passed": verdict["passed"], "failed": verdict["failed"]},
               "operating_point": {"threshold": thr, "test_sensitivity": op_test["sensitivity"],
                                   "test_specificity": op_test["specificity"]}}

    # ---- write everything: each output directory is replaced only once complete
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.staged_dir(report_dir) as rep, fsutil.staged_dir(out_dir) as art:
        (rep / "plots").mkdir()
        (rep / "figures").mkdir()
        table_test.to_csv(art / "predictions_test.csv", index=False)
        table_val.to_csv(art / "predictions_val.csv", index=False)
        fsutil.write_json(art / "operating_point.json", operating_point)
        fsutil.write_json(art / "lineage.json", lin)
        fsutil.write_json(art / "metrics_full.json", {
            "test": full, "operating_point": operating_point, "baselines": baselines.to_dict("records"),
            "champion": champion, "eda_note": eda_note, "metadata_attribution": attribution,
        })
        metrics_json = dict(head)
        metrics_json["operating_point"] = {"threshold": thr, "val_sensitivity": op_val["sensitivity"],
                                           "val_specificity": op_val["specificity"]}
        metrics_json["gates"] = {"passed": verdict["passed"], "n_failed": len(verdict["failed"])}
        metrics_json["n"] = {s: len(frames[s]) for s in ("val", "test")}
        fsutil.write_json(rep / "metrics.json", metrics_json)
        fsutil.write_json(rep / "gates.json", verdict)
        fsutil.atomic_write_text(rep / "gates.md", "# Evaluation gates\n\n" + verdict_md)
        subgroups.round(4).to_csv(rep / "subgroups.csv", index=False)
        baselines.round(4).to_csv(rep / "baselines.csv", index=False)

        for lvl in full:
            cc = confusion_csv(table_test, lvl)
            if cc is not None:
                cc.to_csv(rep / "plots" / f"confusion_{lvl}.csv", index=False)
            note = f"binary decision at the operating point (p >= {thr:.3f})" if lvl == "binary" else "argmax"
            rep_lvl = full[lvl]
            if lvl == "binary":  # the confusion at the operating point, not at argmax
                rep_lvl = metrics.multiclass_report(
                    tax.encode(f["dx"], "binary"),
                    np.eye(2)[np.where(preds["test"].p_malignant >= thr, tax.positive_index, 1 - tax.positive_index)],
                    tax.classes("binary"))
            plot_confusion(rep_lvl, f"Confusion matrix, {LEVEL_TITLES[lvl]} (test)", rep / "figures" / f"confusion_{lvl}.png", note)
        roc = pd.DataFrame(full["binary"]["binary"]["curves"]["roc"])
        pr = pd.DataFrame(full["binary"]["binary"]["curves"]["pr"])
        roc.to_csv(rep / "plots" / "roc.csv", index=False)
        pr.to_csv(rep / "plots" / "pr.csv", index=False)
        cal_rows = []
        cals = {}
        for lvl, rep_lvl in full.items():
            cal = rep_lvl["binary"]["calibration"] if lvl == "binary" else rep_lvl["calibration"]
            title = "p(malignant), binary" if lvl == "binary" else f"top-label confidence, {lvl}"
            cals[title] = cal
            for bn in cal["bins"]:
                if bn["count"]:
                    cal_rows.append({"level": lvl, "mean_probability": round(bn["mean_probability"], 6),
                                     "observed_frequency": round(bn["observed_frequency"], 6), "count": bn["count"]})
        pd.DataFrame(cal_rows).to_csv(rep / "plots" / "calibration.csv", index=False)
        plot_roc_pr(curves, op_test, rep / "figures" / "roc_pr.png")
        plot_reliability(cals, rep / "figures" / "reliability.png")
        if attribution:
            plot_attribution(attribution, rep / "figures" / "metadata_attribution.png")
        timings["plots"] = time.perf_counter() - t0 - sum(timings.values())
        gradcam = gradcam_grids(predictor, table_test, f, tax, images_dir, p.gradcam_per_class, p.seed, rep / "gradcam")
        timings["gradcam"] = time.perf_counter() - t0 - sum(timings.values())

        ctx = {
            "config": cfg, "full": full, "model_dir": str(model_dir), "model_md5": model_md5,
            "operating_point": operating_point, "lineage": lin, "sizes": _sizes({k: frames[k] for k in ("train", "val", "test")}, tax),
            "test_distribution": f["dx"].value_counts().to_dict(), "confidence": p.confidence, "n_boot": p.bootstrap,
            "verdict": verdict, "verdict_md": verdict_md, "baselines": baselines_shown, "eda_note": eda_note,
            "champion": champion, "flat": flat, "subgroups": subgroups, "subgroup_margin": p.subgroup_margin,
            "subgroup_min_positives": p.subgroup_min_positives, "gradcam": gradcam, "attribution": attribution,
        }
        card = model_card(ctx)
        fsutil.atomic_write_text(rep / "model_card.md", card)
        fsutil.atomic_write_text(rep / "model_card.html", render_html(card, "lesionflow model card"))
    timings["total"] = time.perf_counter() - t0
    summary["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    return summary


def main(argv: list[str] | None = None) -> int:
    project.enter()  # paths are relative to the project root, from any subfolder
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=params.DEFAULT_PARAMS)
    ap.add_argument("--splits", type=Path, default=SPLITS_DIR)
    ap.add_argument("--images", type=Path, default=IMAGES_DIR)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    ap.add_argument("--report-dir", type=Path, default=REPORT_DIR)
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--no-cache", action="store_true", help=f"always predict (no reuse from {PREDICTION_CACHE})")
    ap.add_argument("--cache-dir", type=Path, default=PREDICTION_CACHE)
    ap.add_argument("--predict-only", action="store_true",
                    help="only predict val and test into the cache (e.g. on a GPU machine), then stop")
    args = ap.parse_args(argv)
    try:
        p = params.load_section("evaluate", args.params)
        if args.predict_only:
            from pipeline import inference

            try:
                predictor = inference.load_model(p.model_dir, device=args.device)
            except inference.ModelLoadError as exc:
                raise EvaluateError(str(exc)) from None
            for s in ("val", "test"):
                cached_predictions(Path(p.model_dir), lambda: predictor, _read_split(args.splits, s), args.images,
                                   p.batch_size, f"predict {s}", args.cache_dir)
            print(f"evaluate: predictions of {p.model_dir} on val and test cached in {args.cache_dir}")
            return 0
        tax = params.load_taxonomy(args.params)
        lin_params = {"evaluate": params.to_dict(p), "labels": tax.to_dict()}
        summary = run(p, tax, splits_dir=args.splits, images_dir=args.images, out_dir=args.out,
                      report_dir=args.report_dir, params_for_lineage=lin_params, device=args.device,
                      cache_dir=None if args.no_cache else args.cache_dir)
    except (params.ParamsError, EvaluateError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    m = summary["metrics"]
    parts = []
    for lvl in LEVELS:
        if lvl in m:
            parts.append(f"{lvl}: acc {m[lvl].get('accuracy', float('nan')):.3f}, "
                         f"bal.acc {m[lvl].get('balanced_accuracy', float('nan')):.3f}, "
                         f"macro AUC {m[lvl].get('roc_auc_macro') or float('nan'):.3f}")
    op = summary["operating_point"]
    print("evaluate: " + "; ".join(parts))
    print(f"evaluate: binary ROC-AUC {m['binary']['roc_auc']:.3f}; operating point p >= {op['threshold']:.4f}: "
          f"test sensitivity {op['test_sensitivity']:.3f}, specificity {op['test_specificity']:.3f}")
    g = summary["gates"]
    print(f"evaluate: gates {'PASSED' if g['passed'] else 'FAILED: ' + ', '.join(g['failed'])} "
          f"(verdict in {args.report_dir / 'gates.json'})")
    print("evaluate: seconds " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
