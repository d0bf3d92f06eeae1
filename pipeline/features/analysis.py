"""What the EDA statistics say about the classes: which features separate them (one-vs-rest AUC
rankings) and the per-class summary of every statistic."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.params import ABCD_COLOURS, FeatureConfig
from pipeline.core.taxonomy import Taxonomy
from pipeline.features.imagestats import (
    IMAGE_FEATURES,
    LESION_COLOUR_FEATURES,
    LESION_SHAPE_FEATURES,
    feature_names,
)

#: Acquisition properties left out of the baseline (they describe the camera, not the lesion).
NOT_IN_BASELINE = ("width", "height", "aspect_ratio")


def feature_table(splits: pd.DataFrame, rows: list[dict[str, Any]], taxonomy: Taxonomy) -> pd.DataFrame:
    """The split table joined with each image's features, with its ``risk`` class after ``dx``."""
    table = splits.merge(pd.DataFrame(rows), on="image_id", how="left", validate="one_to_one")
    table = table.drop(columns=[c for c in ("risk",) if c in table.columns])
    table.insert(table.columns.get_loc("dx") + 1, "risk", taxonomy.labels(table["dx"], "risk"))
    table["seg_ok"] = table["seg_ok"].astype(bool)
    return table


def numeric_features(config: FeatureConfig) -> list[str]:
    """The numeric statistics (every feature but the segmentation status and colour names)."""
    return [c for c in feature_names(config) if c not in ("seg_status", "dominant_colour", "seg_ok")]


def feature_group(name: str) -> str:
    """The group a feature belongs to (image, lesion shape/colour, ABCD colours, palette)."""
    if name in IMAGE_FEATURES:
        return "image"
    if name in LESION_SHAPE_FEATURES:
        return "lesion_shape"
    if name in LESION_COLOUR_FEATURES:
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
        best = max(
            taxonomy.diagnoses, key=lambda d: abs(row[f"auc_{d}"] - 0.5) if not math.isnan(row[f"auc_{d}"]) else -1
        )
        row["best_class"] = best
        row["best_auc"] = row[f"auc_{best}"]
        rows.append(row)
    out = pd.DataFrame(rows).sort_values("separation", ascending=False).reset_index(drop=True)
    out.insert(0, "rank", np.arange(1, len(out) + 1))
    return out


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def per_class_statistics(table: pd.DataFrame, features: Sequence[str]) -> dict[str, Any]:
    """Per feature and diagnosis: mean, median and the 5/25/75/95 % quantiles (palettes left out)."""
    out: dict[str, Any] = {}
    for feat in features:
        if feature_group(feat) == "palette":
            continue
        stats = {}
        for d, grp in table.groupby("dx"):
            x = grp[feat].dropna()
            if len(x):
                q = x.quantile([0.05, 0.25, 0.5, 0.75, 0.95]).to_numpy()
                stats[d] = {
                    "mean": _finite(x.mean()),
                    "median": _finite(q[2]),
                    "q05": _finite(q[0]),
                    "q25": _finite(q[1]),
                    "q75": _finite(q[3]),
                    "q95": _finite(q[4]),
                }
        out[feat] = stats
    return out


def class_distribution(table: pd.DataFrame, taxonomy: Taxonomy) -> dict[str, Any]:
    """Images per diagnosis, per risk class and per split and diagnosis."""

    def counts(s: pd.Series, order: Sequence[str]) -> dict[str, int]:
        return {k: int(n) for k, n in s.value_counts().reindex(list(order), fill_value=0).items()}

    return {
        "dx": counts(table["dx"], taxonomy.diagnoses),
        "risk": counts(table["risk"], taxonomy.classes("risk")),
        "per_split": {s: counts(g["dx"], taxonomy.diagnoses) for s, g in table.groupby("split")},
    }


def segmentation_summary(table: pd.DataFrame) -> dict[str, Any]:
    """How often the segmentation failed, why, and per diagnosis."""
    fail = ~table["seg_ok"].astype(bool)
    return {
        "failure_rate": float(fail.mean()),
        "failures": int(fail.sum()),
        "status_counts": {k: int(v) for k, v in table["seg_status"].value_counts().items()},
        "failure_rate_per_class": {d: float(g.mean()) for d, g in fail.groupby(table["dx"])},
    }


def statistics(
    table: pd.DataFrame,
    features: list[str],
    taxonomy: Taxonomy,
    ranking: pd.DataFrame,
    baseline_metrics: dict[str, Any],
    importances: pd.DataFrame,
) -> dict[str, Any]:
    """Everything the EDA report summarises (``reports/eda/statistics.json``): class distribution,
    segmentation, ABCD colour presence and per-class statistics, the top features, the baseline."""
    return {
        "n_images": int(len(table)),
        "class_distribution": class_distribution(table, taxonomy),
        "segmentation": segmentation_summary(table),
        "colour_presence_per_class": {
            d: {c: float(g[f"colour_{c}"].mean()) for c in ABCD_COLOURS}
            for d, g in table[table["seg_ok"]].groupby("dx")
        },
        "top_features": [
            {
                "feature": r.feature,
                "separation": float(r.separation),
                "best_class": r.best_class,
                "best_auc": float(r.best_auc),
                "auc_malignant": float(r.auc_malignant),
            }
            for r in ranking.head(10).itertuples()
        ],
        "baseline": baseline_metrics,
        "baseline_top_importances": [
            {"feature": r.feature, "importance": float(r.importance_mean)} for r in importances.head(10).itertuples()
        ],
        "per_class": per_class_statistics(table, features),
    }


def metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The EDA's DVC metrics: the baseline the CNN must beat, and how often segmentation failed
    (everything else is in ``statistics.json``)."""
    base, seg = stats["baseline"], stats["segmentation"]
    return {
        "baseline_val_balanced_accuracy": round(base["balanced_accuracy"], 4),
        "segmentation_failure_rate": round(seg["failure_rate"], 4),
    }


def throughput(n_images: int, elapsed_s: float) -> dict[str, float]:
    """Images, seconds and images/s of the statistics (``statistics.json``)."""
    return {
        "images": n_images,
        "seconds": round(elapsed_s, 1),
        "images_per_s": round(n_images / max(elapsed_s, 1e-9), 1),
    }
