"""The evaluation's figures: confusion matrices, ROC and PR curves with the operating point,
reliability diagrams, metadata attribution and Grad-CAM grids (correct and wrong predictions per
diagnosis). Each writes one PNG."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import images
from pipeline.core.metadata import FIELDS
from pipeline.core.predictions import pred_column, prob_column
from pipeline.core.reporting import pyplot, save_figure
from pipeline.core.taxonomy import DIAGNOSIS_NAMES, Taxonomy


def plot_confusion(rep: Mapping[str, Any], title: str, path: Path, note: str = "") -> None:
    """Counts and row-normalised confusion matrices side by side."""
    plt = pyplot()
    labels = rep["confusion"]["labels"]
    counts = np.array(rep["confusion"]["counts"])
    norm = np.array(rep["confusion"]["normalized"])
    k = len(labels)
    size = max(4.2, 3.2 + 0.55 * k)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size + 0.6), layout="constrained")
    for ax, mat, sub, fmt in (
        (axes[0], counts, "counts", "d"),
        (axes[1], norm, "row-normalised (recall on the diagonal)", ".2f"),
    ):
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                v = mat[i, j]
                ax.text(
                    j,
                    i,
                    format(int(v) if fmt == "d" else v, fmt),
                    ha="center",
                    va="center",
                    color="white" if norm[i, j] > 0.55 else "black",
                    fontsize=9,
                )
        ax.set_xticks(range(k), labels, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(sub, fontsize=10)
    fig.colorbar(im, ax=axes, fraction=0.025)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)
    save_figure(fig, path)


def plot_roc_pr(curves: Mapping[str, Mapping[str, Any]], op: Mapping[str, Any], path: Path) -> None:
    """ROC and PR of the binary score for the CNN (and baselines), operating point marked."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name, c in curves.items():
        lw = 2.0 if name == "CNN" else 1.2
        a.plot(c["roc"]["fpr"], c["roc"]["tpr"], lw=lw, label=f"{name} (AUC {c['roc_auc']:.3f})")
        b.plot(c["pr"]["recall"], c["pr"]["precision"], lw=lw, label=f"{name} (AP {c['pr_auc']:.3f})")
    a.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    if op.get("sensitivity") is not None:
        a.scatter(
            [1 - op["specificity"]],
            [op["sensitivity"]],
            c="red",
            zorder=5,
            label=f"operating point t={op['threshold']:.3f}\n"
            f"sens {op['sensitivity']:.3f}, spec {op['specificity']:.3f}",
        )
        if op.get("ppv") is not None:
            b.scatter([op["sensitivity"]], [op["ppv"]], c="red", zorder=5, label="operating point")
    a.axhspan(0.8, 1.0, color="orange", alpha=0.08, label="pAUC region (sens >= 0.8)")
    a.set(
        xlabel="1 - specificity (false positive rate)",
        ylabel="sensitivity",
        title="ROC, malignant vs benign (test)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    b.set(
        xlabel="recall (sensitivity)",
        ylabel="precision (PPV)",
        title="Precision-recall (test)",
        xlim=(-0.01, 1.01),
        ylim=(-0.01, 1.01),
    )
    a.legend(fontsize=8, loc="lower right")
    b.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_figure(fig, path)


