"""Stage ``reference``: the drift-monitoring reference profile of the model
(:mod:`pipeline.monitoring.reference`), packaged with it.

    python -m pipeline.stages.reference [--model DIR] [--splits DIR] [--images DIR] [--eda DIR] [--out DIR]

Takes a stratified (by ``dx``), seeded sample of at most ``monitor.max_reference_rows`` training
images and writes to ``artifacts/reference/`` (replaced only when complete): ``profile.parquet``
(one row per sampled image: metadata, label, the EDA statistics plus sharpness, the model's
prediction columns, the projected embedding), ``projection.npy`` (the fixed random projection)
and ``profile.json`` (column roles, feature configuration, model md5, sampling, lineage).
Reads the ``monitor`` section of params.yaml.
"""

from __future__ import annotations

import sys
from argparse import Namespace

from pipeline.core import params, stagecli
from pipeline.core.errors import EXIT_OK
from pipeline.monitoring.reference import ReferenceInputs, build_reference


def body(args: Namespace) -> int:
    p = params.load_section("monitor", args.params)
    inputs = ReferenceInputs(splits_dir=args.splits, images_dir=args.images, model_dir=args.model, eda_dir=args.eda)
    build_reference(p, params.load_taxonomy(args.params), inputs, args.out, progress=not args.no_progress)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    return stagecli.run("reference", __doc__, body, argv)


if __name__ == "__main__":
    sys.exit(main())
