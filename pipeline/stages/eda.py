"""Stage ``eda``: image statistics of the lesions, which of them separate the classes, and a
feature-only baseline the CNN must beat (:mod:`pipeline.features`).

    python -m pipeline.stages.eda [--metadata CSV] [--splits DIR] [--images DIR] [--out DIR] [--reports DIR]

Writes ``artifacts/eda/`` (replaced as a whole only when complete): ``features.parquet`` (one row
per image: metadata, split, risk class, every statistic), ``auc_ranking.csv``,
``permutation_importance.csv``, ``baseline_model.json`` (plain numbers, no pickle) and
``lineage.json``; and ``reports/eda/``: ``summary.json`` (numbers: the DVC metrics),
``statistics.json`` (class distribution, segmentation, per-class statistics, top features),
``lineage.json``, ``report.md`` and ``plots/*.png``.
"""

from __future__ import annotations

import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import fsutil, lineage, params, stagecli
from pipeline.core.errors import EXIT_OK, LesionflowError
from pipeline.core.layout import LAYOUT, SPLITS
from pipeline.core.taxonomy import Taxonomy
from pipeline.data import splits
from pipeline.features import analysis, batch, imagestats, plots, report
from pipeline.features.baseline import Baseline, fit_baseline

#: The report's figures: name -> file under reports/eda/plots/.
PLOTS = {
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
STAT_GROUPS = {
    "stats_image": ("Image statistics", list(imagestats.IMAGE_FEATURES)),
    "stats_lesion_shape": ("Lesion shape", list(imagestats.LESION_SHAPE_FEATURES)),
    "stats_lesion_colour": ("Lesion colour", list(imagestats.LESION_COLOUR_FEATURES)),
    "stats_abcd_colours": (
        "ABCD colour shares",
        [f"colour_share_{c}" for c in imagestats.ABCD_COLOURS] + ["n_colours"],
    ),
}


def feature_table(args: Namespace, p: params.EdaParams, tax: Taxonomy) -> tuple[pd.DataFrame, float]:
    """The split rows joined with every image's statistics; and the seconds the statistics took."""
    table = splits.split_table(args.splits, args.metadata)
    unknown = sorted(set(table["dx"]) - set(tax.diagnoses))
    if unknown:
        raise LesionflowError(f"{args.splits}: unknown diagnosis {unknown[0]!r} (known: {', '.join(tax.diagnoses)})")
    files = splits.image_files(table, args.images, args.splits)
    t0 = time.perf_counter()
    rows = batch.compute_features(
        files, p.features, workers=p.workers, chunk_size=p.chunk_size, progress=not args.no_progress
    )
    return analysis.feature_table(table, rows, tax), time.perf_counter() - t0


def write_artifacts(out: Path, table: pd.DataFrame, ranking: pd.DataFrame, baseline: Baseline, lin: dict) -> None:
    with fsutil.staged_dir(out) as stage:
        table.to_parquet(stage / "features.parquet", index=False)
        ranking.to_csv(stage / "auc_ranking.csv", index=False)
        baseline.importances.to_csv(stage / "permutation_importance.csv", index=False)
        fsutil.write_json(stage / "baseline_model.json", {**baseline.to_json(), "lineage": lin})
        fsutil.write_json(stage / "lineage.json", lin)


def write_plots(
    folder: Path,
    table: pd.DataFrame,
    ranking: pd.DataFrame,
    baseline: Baseline,
    tax: Taxonomy,
    p: params.EdaParams,
    images_dir: Path,
) -> None:
    with fsutil.staged_dir(folder) as stage:
        plots.plot_class_distribution(table, tax, stage / PLOTS["class_distribution"])
        for key, (title, features) in STAT_GROUPS.items():
            plots.plot_stats_by_class(table, features, tax, title, stage / PLOTS[key])
        plots.plot_sample_grid(
            table, images_dir, p.features, tax, p.grid_per_class, p.seed, stage / PLOTS["sample_grid"]
        )
        plots.plot_colour_presence(table, tax, stage / PLOTS["colour_presence"])
        plots.plot_auc_ranking(ranking, tax, p.top_features, stage / PLOTS["auc_ranking"])
        plots.plot_importances(baseline, p.top_features, stage / PLOTS["importances"])
        plots.plot_confusion(baseline, stage / PLOTS["confusion"])


def run(args: Namespace, p: params.EdaParams, tax: Taxonomy, lineage_params: dict[str, Any]) -> dict[str, Any]:
    """Compute, analyse and write every output of the stage; returns the DVC metrics."""
    table, seconds = feature_table(args, p, tax)
    numeric = analysis.numeric_features(p.features)
    ranking = analysis.auc_ranking(table, numeric, tax)
    model_features = [f for f in numeric if f not in analysis.NOT_IN_BASELINE] + ["seg_ok"]
    baseline = fit_baseline(table.assign(seg_ok=table["seg_ok"].astype(float)), model_features, tax, p)
    stats = analysis.statistics(table, numeric, tax, ranking, baseline.metrics, baseline.importances)
    stats["throughput"] = analysis.throughput(len(table), seconds)
    metrics = analysis.metrics(stats)
    lin = lineage.lineage(
        params=lineage_params, files=[LAYOUT.split_file(s, args.splits) for s in SPLITS] + [args.metadata]
    )
    write_artifacts(args.out, table, ranking, baseline, lin)
    write_plots(args.reports / "plots", table, ranking, baseline, tax, p, args.images)
    text = report.render_report(
        table, stats, ranking, baseline, tax, {k: f"plots/{v}" for k, v in PLOTS.items()}, p, lin
    )
    fsutil.atomic_write_text(args.reports / "report.md", text)
    fsutil.write_json(args.reports / "statistics.json", stats)
    fsutil.write_json(args.reports / "lineage.json", lin)
    fsutil.write_json(args.reports / "summary.json", metrics, sort_keys=False)
    return {**metrics, **stats["throughput"], "top_features": [t["feature"] for t in stats["top_features"][:5]]}


def body(args: Namespace) -> int:
    p = params.load_section("eda", args.params)
    labels = params.load_section("labels", args.params)
    m = run(args, p, labels.taxonomy(), {"eda": params.to_dict(p), "labels": params.to_dict(labels)})
    print(
        f"eda: {m['images']} images in {m['seconds']:.1f} s ({m['images_per_s']:.0f} images/s); segmentation "
        f"failure rate {100 * m['segmentation_failure_rate']:.2f}%; baseline val balanced accuracy "
        f"{m['baseline_val_balanced_accuracy']:.3f}; top features: {', '.join(m['top_features'])}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("eda", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
