"""Stage ``eda``: image statistics of the lesions, which of them separate the classes, and a
feature-only baseline the CNN must beat.

``python -m pipeline.eda`` reads the split files (``artifacts/splits/{train,val,test}.csv``: the
metadata plus ``split``), computes :func:`pipeline.imagestats.image_features` for every image in
parallel over the cores (a process pool over chunks of files, with a progress bar), joins the
features with the metadata and the split, and writes:

``artifacts/eda/`` (machine-readable, replaced as a whole only when complete)
    ``features.parquet``       one row per image: metadata, split, risk class, every feature
    ``auc_ranking.csv``        per feature: one-vs-rest AUC of each diagnosis, malignant-vs-benign
                               AUC and the ranking score (mean |AUC - 0.5| over the diagnoses)
    ``permutation_importance.csv``  of the baseline on the validation split
    ``baseline_model.json``    the fitted baseline as plain numbers (no pickle; see
                               :mod:`pipeline.linearmodel` for the format)
    ``lineage.json``           git commit, data md5, params, input file md5s, libraries
``reports/eda/`` (for people)
    ``summary.json``           DVC metrics: class distribution overall and per split, segmentation
                               failure rate, per-class mean/median/quantiles of each statistic,
                               top features, baseline scores
    ``report.md``              the report tying the plots together
    ``plots/*.png``            class distribution, per-class box plots of every statistic, sample
                               grid with segmentation contours, colour-presence heat map, AUC
                               heat map, permutation importances, baseline confusion matrix

The per-image work is in :mod:`pipeline.imagestats` (shared with drift monitoring, the service
and ``flows/features.py``); this module only orchestrates, aggregates and reports.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipeline import imagestats, linearmodel, params as params_mod
from pipeline.core import project
from pipeline.fsutil import atomic_write_text, staged_dir, write_json
from pipeline.images import ImageError
from pipeline.lineage import lineage
from pipeline.taxonomy import DIAGNOSIS_NAMES, Taxonomy

IMAGES_DIR = Path("data/images")
METADATA_CSV = Path("data/HAM10000_metadata.csv")
SPLITS_DIR = Path("artifacts/splits")
ARTIFACTS_DIR = Path("artifacts/eda")
REPORTS_DIR = Path("reports/eda")
SPLITS = ("train", "val", "test")
#: Acquisition properties left out of the baseline (they describe the camera, not the lesion).
NOT_IN_BASELINE = ("width", "height", "aspect_ratio")


class EdaError(ValueError):
    """Bad input to the stage (missing split file, unreadable image, ...): the message names it."""


# ----------------------------------------------------------------------------------------------
# computing the features


def _chunk_features(paths: Sequence[str], config: imagestats.FeatureConfig) -> tuple[list[dict], list[str]]:
    """Features of a chunk of files; unreadable files are returned as messages, not raised."""
    rows, errors = [], []
    for p in paths:
        try:
            rows.append(imagestats.features_for_file(p, config))
        except ImageError as exc:
            errors.append(str(exc))
    return rows, errors


def _init_worker() -> None:
    """One BLAS/OpenMP thread per worker process: the pool already uses every core."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def compute_features(
    paths: Sequence[Path | str],
    config: imagestats.FeatureConfig = imagestats.DEFAULT_CONFIG,
    workers: int = 0,
    chunk_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """:func:`imagestats.features_for_file` of every path, in the order given.

    ``workers`` processes (0 = all cores; 1 = in this process) over chunks of ``chunk_size``
    files, with a tqdm progress bar. Raises :class:`EdaError` listing every unreadable file.
    """
    from tqdm import tqdm

    paths = [str(p) for p in paths]
    chunks = [paths[i : i + chunk_size] for i in range(0, len(paths), chunk_size)]
    n_workers = min(resolve_workers(workers), max(1, len(chunks)))
    results: dict[int, tuple[list[dict], list[str]]] = {}
    bar = tqdm(total=len(paths), desc="eda: image statistics", unit="img", disable=not progress)
    if n_workers == 1:
        for i, chunk in enumerate(chunks):
            results[i] = _chunk_features(chunk, config)
            bar.update(len(chunk))
    else:
        with ProcessPoolExecutor(max_workers=n_workers, initializer=_init_worker) as pool:
            futures = {pool.submit(_chunk_features, chunk, config): i for i, chunk in enumerate(chunks)}
            for fut in as_completed(futures):
                i = futures[fut]
                results[i] = fut.result()
                bar.update(len(chunks[i]))
    bar.close()
    rows = [row for i in range(len(chunks)) for row in results[i][0]]
    errors = [err for i in range(len(chunks)) for err in results[i][1]]
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise EdaError(f"{len(errors)} image(s) could not be read:\n  {shown}{more}")
    return rows


