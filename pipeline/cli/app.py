"""The ``lesionflow`` command: the app of :mod:`pipeline.cli.base` with every command registered.

lesionflow run                      # the retraining flow (validate ... evaluate, gates, package)
lesionflow status                   # the stores in use, champion, last run and its verdict
lesionflow env                      # shell exports of the same settings for prefect/bentoml/dvc
lesionflow dvc ARGS...              # DVC's own command line with the project's interpreter on PATH
lesionflow trace TAG                # data md5, git commit, params, metrics, gates + restore commands
lesionflow predict PATH... [--model DIR_OR_TAG] [--out predictions.csv]
lesionflow serve                    # the champion's Bento over HTTP (127.0.0.1:3000)
lesionflow token add|list|revoke    # the API tokens clients send (required off 127.0.0.1)
lesionflow logs prune | forget ID   # the inference log's retention; erase one answer's record
lesionflow schedule --cron "0 3 * * 1"   # serve the scheduled retraining deployment
lesionflow monitor [PATH] [--metadata CSV]   # drift check (docs/monitoring.md)
lesionflow validate-external IMAGES LABELS.csv [--model TAG] [--record]   # external validation
lesionflow site add NAME IMAGES LABELS.csv | site list   # an operating point per site
lesionflow similar IMAGE [--k 6] [--sheet cases.png]   # the most similar confirmed training cases
lesionflow ingest DIR --metadata CSV [--commit] [--push]   # new labelled images -> a new data version
lesionflow label queue --from log|DIR --budget N | import EXPORT --images DIR | decide ID --dx|--keep
lesionflow data diff [REV_A] [REV_B]  # what a data version adds (default: champion's vs workspace)
lesionflow history                  # champions over time; lesionflow rollback [TAG] --reason TEXT
"""

from __future__ import annotations

from pipeline.cli import (  # noqa: F401  (registers the commands)
    audit,
    champions,
    data,
    external,
    label,
    logs,
    predict,
    registry_views,
    run,
    serve,
    similar,
    sites,
    tokens,
)
from pipeline.cli.base import app

__all__ = ["app", "main"]


def main() -> None:
    """``python -m pipeline.cli``."""
    app()
