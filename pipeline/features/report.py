"""The EDA report (``reports/eda/report.md``), rendered from a Jinja2 template
(``pipeline/features/templates/eda_report.md.j2``): the prose lives in the template, the numbers
and tables are computed here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.params import EdaParams, to_dict
from pipeline.core.reporting import frame_table, render_template
from pipeline.core.taxonomy import DIAGNOSIS_NAMES, Taxonomy
from pipeline.features.baseline import Baseline

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: Statistics shown as per-diagnosis medians in the report.
KEY_STATISTICS = (
    "brightness",
    "contrast_rms",
    "lesion_area_fraction",
    "border_compactness",
    "asymmetry",
    "lesion_lab_l_mean",
    "lesion_skin_delta_e",
    "n_colours",
)


def _sizes_note(table: pd.DataFrame) -> str:
    sizes = table.groupby(["width", "height"]).size().sort_values(ascending=False)
    if len(sizes) == 1:
        (w, h), _ = next(iter(sizes.items()))
        return (
            f"All images are {w}x{h}, so size and aspect ratio carry no information here; they are kept "
            "because drift monitoring compares new images against this table."
        )
    common = ", ".join(f"{w}x{h} ({n})" for (w, h), n in list(sizes.items())[:3])
    return f"{len(sizes)} different sizes; the most common: {common}."


def _distribution(stats: dict[str, Any], taxonomy: Taxonomy) -> pd.DataFrame:
    order = list(taxonomy.diagnoses)
    dist = pd.DataFrame(stats["class_distribution"]["per_split"]).reindex(order).fillna(0).astype(int)
    dist["total"] = dist.sum(axis=1)
    dist.insert(0, "diagnosis", [DIAGNOSIS_NAMES.get(d, d) for d in dist.index])
    return dist.rename_axis("dx").reset_index()


def render_report(
    table: pd.DataFrame,
    stats: dict[str, Any],
    ranking: pd.DataFrame,
    baseline: Baseline,
    taxonomy: Taxonomy,
    plots: dict[str, str],
    p: EdaParams,
    lin: dict[str, Any],
) -> str:
    """The report tying the plots (``plots``: name -> relative path) and the numbers together."""
    order = list(taxonomy.diagnoses)
    seg = stats["segmentation"]
    failure = pd.DataFrame({"failure rate": pd.Series(seg["failure_rate_per_class"]).reindex(order)})
    median = table.groupby("dx")[list(KEY_STATISTICS)].median().reindex(order)
    top = ranking.head(p.top_features)[
        ["rank", "feature", "group", "separation", "best_class", "best_auc", "auc_malignant"]
    ]
    importances = baseline.importances.head(10)[["rank", "feature", "group", "importance_mean", "importance_std"]]
    git = lin["git"]
    return render_template(
        TEMPLATES,
        "eda_report.md.j2",
        n_images=len(table),
        commit=git["commit"][:10] + (" (dirty)" if git.get("dirty") else ""),
        data_md5=lin["data"].get("md5"),
        plots=plots,
        sizes_note=_sizes_note(table),
        segmentation=seg,
        status_counts=", ".join(f"{k}: {v}" for k, v in sorted(seg["status_counts"].items())),
        distribution_table=frame_table(_distribution(stats, taxonomy)),
        failure_table=frame_table(failure.reset_index(names="dx")),
        median_table=frame_table(median.reset_index()),
        colour_min_share=p.features.colour_min_share,
        findings="; ".join(
            f"`{r.feature}` (strongest for {r.best_class}: AUC {r.best_auc:.2f})" for r in ranking.head(5).itertuples()
        ),
        ranking_table=frame_table(top),
        p=p,
        base=baseline.metrics,
        importance_table=frame_table(importances, digits=4),
        params_json=json.dumps(to_dict(p), indent=1, sort_keys=True),
    )