# ----------------------------------------------------------------------------------------------
# inputs


def load_split_table(splits_dir: Path, metadata_csv: Path | None = None) -> pd.DataFrame:
    """The rows of the split files (metadata + ``split``), sorted by image_id.

    Fails with a message naming the file when a split file is missing or lacks a column, or
    (when ``metadata_csv`` is given) names an image that the metadata does not list.
    """
    frames = []
    for name in SPLITS:
        path = Path(splits_dir) / f"{name}.csv"
        if not path.exists():
            raise EdaError(f"{path}: split file not found (run the `split` stage first: dvc repro split)")
        df = pd.read_csv(path)
        for col in ("image_id", "dx", "split"):
            if col not in df.columns:
                raise EdaError(f"{path}: column {col!r} missing (columns: {', '.join(df.columns)})")
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    dup = table["image_id"][table["image_id"].duplicated()]
    if len(dup):
        raise EdaError(f"{splits_dir}: image {dup.iloc[0]} appears in more than one split file")
    if metadata_csv is not None:
        meta_ids = set(pd.read_csv(metadata_csv, usecols=["image_id"])["image_id"])
        unknown = sorted(set(table["image_id"]) - meta_ids)
        if unknown:
            raise EdaError(f"{metadata_csv}: does not list image {unknown[0]} found in the split files")
    return table.sort_values("image_id").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# analysis


def numeric_features(config: imagestats.FeatureConfig) -> list[str]:
    return [c for c in imagestats.feature_names(config) if c not in ("seg_status", "dominant_colour", "seg_ok")]


def feature_group(name: str) -> str:
    if name in imagestats.IMAGE_FEATURES:
        return "image"
    if name in imagestats.LESION_SHAPE_FEATURES:
        return "lesion_shape"
    if name in imagestats.LESION_COLOUR_FEATURES:
        return "lesion_colour"
    if name.startswith("colour_") or name == "n_colours":
        return "abcd_colours"
    if name.startswith("palette"):
        return "palette"
    return "other"


def auc_by_rank(x: np.ndarray, positive: np.ndarray, ranks: np.ndarray | None = None) -> float:
    """ROC AUC of score ``x`` for boolean labels ``positive`` (Mann-Whitney U, ties averaged);
    ``ranks``: ``scipy.stats.rankdata(x)`` when already computed."""
    from scipy.stats import rankdata

    n1 = int(positive.sum())
    n0 = len(x) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    if ranks is None:
        ranks = rankdata(x)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auc_ranking(table: pd.DataFrame, features: Sequence[str], taxonomy: Taxonomy) -> pd.DataFrame:
    """One-vs-rest AUC of every feature for every diagnosis (rows where the feature is defined),
    plus malignant-vs-benign; ranked by ``separation`` = mean over diagnoses of |AUC - 0.5|."""
    from scipy.stats import rankdata

    binary = np.array(taxonomy.labels(table["dx"], "binary")) == taxonomy.binary_positive
    rows = []
    for feat in features:
        x = table[feat].to_numpy(dtype=np.float64)
        ok = np.isfinite(x)
        if ok.sum() < 2 or np.nanstd(x) == 0:
            continue
        row: dict[str, Any] = {"feature": feat, "group": feature_group(feat), "n": int(ok.sum())}
        dx = table["dx"].to_numpy()[ok]
        ranks = rankdata(x[ok])
        for d in taxonomy.diagnoses:
            row[f"auc_{d}"] = auc_by_rank(x[ok], dx == d, ranks)
        row["auc_malignant"] = auc_by_rank(x[ok], binary[ok], ranks)
        devs = [abs(row[f"auc_{d}"] - 0.5) for d in taxonomy.diagnoses if not math.isnan(row[f"auc_{d}"])]
        row["separation"] = float(np.mean(devs)) if devs else float("nan")
        best = max(taxonomy.diagnoses, key=lambda d: abs(row[f"auc_{d}"] - 0.5) if not math.isnan(row[f"auc_{d}"]) else -1)
        row["best_class"] = best
        row["best_auc"] = row[f"auc_{best}"]
        rows.append(row)
    out = pd.DataFrame(rows).sort_values("separation", ascending=False).reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