def plot_reliability(cals: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """One reliability diagram per calibration (observed frequency per predicted-probability bin)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cals), figsize=(4.6 * len(cals), 4.6), squeeze=False)
    for ax, (title, cal) in zip(axes[0], cals.items()):
        bins = [bn for bn in cal["bins"] if bn["count"] > 0]
        centers = [(bn["lower"] + bn["upper"]) / 2 for bn in bins]
        width = 1.0 / cal["n_bins"]
        ax.bar(
            centers,
            [bn["observed_frequency"] for bn in bins],
            width=width * 0.9,
            alpha=0.75,
            edgecolor="k",
            label="observed",
        )
        ax.plot([0, 1], [0, 1], ls="--", c="grey", label="perfect calibration")
        ax.plot(
            [bn["mean_probability"] for bn in bins],
            [bn["observed_frequency"] for bn in bins],
            "o-",
            c="C3",
            ms=4,
            label="mean predicted vs observed",
        )
        for c, bn in zip(centers, bins):
            ax.text(c, 0.02, str(bn["count"]), ha="center", fontsize=7, rotation=90)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            title=f"{title}\nECE {cal['ece']:.3f}",
            xlabel="predicted probability",
            ylabel="observed frequency",
        )
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def plot_ood_scores(ood: Mapping[str, Any], path: Path) -> None:
    """Histograms of the OOD score: the test split against each group of non-dermoscopic images,
    with the model's threshold (images right of it get no risk estimate)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    scores = {k: np.asarray(v, dtype=float) for k, v in ood["scores"].items() if len(v)}
    hi = max(float(np.percentile(np.concatenate(list(scores.values())), 99.5)), ood["threshold"] * 1.2)
    bins = np.linspace(min(float(v.min()) for v in scores.values()), hi, 60)
    for name, v in scores.items():
        label = f"{name} ({len(v)})" if name != "test" else f"HAM10000 test split ({len(v)})"
        ax.hist(np.clip(v, None, hi), bins=bins, alpha=0.55, density=True, label=label)
    ax.axvline(ood["threshold"], c="k", ls="--", label=f"threshold {ood['threshold']:.2f}")
    ax.set(
        xlabel=f"OOD score ({ood['method']}; higher = more unusual)",
        ylabel="density",
        title=f"Out-of-distribution score: AUROC {ood['auroc']:.3f}, test flagged "
        f"{ood['test_flagged_share']:.1%}, OOD caught {ood['caught_share']:.1%}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_attribution(by_field: Mapping[str, float], path: Path) -> None:
    """Mean |integrated gradients| per metadata field."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    names = list(by_field)
    ax.barh(names, [by_field[n] for n in names], color="C2")
    ax.xaxis.set_major_locator(plt.MaxNLocator(4))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.set_xlabel("mean |integrated gradients| on p(predicted class)")
    ax.set_title("Metadata attribution (test sample)")
    fig.tight_layout()
    save_figure(fig, path)


def _gradcam_picks(
    table: pd.DataFrame, classes: tuple[str, ...], per_class: int, seed: int
) -> list[tuple[str, dict[str, list[int]]]]:
    """Per diagnosis, up to ``per_class`` random rows of correct and of wrong predictions."""
    rng = np.random.default_rng(seed)
    jobs = []
    for c in classes:
        rows = {}
        for kind, mask in (
            ("correct", (table["dx"] == c) & (table[pred_column("dx")] == c)),
            ("wrong", (table["dx"] == c) & (table[pred_column("dx")] != c)),
        ):
            idx = np.flatnonzero(mask.to_numpy())
            rows[kind] = (
                sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()) if len(idx) else []
            )
        jobs.append((c, rows))
    return jobs


def _gradcam_tile(
    ax: Any,
    predictor: Any,
    table: pd.DataFrame,
    frame: pd.DataFrame,
    i: int,
    kind: str,
    classes: tuple[str, ...],
    files: dict[str, Path],
    images_dir: Path,
) -> None:
    from pipeline.model import explain

    rec = table.iloc[i]
    rgb = images.decode_rgb(images.image_file(files, rec["image_id"], images_dir))
    pred = rec[pred_column("dx")]
    meta_cols = [c for c in FIELDS if c in frame.columns]
    meta = frame.iloc[[i]][meta_cols].reset_index(drop=True) if meta_cols else None
    heat = explain.gradcam(predictor, rgb, target_class=classes.index(pred), metadata=meta)
    ax.imshow(explain.overlay(rgb, heat))
    ax.set_title(
        f"{rec['image_id']}\ntrue {rec['dx']} -> pred {pred} ({rec.get(prob_column('dx', pred), float('nan')):.2f})",
        fontsize=8,
        color="green" if kind == "correct" else "red",
    )


def _row_label(ax: Any, text: str) -> None:
    """A row's title, written sideways left of its first panel."""
    ax.text(-0.08, 0.5, text, transform=ax.transAxes, rotation=90, va="center", ha="right", fontsize=11, weight="bold")


def gradcam_grids(
    predictor: Any,
    table: pd.DataFrame,
    frame: pd.DataFrame,
    tax: Taxonomy,
    images_dir: Path,
    per_class: int,
    seed: int,
    out_dir: Path,
) -> dict[str, str]:
    """For each diagnosis: a grid of up to ``per_class`` correct and ``per_class`` wrong test
    predictions, Grad-CAM of the predicted class over the image; returns diagnosis -> file name."""
    from tqdm.auto import tqdm

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    if pred_column("dx") not in table or per_class == 0:
        return {}
    classes, files = tax.classes("dx"), images.index_images(images_dir)
    jobs = _gradcam_picks(table, classes, per_class, seed)
    written: dict[str, str] = {}
    total = sum(len(r["correct"]) + len(r["wrong"]) for _, r in jobs)
    with tqdm(total=total, desc="Grad-CAM", unit="img", leave=False) as bar:
        for c, rows in jobs:
            fig, axes = plt.subplots(2, per_class, figsize=(2.6 * per_class, 5.6), squeeze=False)
            for r, kind in enumerate(("correct", "wrong")):
                for j in range(per_class):
                    axes[r, j].axis("off")
                    if j < len(rows[kind]):
                        _gradcam_tile(
                            axes[r, j], predictor, table, frame, rows[kind][j], kind, classes, files, images_dir
                        )
                        bar.update(1)
                    elif j == 0:
                        axes[r, j].text(0.5, 0.5, f"no {kind} predictions", ha="center", va="center", fontsize=9)
                _row_label(axes[r, 0], kind)
            fig.suptitle(f"Grad-CAM of the predicted class, true class {c} ({DIAGNOSIS_NAMES.get(c, c)})", fontsize=11)
            fig.tight_layout()
            save_figure(fig, out_dir / f"{c}.png", dpi=100)
            written[c] = f"{c}.png"
    return written
