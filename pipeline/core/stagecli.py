"""The command line of every DVC stage: one set of flag names, one way to run and fail.

    python -m pipeline.stages.split [--params FILE] [--metadata CSV] [--index CSV] [--out DIR] [--reports DIR]

Each stage takes the path flags (:data:`FLAGS`) that its entry in ``dvc.yaml`` names
(:func:`pipeline.core.stages.paths`), with those paths as defaults; ``--params`` and
``--no-progress`` are always there. :func:`run`
makes the project root the working directory first (paths are relative to it, as in ``dvc.yaml``,
so a stage runs the same from any subfolder), then calls the stage's body. A
:class:`~pipeline.core.errors.LesionflowError` (a bad parameter, file, row or image) is printed as
``<stage>: error: <message>`` and exits with :data:`~pipeline.core.errors.EXIT_USER_ERROR`; the
body returns the exit code otherwise.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.core import project, stages
from pipeline.core.errors import EXIT_USER_ERROR, LesionflowError

#: Flag name -> help text. The same input or output is always the same flag.
FLAGS: dict[str, str] = {
    "metadata": "metadata table (CSV)",
    "images": "folder of the image files",
    "index": "the validate stage's image index (CSV)",
    "decisions": "label-review decisions (CSV, lesionflow label decide)",
    "splits": "folder of the split files train/val/test.csv",
    "eda": "the eda stage's artifacts (feature table, baseline)",
    "model": "model folder (model.pt + config.json)",
    "retrieval": "the retrieval index of the training split (stage retrieval)",
    "out": "output folder for machines (artifacts/<stage>)",
    "reports": "output folder for people (reports/<stage>)",
}


def parser(stage: str, doc: str, defaults: dict[str, Path]) -> argparse.ArgumentParser:
    """The stage's parser: ``--params``, ``--no-progress`` and the :data:`FLAGS` in ``defaults``."""
    ap = argparse.ArgumentParser(
        prog=f"python -m pipeline.stages.{stage}",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="parameters file")
    for name, default in defaults.items():
        if name not in FLAGS:
            raise ValueError(f"unknown stage flag {name!r} (known: {', '.join(FLAGS)})")
        ap.add_argument(f"--{name}", type=Path, default=default, help=FLAGS[name])
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def run(
    stage: str,
    doc: str,
    body: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
    *,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Enter the project, parse ``argv`` and run ``body(args)``; see the module docstring."""
    project.enter()
    ap = parser(stage, doc, stages.paths(stage))
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    try:
        return body(args)
    except LesionflowError as exc:
        print(f"{stage}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
