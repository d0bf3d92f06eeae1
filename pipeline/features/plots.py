"""The EDA report's figures: class distribution, per-class box plots of the statistics, sample
images with their segmentation, colour presence, the AUC ranking, the baseline's importances and
confusion matrix. Each writes one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import images
from pipeline.core.layout import SPLITS
from pipeline.core.params import ABCD_COLOURS, FeatureConfig
from pipeline.core.reporting import pyplot, save_figure
from pipeline.core.taxonomy import Taxonomy
from pipeline.features.baseline import Baseline
from pipeline.features.segmentation import lesion_mask


def plot_class_distribution(table: pd.DataFrame, taxonomy: Taxonomy, path: Path) -> None:
    """Images per diagnosis and per risk class, stacked by split."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [7, 3]})
    colours = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}
    for ax, col, order in ((axes[0], "dx", taxonomy.diagnoses), (axes[1], "risk", taxonomy.classes("risk"))):
        counts = pd.crosstab(table[col], table["split"]).reindex(index=list(order), fill_value=0)
        bottom = np.zeros(len(counts))
        for s in [s for s in SPLITS if s in counts.columns]:
            ax.bar(counts.index, counts[s], bottom=bottom, label=s, color=colours[s])
            bottom += counts[s].to_numpy()
        for i, total in enumerate(bottom):
            ax.text(i, total, f"{int(total)}\n({100 * total / len(table):.1f}%)", ha="center", va="bottom", fontsize=9)
        ax.set_ylim(0, bottom.max() * 1.18)
        ax.set_title("7 diagnoses" if col == "dx" else "3 risk classes")
        ax.set_ylabel("images")
        ax.tick_params(axis="x", rotation=20 if col == "risk" else 0)
    axes[0].legend(title="split")
    fig.suptitle(f"Class distribution ({len(table)} images)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_stats_by_class(table: pd.DataFrame, feats: list[str], taxonomy: Taxonomy, title: str, path: Path) -> None:
    """Per-diagnosis box plots of each feature in ``feats``."""
    plt = pyplot()
    ncols = 4
    nrows = math.ceil(len(feats) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False)
    order = list(taxonomy.diagnoses)
    for ax, feat in zip(axes.flat, feats):
        data = [table.loc[table["dx"] == d, feat].dropna().to_numpy() for d in order]
        ax.boxplot(
            [x if len(x) else [np.nan] for x in data],
            showfliers=False,
            widths=0.6,
            tick_labels=order,
            patch_artist=True,
            boxprops={"facecolor": "#c6dbef"},
            medianprops={"color": "#08306b"},
        )
        ax.set_title(feat, fontsize=10)
        ax.tick_params(axis="both", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(feats) :]:
        ax.axis("off")
    height = fig.get_figheight()
    fig.suptitle(
        f"{title}: per-diagnosis distributions (boxes: quartiles; whiskers: 1.5 IQR; outliers hidden)",
        y=1 - 0.15 / height,
        va="top",
    )
    # fixed margins (in inches): tight_layout on a grid this size costs several seconds
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.35 / height, top=1 - 0.8 / height, wspace=0.25, hspace=0.45)
    save_figure(fig, path, dpi=80)


def plot_sample_grid(
    table: pd.DataFrame,
    images_dir: Path,
    config: FeatureConfig,
    taxonomy: Taxonomy,
    per_class: int,
    seed: int,
    path: Path,
) -> None:
    """``per_class`` random images per diagnosis, with the segmentation contour (green) drawn."""
    plt = pyplot()
    files = images.index_images(images_dir)
    order = list(taxonomy.diagnoses)
    fig, axes = plt.subplots(len(order), per_class, figsize=(2.3 * per_class, 2.0 * len(order)), squeeze=False)
    rng = np.random.default_rng(seed)
    for r, d in enumerate(order):
        rows = table[table["dx"] == d]
        picked = (
            rows.iloc[np.sort(rng.choice(len(rows), size=min(per_class, len(rows)), replace=False))]
            if len(rows)
            else rows
        )
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picked):
                ax.axis("off")
                continue
            row = picked.iloc[c]
            image_file = images.image_file(files, row["image_id"], images_dir)
            work, mask, status = lesion_mask(images.decode_rgb(image_file), config)
            ax.imshow(work)
            if status == "ok":
                ax.contour(mask.astype(float), levels=[0.5], colors="#00ff00", linewidths=1.2)
                ax.set_title(f"{row['image_id'][5:]}  n_col={int(row['n_colours'])}", fontsize=7)
            else:
                ax.set_title(f"{row['image_id'][5:]}  FAILED: {status}", fontsize=7, color="red")
            if c == 0:
                ax.set_ylabel(d, fontsize=11)
    fig.suptitle("Sample images per diagnosis with the lesion segmentation (green contour)")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def _heatmap(ax, values: np.ndarray, rows: list[str], cols: list[str], cmap: str, vmin: float, vmax: float, fmt: str):
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if np.isfinite(v):
                r, g, b, _ = im.cmap(im.norm(v))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # white text on dark cells
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=8, color="white" if dark else "black")
    return im


