"""Stage ``split``: a leakage-free, stratified train/val/test split (:mod:`pipeline.data.splitting`).

    python -m pipeline.stages.split [--metadata CSV] [--index CSV] [--decisions CSV] [--out DIR] [--reports DIR]

The label-review decisions (``labels/decisions.csv``, :mod:`pipeline.data.decisions`) are applied
first: a corrected diagnosis replaces the data's for every image of its lesion, in the split files
and so in every later stage; the data table itself is not changed.

Writes ``artifacts/splits/{train,val,test}.csv`` (the metadata columns plus ``split``, sorted by
``image_id``; replaced together only when all three are written) and ``reports/split/``:
``summary.json`` (numbers: the DVC metrics), ``lineage.json``, ``counts.csv``, ``report.md`` and
``split_counts.png``.
"""

from __future__ import annotations

import sys
from argparse import Namespace

import pandas as pd

from pipeline.core import fsutil, lineage, params, stagecli
from pipeline.core.errors import EXIT_OK, LesionflowError
from pipeline.core.layout import SPLITS
from pipeline.core.metadata import read_csv
from pipeline.data import decisions, splitting


def read_inputs(args: Namespace, diagnoses: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The metadata table with the label decisions applied, the validation index (text ids) and
    the decisions' summary."""
    if not args.index.exists():
        raise LesionflowError(f"{args.index}: validation index not found: run the validate stage first")
    meta = read_csv(args.metadata, "metadata table", dtype={"lesion_id": str, "image_id": str})
    index = read_csv(args.index, "image index", dtype={"image_id": str, "md5": str})
    meta, applied = decisions.apply(meta, decisions.read(args.decisions, diagnoses), str(args.decisions))
    return meta, index, applied


def write_outputs(df: pd.DataFrame, p: params.SplitParams, args: Namespace) -> dict:
    """The split files (atomically, together) and the reports; returns the summary."""
    with fsutil.staged_dir(args.out) as stage:
        for split in SPLITS:
            df[df["split"] == split].to_csv(stage / f"{split}.csv", index=False)
    counts = splitting.split_counts(df, p.stratify_column)
    summary = splitting.summarise(df, p)
    patients = p.patient_column in df.columns
    reports = args.reports
    fsutil.atomic_write_text(reports / "counts.csv", counts.rename_axis("class").to_csv())
    fsutil.atomic_write_text(reports / "report.md", splitting.render_markdown(counts, summary, p, patients))
    splitting.plot_counts(
        counts, reports / "split_counts.png", f"Split of {summary['images']:,} images (seed {p.seed})"
    )
    fsutil.write_json(reports / "summary.json", splitting.dvc_metrics(summary), sort_keys=False)
    fsutil.write_json(
        reports / "lineage.json",
        lineage.lineage(
            params={"split": params.to_dict(p)},
            files=[args.metadata, args.decisions] + [args.out / f"{s}.csv" for s in SPLITS],
        ),
    )
    return summary


def body(args: Namespace) -> int:
    p = params.load_section("split", args.params)
    meta, index, applied = read_inputs(args, list(params.load_taxonomy(args.params).diagnoses))
    summary = write_outputs(splitting.make_split(meta, index, p), p, args)
    if applied["decisions"]:
        print(
            f"Label decisions of {args.decisions}: {applied['corrected']} corrected "
            f"({applied['images_relabelled']} image(s) relabelled), {applied['kept']} kept"
            + (f", {len(applied['not_in_data'])} about images not in the data" if applied["not_in_data"] else "")
        )
    print(
        f"Split written to {args.out}: "
        + ", ".join(f"{s} {summary['sizes'][s]:,}" for s in SPLITS)
        + f"; max class-share deviation {summary['max_class_share_deviation']:.2%}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("split", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