@dataclass
class Baseline:
    """The fitted feature-only baseline and its validation scores."""

    model: Any  # sklearn Pipeline(imputer, scaler, logistic regression)
    features: list[str]
    classes: list[str]
    level: str
    metrics: dict[str, Any]
    importances: pd.DataFrame
    confusion: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return linearmodel.to_json(self.model, self.features, self.classes, level=self.level, val_metrics=self.metrics)


def fit_baseline(table: pd.DataFrame, features: list[str], taxonomy: Taxonomy, p: params_mod.EdaParams) -> Baseline:
    """Logistic regression (median imputation, standardisation, balanced class weights) on the
    train split, scored on val; permutation importances (balanced accuracy) on val."""
    from sklearn.impute import SimpleImputer
    from sklearn.inspection import permutation_importance
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    level = p.baseline_level
    classes = list(taxonomy.classes(level))
    train = table[table["split"] == "train"]
    val = table[table["split"] == "val"]
    if len(train) == 0 or len(val) == 0:
        raise EdaError("the baseline needs rows in both the train and the val split")
    y_train = taxonomy.encode(train["dx"], level)
    y_val = taxonomy.encode(val["dx"], level)
    model = Pipeline([
        ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
        ("scale", StandardScaler()),
        ("clf", LogisticRegression(C=p.baseline_c, max_iter=p.baseline_max_iter, class_weight="balanced")),
    ])
    x_train = train[features].astype(np.float64)
    x_val = val[features].astype(np.float64)
    model.fit(x_train, y_train)
    proba = np.zeros((len(val), len(classes)))
    proba[:, model.classes_] = model.predict_proba(x_val)
    pred = proba.argmax(axis=1)
    present = np.unique(y_val)
    try:
        if len(classes) == 2:
            auc = float(roc_auc_score(y_val, proba[:, 1]))
        else:
            auc = float(roc_auc_score(y_val, proba[:, present] / proba[:, present].sum(axis=1, keepdims=True),
                                      multi_class="ovr", average="macro", labels=present))
    except ValueError:
        auc = float("nan")
    recall = {
        c: float((pred[y_val == i] == i).mean()) if (y_val == i).any() else float("nan") for i, c in enumerate(classes)
    }
    metrics = {
        "level": level,
        "n_train": int(len(train)),
        "n_val": int(len(val)),
        "n_features": len(features),
        "balanced_accuracy": float(balanced_accuracy_score(y_val, pred)),
        "accuracy": float(accuracy_score(y_val, pred)),
        "macro_auc_ovr": auc,
        "recall": recall,
    }
    perm = permutation_importance(
        model, x_val, y_val, scoring="balanced_accuracy", n_repeats=p.permutation_repeats, random_state=p.seed
    )
    importances = pd.DataFrame({
        "feature": features,
        "group": [feature_group(f) for f in features],
        "importance_mean": perm.importances_mean,
        "importance_std": perm.importances_std,
    }).sort_values("importance_mean", ascending=False).reset_index(drop=True)
    importances.insert(0, "rank", np.arange(1, len(importances) + 1))
    cm = confusion_matrix(y_val, pred, labels=list(range(len(classes))))
    return Baseline(model, features, classes, level, metrics, importances, cm)


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def summarise(
    table: pd.DataFrame,
    features: list[str],
    taxonomy: Taxonomy,
    ranking: pd.DataFrame,
    baseline: Baseline,
    elapsed_s: float,
) -> dict[str, Any]:
    """The DVC metrics: class distribution, segmentation, per-class statistics, top features."""
    seg_fail = ~table["seg_ok"].astype(bool)
    per_class: dict[str, Any] = {}
    for feat in features:
        if feature_group(feat) == "palette":
            continue
        stats = {}
        for d, grp in table.groupby("dx"):
            x = grp[feat].dropna()
            if len(x) == 0:
                continue
            q = x.quantile([0.05, 0.25, 0.5, 0.75, 0.95]).to_numpy()
            stats[d] = {
                "mean": _finite(x.mean()), "median": _finite(q[2]), "q05": _finite(q[0]),
                "q25": _finite(q[1]), "q75": _finite(q[3]), "q95": _finite(q[4]),
            }
        per_class[feat] = stats
    dist = {
        "dx": {d: int(n) for d, n in table["dx"].value_counts().reindex(taxonomy.diagnoses, fill_value=0).items()},
        "risk": {c: int(n) for c, n in table["risk"].value_counts().reindex(taxonomy.classes("risk"), fill_value=0).items()},
        "per_split": {
            s: {d: int(n) for d, n in g["dx"].value_counts().reindex(taxonomy.diagnoses, fill_value=0).items()}
            for s, g in table.groupby("split")
        },
    }
    return {
        "n_images": int(len(table)),
        "elapsed_s": round(elapsed_s, 2),
        "class_distribution": dist,
        "segmentation": {
            "failure_rate": float(seg_fail.mean()),
            "failures": int(seg_fail.sum()),
            "status_counts": {k: int(v) for k, v in table["seg_status"].value_counts().items()},
            "failure_rate_per_class": {d: float(g.mean()) for d, g in seg_fail.groupby(table["dx"])},
        },
        "colour_presence_per_class": {
            d: {c: float(g[f"colour_{c}"].mean()) for c in imagestats.ABCD_COLOURS}
            for d, g in table[table["seg_ok"]].groupby("dx")
        },
        "top_features": [
            {"feature": r.feature, "separation": float(r.separation), "best_class": r.best_class,
             "best_auc": float(r.best_auc), "auc_malignant": float(r.auc_malignant)}
            for r in ranking.head(10).itertuples()
        ],
        "baseline": baseline.metrics,
        "baseline_top_importances": [
            {"feature": r.feature, "importance": float(r.importance_mean)} for r in baseline.importances.head(10).itertuples()
        ],
        "per_class": per_class,
    }