def plot_colour_presence(table: pd.DataFrame, taxonomy: Taxonomy, path: Path) -> None:
    """Share of segmented lesions showing each ABCD colour, per diagnosis."""
    plt = pyplot()
    ok = table[table["seg_ok"]]
    order = [d for d in taxonomy.diagnoses if d in set(ok["dx"])]
    cols = [f"colour_{c}" for c in ABCD_COLOURS]
    values = ok.groupby("dx")[cols].mean().reindex(order).to_numpy()
    n_col = ok.groupby("dx")["n_colours"].mean().reindex(order)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    im = _heatmap(
        ax,
        values,
        [f"{d} (mean {n_col[d]:.2f} colours)" for d in order],
        [c.replace("_", " ") for c in ABCD_COLOURS],
        "viridis",
        0,
        1,
        ".2f",
    )
    fig.colorbar(im, ax=ax, label="share of segmented lesions with the colour")
    ax.set_title("ABCD colours present (>= min share of the lesion), per diagnosis")
    fig.tight_layout()
    save_figure(fig, path)


def plot_auc_ranking(ranking: pd.DataFrame, taxonomy: Taxonomy, top: int, path: Path) -> None:
    """Heat map of the one-vs-rest AUCs of the ``top`` most separating features."""
    plt = pyplot()
    head = ranking.head(top)
    cols = [f"auc_{d}" for d in taxonomy.diagnoses] + ["auc_malignant"]
    fig, ax = plt.subplots(figsize=(10, 0.36 * len(head) + 1.8))
    im = _heatmap(
        ax,
        head[cols].to_numpy(),
        [f"{r}. {f}" for r, f in zip(head["rank"], head["feature"])],
        list(taxonomy.diagnoses) + ["malig."],
        "RdBu_r",
        0.2,
        0.8,
        ".2f",
    )
    fig.colorbar(im, ax=ax, label="one-vs-rest AUC (0.5 = no separation)")
    ax.set_title(f"Top {len(head)} features by mean |AUC - 0.5| over the diagnoses")
    fig.tight_layout()
    save_figure(fig, path)


def plot_importances(baseline: Baseline, top: int, path: Path) -> None:
    """The baseline's permutation importances (top ``top``)."""
    plt = pyplot()
    head = baseline.importances.head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(head) + 1.6))
    ax.barh(head["feature"], head["importance_mean"], xerr=head["importance_std"], color="#4C72B0")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("drop in validation balanced accuracy when the feature is shuffled")
    m = baseline.metrics
    ax.set_title(
        f"Baseline ({baseline.level}) permutation importances\n"
        f"val balanced acc {m['balanced_accuracy']:.3f}, macro AUC {m['macro_auc_ovr']:.3f}",
        fontsize=10,
    )
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_confusion(baseline: Baseline, path: Path) -> None:
    """The baseline's row-normalised confusion matrix on val."""
    plt = pyplot()
    cm = baseline.confusion.astype(float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = _heatmap(ax, norm, baseline.classes, baseline.classes, "Blues", 0, 1, ".2f")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, label="share of the true class")
    ax.set_title(f"Feature-only baseline on val (rows normalised, n={int(cm.sum())})")
    fig.tight_layout()
    save_figure(fig, path)
