"""Stage ``review``: which labelled images a dermatologist should check again
(:mod:`pipeline.evaluation.labelreview`).

    python -m pipeline.stages.review [--model DIR] [--splits DIR] [--images DIR] [--reports DIR]

Embeds every image of the three splits with the trained model (the plain view, as retrieval
does), computes out-of-fold diagnosis probabilities with a lesion-grouped k-fold logistic
regression on those embeddings and ranks the labels they contradict (confident learning,
``cleanlab``). Writes ``reports/review/``: ``label_issues.csv`` (the suspects, worst first, with
the suggested diagnosis and the most similar confirmed cases of other lesions),
``contact_sheet.png``, ``metrics.json`` (DVC metrics: suspects per diagnosis and per confirmation
type), ``summary.md`` and ``lineage.json``. An image with a label-review decision
(``labels/decisions.csv``: kept or corrected, applied by the split) is marked in column
``reviewed``. No label changes here: suspects in the test split are
reported like the others (column ``split``). Reads the ``review`` and ``labels`` sections.
"""

from __future__ import annotations

import sys
from argparse import Namespace

import pandas as pd

from pipeline.core import fsutil, lineage, params, stagecli
from pipeline.core.errors import EXIT_OK
from pipeline.core.layout import LAYOUT
from pipeline.data import decisions, splits
from pipeline.evaluation import labelreview
from pipeline.model import bundle, retrieval
from pipeline.model.inference import load_model


def body(args: Namespace) -> int:
    p = params.load_section("review", args.params)
    classes = params.load_taxonomy(args.params).diagnoses
    frames = splits.read_splits(args.splits)
    frame = pd.concat([f.assign(split=name) for name, f in frames.items()], ignore_index=True)
    files = [
        f
        for name, f_ in frames.items()
        for f in splits.image_files(f_, args.images, LAYOUT.split_file(name, args.splits))
    ]
    embeddings = retrieval.embed(load_model(args.model), frame, files, p.batch_size, not args.no_progress, "review")
    ranked = labelreview.review(frame, embeddings, classes, p)
    done = decisions.latest(decisions.read(args.decisions, list(classes)))
    ranked["reviewed"] = ranked["image_id"].map(dict(zip(done["image_id"], done["decision"]))).fillna("")
    path_of = dict(zip(frame["image_id"], files, strict=True))
    found = labelreview.write_reports(ranked, args.reports, path_of.__getitem__, p)
    fsutil.write_json(
        args.reports / "lineage.json",
        lineage.lineage(
            params={"review": params.to_dict(p)},
            files=[args.model / bundle.MODEL_FILE, args.decisions]
            + [LAYOUT.split_file(n, args.splits) for n in frames],
        ),
    )
    print(
        f"review: {found['suspects']:,} of {found['images']:,} labels contradicted by the other folds "
        f"({100 * found['suspect_share']:.1f} %; {found['test_split_suspects']} in the test split) -> {args.reports}"
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("review", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