# ----------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_class_distribution(table: pd.DataFrame, taxonomy: Taxonomy, path: Path) -> None:
    plt = _plt()
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
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stats_by_class(table: pd.DataFrame, feats: list[str], taxonomy: Taxonomy, title: str, path: Path) -> None:
    plt = _plt()
    ncols = 4
    nrows = math.ceil(len(feats) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 2.9 * nrows), squeeze=False)
    order = list(taxonomy.diagnoses)
    for ax, feat in zip(axes.flat, feats):
        data = [table.loc[table["dx"] == d, feat].dropna().to_numpy() for d in order]
        ax.boxplot([x if len(x) else [np.nan] for x in data], showfliers=False, widths=0.6,
                   tick_labels=order, patch_artist=True, boxprops={"facecolor": "#c6dbef"},
                   medianprops={"color": "#08306b"})
        ax.set_title(feat, fontsize=10)
        ax.tick_params(axis="both", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(feats):]:
        ax.axis("off")
    height = fig.get_figheight()
    fig.suptitle(f"{title}: per-diagnosis distributions (boxes: quartiles; whiskers: 1.5 IQR; outliers hidden)",
                 y=1 - 0.15 / height, va="top")
    # fixed margins (in inches): tight_layout on a grid this size costs several seconds
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.35 / height, top=1 - 0.8 / height, wspace=0.25, hspace=0.45)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_sample_grid(
    table: pd.DataFrame, images_dir: Path, config: imagestats.FeatureConfig, taxonomy: Taxonomy,
    per_class: int, seed: int, path: Path,
) -> None:
    """``per_class`` random images per diagnosis, with the segmentation contour (green) drawn."""
    from pipeline.images import decode_rgb

    plt = _plt()
    order = list(taxonomy.diagnoses)
    fig, axes = plt.subplots(len(order), per_class, figsize=(2.3 * per_class, 2.0 * len(order)), squeeze=False)
    rng = np.random.default_rng(seed)
    for r, d in enumerate(order):
        rows = table[table["dx"] == d]
        picked = rows.iloc[np.sort(rng.choice(len(rows), size=min(per_class, len(rows)), replace=False))] if len(rows) else rows
        for c in range(per_class):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picked):
                ax.axis("off")
                continue
            row = picked.iloc[c]
            rgb = decode_rgb(images_dir / f"{row['image_id']}.jpg")
            work, mask, status = imagestats.lesion_mask(rgb, config)
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
    fig.savefig(path, dpi=80)
    plt.close(fig)


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
    plt = _plt()
    ok = table[table["seg_ok"]]
    order = [d for d in taxonomy.diagnoses if d in set(ok["dx"])]
    cols = [f"colour_{c}" for c in imagestats.ABCD_COLOURS]
    values = ok.groupby("dx")[cols].mean().reindex(order).to_numpy()
    n_col = ok.groupby("dx")["n_colours"].mean().reindex(order)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    im = _heatmap(ax, values, [f"{d} (mean {n_col[d]:.2f} colours)" for d in order],
                  [c.replace("_", " ") for c in imagestats.ABCD_COLOURS], "viridis", 0, 1, ".2f")
    fig.colorbar(im, ax=ax, label="share of segmented lesions with the colour")
    ax.set_title("ABCD colours present (>= min share of the lesion), per diagnosis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_auc_ranking(ranking: pd.DataFrame, taxonomy: Taxonomy, top: int, path: Path) -> None:
    plt = _plt()
    head = ranking.head(top)
    cols = [f"auc_{d}" for d in taxonomy.diagnoses] + ["auc_malignant"]
    fig, ax = plt.subplots(figsize=(10, 0.36 * len(head) + 1.8))
    im = _heatmap(ax, head[cols].to_numpy(), [f"{r}. {f}" for r, f in zip(head["rank"], head["feature"])],
                  list(taxonomy.diagnoses) + ["malig."], "RdBu_r", 0.2, 0.8, ".2f")
    fig.colorbar(im, ax=ax, label="one-vs-rest AUC (0.5 = no separation)")
    ax.set_title(f"Top {len(head)} features by mean |AUC - 0.5| over the diagnoses")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importances(baseline: Baseline, top: int, path: Path) -> None:
    plt = _plt()
    head = baseline.importances.head(top).iloc[::-1]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(head) + 1.6))
    ax.barh(head["feature"], head["importance_mean"], xerr=head["importance_std"], color="#4C72B0")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("drop in validation balanced accuracy when the feature is shuffled")
    m = baseline.metrics
    ax.set_title(f"Baseline ({baseline.level}) permutation importances\n"
                 f"val balanced acc {m['balanced_accuracy']:.3f}, macro AUC {m['macro_auc_ovr']:.3f}", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(baseline: Baseline, path: Path) -> None:
    plt = _plt()
    cm = baseline.confusion.astype(float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = _heatmap(ax, norm, baseline.classes, baseline.classes, "Blues", 0, 1, ".2f")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, label="share of the true class")
    ax.set_title(f"Feature-only baseline on val (rows normalised, n={int(cm.sum())})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# report


def _md_table(df: pd.DataFrame, floatfmt: str = ".3f") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        cells = [format(v, floatfmt) if isinstance(v, (float, np.floating)) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_report(
    table: pd.DataFrame, summary: dict[str, Any], ranking: pd.DataFrame, baseline: Baseline,
    taxonomy: Taxonomy, plots: dict[str, str], p: params_mod.EdaParams, lin: dict[str, Any],
) -> str:
    seg = summary["segmentation"]
    dist = pd.DataFrame(summary["class_distribution"]["per_split"]).reindex(list(taxonomy.diagnoses)).fillna(0).astype(int)
    dist["total"] = dist.sum(axis=1)
    dist.insert(0, "diagnosis", [DIAGNOSIS_NAMES.get(d, d) for d in dist.index])
    dist.index.name = "dx"
    key = ["brightness", "contrast_rms", "lesion_area_fraction", "border_compactness", "asymmetry",
           "lesion_lab_l_mean", "lesion_skin_delta_e", "n_colours"]
    med = table.groupby("dx")[key].median().reindex(list(taxonomy.diagnoses))
    top = ranking.head(p.top_features)[["rank", "feature", "group", "separation", "best_class", "best_auc", "auc_malignant"]]
    imp = baseline.importances.head(10)[["rank", "feature", "group", "importance_mean", "importance_std"]]
    m = baseline.metrics
    fail_tab = pd.DataFrame({
        "failure rate": pd.Series(seg["failure_rate_per_class"]).reindex(list(taxonomy.diagnoses)),
    })
    status = ", ".join(f"{k}: {v}" for k, v in sorted(seg["status_counts"].items()))
    sizes = table.groupby(["width", "height"]).size().sort_values(ascending=False)
    if len(sizes) == 1:
        (w, h), _ = next(iter(sizes.items()))
        sizes_note = (f"All images are {w}x{h}, so size and aspect ratio carry no information here; they are "
                      "kept because drift monitoring compares new images against this table.")
    else:
        sizes_note = f"{len(sizes)} different sizes; the most common: " + ", ".join(
            f"{w}x{h} ({n})" for (w, h), n in list(sizes.items())[:3]) + "."
    findings = "; ".join(
        f"`{r.feature}` (strongest for {r.best_class}: AUC {r.best_auc:.2f})" for r in ranking.head(5).itertuples()
    )
    lines = [
        "# EDA: image statistics of the HAM10000 lesions",
        "",
        f"{len(table)} images; generated by `python -m pipeline.eda` at git {lin['git']['commit'][:10]}"
        f"{' (dirty)' if lin['git'].get('dirty') else ''}, data md5 {lin['data'].get('md5')}. "
        "Machine-readable outputs: `artifacts/eda/` (feature table `features.parquet`, AUC ranking, "
        "permutation importances, baseline model as JSON); metrics: `reports/eda/summary.json`.",
        "",
        "## 1. Class distribution",
        "",
        f"![class distribution]({plots['class_distribution']})",
        "",
        "The data is dominated by melanocytic nevi (nv); dermatofibroma (df) and vascular lesions (vasc) "
        "have around a hundred images each, so per-class statistics of the small classes are noisy and "
        "accuracy is a misleading score (balanced accuracy and per-class AUC are used below).",
        "",
        _md_table(dist.reset_index()),
        "",
        "## 2. Image statistics",
        "",
        "Every image is described by its size and aspect ratio, brightness (mean Rec. 601 luma in [0, 1]), "
        "contrast (RMS = std of luma; robust = 5-95 percentile range), and the mean/std of each channel in "
        "RGB, CIELAB and HSV (saturation, value). " + sizes_note,
        "",
        f"![image statistics]({plots['stats_image']})",
        "",
        "## 3. Lesion segmentation, shape and colour",
        "",
        "The lesion is segmented classically: L* channel, grey closing against hair, Gaussian smoothing, "
        "dark vignette corners removed, Otsu threshold, largest centre-weighted component, holes filled "
        "(details in `pipeline/imagestats.py`). The green contours below show it on random images of each "
        "class.",
        "",
        f"![sample grid]({plots['sample_grid']})",
        "",
        f"**Segmentation failure rate: {100 * seg['failure_rate']:.2f}%** ({seg['failures']} images; {status}). "
        "A failed image keeps its image-level statistics, gets `seg_ok = false` and a `seg_status` reason, and "
        "NaN lesion features. `too_large` means the lesion fills (almost) the whole frame, `low_contrast` that "
        "the dark region is barely darker than the skin.",
        "",
        _md_table(fail_tab.reset_index(names="dx"), ".3f"),
        "",
        f"![lesion shape]({plots['stats_lesion_shape']})",
        "",
        f"![lesion colour]({plots['stats_lesion_colour']})",
        "",
        "Median of key statistics per diagnosis:",
        "",
        _md_table(med.reset_index(), ".3f"),
        "",
        "### ABCD colours",
        "",
        "Each lesion pixel is assigned, after a shades-of-grey white balance, to one of the six dermoscopic "
        "colours of the ABCD rule (white, red, light brown, dark brown, blue-grey, black) by fixed CIELAB "
        "thresholds (`imagestats.ColourRules`); a colour counts as present when it covers at least "
        f"{100 * p.colour_min_share:.0f}% of the lesion. More colours, and dark brown / black / blue-grey, "
        "are the classic warning signs of melanoma.",
        "",
        f"![colour presence]({plots['colour_presence']})",
        "",
        f"![colour shares]({plots['stats_abcd_colours']})",
        "",
        "## 4. Which features separate the classes",
        "",
        "For each feature and diagnosis, the one-vs-rest ROC AUC of the raw feature value (1 or 0 = perfect "
        "separation, 0.5 = none; images with the feature undefined left out). Features are ranked by the "
        "mean |AUC - 0.5| over the seven diagnoses; `auc_malignant` is melanoma+bcc+akiec vs the rest.",
        "",
        f"The five most separating features: {findings}. Features of the lesion itself (its colour, its "
        "darkness relative to the skin, its border) describe the lesion; image-level statistics also "
        "reflect acquisition (camera, lighting, which clinic a class came from) and may separate classes "
        "for the wrong reasons.",
        "",
        f"![AUC ranking]({plots['auc_ranking']})",
        "",
        _md_table(top),
        "",
        "### Feature-only baseline",
        "",
        f"A logistic regression (median imputation, standardisation, balanced class weights, C={p.baseline_c}) "
        f"on {m['n_features']} features of the feature table, trained on the train split ({m['n_train']} images) "
        f"and scored on val ({m['n_val']} images), predicting the `{m['level']}` level: "
        f"**balanced accuracy {m['balanced_accuracy']:.3f}**, macro one-vs-rest AUC {m['macro_auc_ovr']:.3f}, "
        f"accuracy {m['accuracy']:.3f}. This is the bar the CNN must clear. The model is saved without "
        "pickle as `artifacts/eda/baseline_model.json` (format: `pipeline/linearmodel.py`).",
        "",
        f"![confusion]({plots['confusion']})",
        "",
        "Permutation importances on val (drop in balanced accuracy when one feature is shuffled; correlated "
        "features share their importance, so a low value does not mean the information is useless):",
        "",
        f"![importances]({plots['importances']})",
        "",
        _md_table(imp, ".4f"),
        "",
        "## Parameters",
        "",
        "```json",
        json.dumps(params_mod.to_dict(p), indent=1, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# the stage


def run(
    p: params_mod.EdaParams,
    taxonomy: Taxonomy,
    images_dir: Path = IMAGES_DIR,
    metadata_csv: Path = METADATA_CSV,
    splits_dir: Path = SPLITS_DIR,
    artifacts_dir: Path = ARTIFACTS_DIR,
    reports_dir: Path = REPORTS_DIR,
    progress: bool = True,
    params_dict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compute, analyse and write every output of the stage; returns the summary."""
    config = p.feature_config()
    images_dir = Path(images_dir)
    table = load_split_table(Path(splits_dir), Path(metadata_csv))
    unknown = sorted(set(table["dx"]) - set(taxonomy.diagnoses))
    if unknown:
        raise EdaError(f"{splits_dir}: unknown diagnosis {unknown[0]!r} (known: {', '.join(taxonomy.diagnoses)})")
    paths = [images_dir / f"{i}.jpg" for i in table["image_id"]]
    t0 = time.perf_counter()
    rows = compute_features(paths, config, workers=p.workers, chunk_size=p.chunk_size, progress=progress)
    elapsed = time.perf_counter() - t0
    feats = pd.DataFrame(rows)
    table = table.merge(feats, on="image_id", how="left", validate="one_to_one")
    table = table.drop(columns=[c for c in ("risk",) if c in table.columns])
    table.insert(table.columns.get_loc("dx") + 1, "risk", taxonomy.labels(table["dx"], "risk"))
    table["seg_ok"] = table["seg_ok"].astype(bool)

    numeric = numeric_features(config)
    ranking = auc_ranking(table, numeric, taxonomy)
    base_feats = [f for f in numeric if f not in NOT_IN_BASELINE] + ["seg_ok"]
    table_for_model = table.assign(seg_ok=table["seg_ok"].astype(float))
    baseline = fit_baseline(table_for_model, base_feats, taxonomy, p)
    summary = summarise(table, numeric, taxonomy, ranking, baseline, elapsed)
    lin = lineage(
        params={"eda": params_mod.to_dict(p), **({"labels": params_dict} if params_dict else {})},
        files=[f for f in (Path(splits_dir) / f"{s}.csv" for s in SPLITS)] + [Path(metadata_csv)],
    )
    summary["images_per_s"] = round(len(table) / max(elapsed, 1e-9), 1)

    reports_dir = Path(reports_dir)
    with staged_dir(artifacts_dir) as out:
        table.to_parquet(out / "features.parquet", index=False)
        ranking.to_csv(out / "auc_ranking.csv", index=False)
        baseline.importances.to_csv(out / "permutation_importance.csv", index=False)
        write_json(out / "baseline_model.json", {**baseline.to_json(), "lineage": lin})
        write_json(out / "lineage.json", lin)
    plots = {
        "class_distribution": "class_distribution.png",
        "stats_image": "stats_by_class_image.png",
        "stats_lesion_shape": "stats_by_class_lesion_shape.png",
        "stats_lesion_colour": "stats_by_class_lesion_colour.png",
        "stats_abcd_colours": "stats_by_class_abcd_colours.png",
        "sample_grid": "sample_grid.png",
        "colour_presence": "colour_presence.png",
        "auc_ranking": "auc_ranking.png",
        "importances": "permutation_importance.png",
        "confusion": "baseline_confusion.png",
    }
    with staged_dir(reports_dir / "plots") as pd_dir:
        plot_class_distribution(table, taxonomy, pd_dir / plots["class_distribution"])
        groups = {
            "stats_image": ("Image statistics", list(imagestats.IMAGE_FEATURES)),
            "stats_lesion_shape": ("Lesion shape", list(imagestats.LESION_SHAPE_FEATURES)),
            "stats_lesion_colour": ("Lesion colour", list(imagestats.LESION_COLOUR_FEATURES)),
            "stats_abcd_colours": ("ABCD colour shares", [f"colour_share_{c}" for c in imagestats.ABCD_COLOURS] + ["n_colours"]),
        }
        for key, (title, fs) in groups.items():
            plot_stats_by_class(table, fs, taxonomy, title, pd_dir / plots[key])
        plot_sample_grid(table, images_dir, config, taxonomy, p.grid_per_class, p.seed, pd_dir / plots["sample_grid"])
        plot_colour_presence(table, taxonomy, pd_dir / plots["colour_presence"])
        plot_auc_ranking(ranking, taxonomy, p.top_features, pd_dir / plots["auc_ranking"])
        plot_importances(baseline, p.top_features, pd_dir / plots["importances"])
        plot_confusion(baseline, pd_dir / plots["confusion"])
    report = render_report(table, summary, ranking, baseline, taxonomy,
                           {k: f"plots/{v}" for k, v in plots.items()}, p, lin)
    atomic_write_text(reports_dir / "report.md", report)
    write_json(reports_dir / "summary.json", summary)
    return summary


def main() -> None:
    project.enter()  # paths are relative to the project root, from any subfolder
    p = params_mod.load_section("eda")
    labels = params_mod.load_section("labels")
    try:
        summary = run(p, labels.taxonomy(), params_dict=params_mod.to_dict(labels))
    except (EdaError, ImageError) as exc:
        raise SystemExit(f"eda: {exc}") from None
    seg = summary["segmentation"]
    base = summary["baseline"]
    print(
        f"eda: {summary['n_images']} images in {summary['elapsed_s']:.1f} s "
        f"({summary['images_per_s']:.0f} images/s); segmentation failure rate {100 * seg['failure_rate']:.2f}%; "
        f"baseline val balanced accuracy {base['balanced_accuracy']:.3f}; "
        f"top features: {', '.join(t['feature'] for t in summary['top_features'][:5])}"
    )


if __name__ == "__main__":
    main()
