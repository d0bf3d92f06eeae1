"""Stage ``evaluate``: may this model ship, and why? Metrics, explanations, gates, model card.

    python -m pipeline.stages.evaluate [--model DIR] [--splits DIR] [--images DIR] [--eda DIR] [--champion DIR]

Reads the trained model, the split, the images and, when present, the champion (the packaged model
the flow exports to ``artifacts/champion``) and the EDA stage's feature-table classifier. The steps
are :mod:`pipeline.evaluation.steps` (predict, operating point, trust, judge, compare, similar
cases, attribute); the outputs, in ``artifacts/evaluate/`` and ``reports/evaluate/``, are
:mod:`pipeline.evaluation.outputs`'.

The stage exits 0 when the gates fail: the verdict (``passed: false``) is data that the flow acts
on. It exits 2 on a user-causable error (missing model, split or image; bad params) with a message
naming the file.
"""

from __future__ import annotations

import sys
import time
from argparse import ArgumentParser, Namespace
from pathlib import Path

from pipeline.core import lineage, params, stagecli
from pipeline.core.errors import EXIT_OK
from pipeline.core.layout import LAYOUT
from pipeline.core.taxonomy import LEVELS, Taxonomy
from pipeline.evaluation import outputs, steps
from pipeline.model import bundle


def inputs_of(args: Namespace) -> steps.Inputs:
    """The evaluation's inputs and outputs from the command line."""
    return steps.Inputs(
        model=args.model,
        splits=args.splits,
        images=args.images,
        eda=args.eda,
        retrieval=args.retrieval,
        champion=args.champion,
        out=args.out,
        reports=args.reports,
        cache_dir=None if args.no_cache else args.cache_dir,
        progress=not args.no_progress,
        device=args.device,
    )


def evaluate(
    inputs: steps.Inputs, p: params.EvaluateParams, tax: Taxonomy, lineage_params: dict, k: int
) -> steps.Evaluation:
    """Every step, then every output; returns the evaluation."""
    t0 = time.perf_counter()
    ev = steps.run(steps.load(inputs), inputs, tax, p, k)
    lin = lineage.lineage(
        params=lineage_params,
        files=[
            *(inputs.model / name for name in bundle.TRAINED_FILES),
            LAYOUT.split_file("val", inputs.splits),
            LAYOUT.split_file("test", inputs.splits),
        ],
    )
    t = time.perf_counter()
    outputs.write_outputs(ev, inputs, tax, p, lin)
    ev.seconds["write"] = time.perf_counter() - t
    ev.seconds["total"] = time.perf_counter() - t0
    return ev


def print_summary(ev: steps.Evaluation, reports: str) -> None:
    nan = float("nan")
    parts = [
        f"{lvl}: acc {h.get('accuracy', nan):.3f}, bal.acc {h.get('balanced_accuracy', nan):.3f}, "
        f"macro AUC {h.get('roc_auc_macro') or nan:.3f}"
        for lvl, h in ((lvl, ev.head[lvl]) for lvl in LEVELS if lvl in ev.head)
    ]
    print("evaluate: " + "; ".join(parts))
    print(
        f"evaluate: binary ROC-AUC {ev.head['binary']['roc_auc']:.3f}; operating point p >= {ev.threshold:.4f}: "
        f"test sensitivity {ev.op_test['sensitivity']:.3f}, specificity {ev.op_test['specificity']:.3f}"
    )
    verdict = "PASSED" if ev.verdict["passed"] else "FAILED: " + ", ".join(ev.verdict["failed"])
    print(f"evaluate: gates {verdict} (verdict in {reports}/{bundle.GATES_FILE})")
    print("evaluate: seconds " + ", ".join(f"{k} {v:.0f}" for k, v in ev.seconds.items()))


def extra_flags(ap: ArgumentParser) -> None:
    ap.add_argument("--champion", type=Path, default=LAYOUT.champion_dir, help="the champion exported by the flow")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--no-cache", action="store_true", help="always predict (no reuse of cached predictions)")
    ap.add_argument("--cache-dir", type=Path, default=LAYOUT.prediction_cache, help="cached predictions")
    ap.add_argument("--predict-only", action="store_true", help="only predict val and test into the cache, then stop")


def body(args: Namespace) -> int:
    p = params.load_section("evaluate", args.params)
    inputs = inputs_of(args)
    if args.predict_only:  # e.g. on a GPU machine
        steps.predict(steps.load(inputs), inputs, p)
        print(f"evaluate: predictions of {args.model} on val and test cached in {args.cache_dir}")
        return EXIT_OK
    tax = params.load_taxonomy(args.params)
    k = params.load_section("retrieval", args.params).k
    lineage_params = {"evaluate": params.to_dict(p), "labels": tax.to_dict(), "retrieval": {"k": k}}
    print_summary(evaluate(inputs, p, tax, lineage_params, k), str(args.reports))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("evaluate", __doc__, body, argv, extra=extra_flags)


if __name__ == "__main__":
    sys.exit(main())
