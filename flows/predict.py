"""Prefect flow: batch inference sharded over Dask workers (``lesionflow predict --dask-address``).

The list of files is cut into shards of ``shard_size``; one task per shard runs
:func:`pipeline.model.batchpredict.predict_shard` (each worker loads the model once and keeps it).
Where the tasks run is :class:`prefect_dask.DaskTaskRunner`'s business: a local
``distributed`` cluster of ``workers`` processes, or an existing cluster given by ``dask_address``
(``tcp://scheduler:8786``), the way past one machine (docs/scale-out.md). The rows come back in
the order of the input files, equal to a single process's.

This module only orchestrates; the prediction is :mod:`pipeline.model.batchpredict`'s.

    python -m flows.predict data/images --model artifacts/model --threshold 0.3 --workers 2 --out p.csv
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, task, unmapped

from flows.features import make_task_runner
from pipeline.core.images import list_images
from pipeline.model import batchpredict


@task(name="predict-shard", task_run_name="predict-shard-{index}")
def predict_shard(
    model_dir: str, files: list[str], threshold: float, batch_size: int, tta: bool | None, index: int = 0
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Prediction rows and problems of one shard of files."""
    return batchpredict.predict_shard(model_dir, files, threshold, batch_size, tta)


@flow(name="batch-predict", validate_parameters=False, log_prints=True)
def batch_predict_flow(
    model_dir: str,
    files: list[str],
    threshold: float,
    batch_size: int = 32,
    tta: bool | None = None,
    shard_size: int = 256,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """The rows (input order) and the problems of every file."""
    shards = [files[i : i + shard_size] for i in range(0, len(files), shard_size)]
    futures = predict_shard.map(
        unmapped(model_dir),
        shards,
        unmapped(threshold),
        unmapped(batch_size),
        unmapped(tta),
        index=list(range(len(shards))),
    )
    rows, problems = [], []
    for fut in futures:
        r, p = fut.result()
        rows += r
        problems += p
    print(f"predicted {len(rows)} image(s) in {len(shards)} shard(s); {len(problems)} skipped")
    return rows, problems


def predict_on_dask(
    model_dir: Path | str,
    files: Sequence[Path | str],
    threshold: float,
    batch_size: int = 32,
    tta: bool | None = None,
    *,
    dask_address: str | None = None,
    workers: int = 0,
    shard_size: int = 256,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """:func:`batch_predict_flow` on a Dask cluster (``dask_address``) or a local one of ``workers``
    processes; the rows as a DataFrame (as :func:`pipeline.model.batchpredict.predict_files`)."""
    runner = make_task_runner("dask", workers, dask_address)
    configured = batch_predict_flow.with_options(task_runner=runner)
    rows, problems = configured(str(model_dir), [str(f) for f in files], threshold, batch_size, tta, shard_size)
    return pd.DataFrame(rows), [tuple(p) for p in problems]


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="image files or folders")
    ap.add_argument("--model", required=True, help="model directory")
    ap.add_argument("--threshold", type=float, required=True, help="operating threshold on p(malignant)")
    ap.add_argument("--workers", type=int, default=0, help="local Dask workers (0 = all cores)")
    ap.add_argument("--dask-address", default=None, help="an existing Dask scheduler")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--out", default=None, help="write the rows to this CSV")
    a = ap.parse_args(argv)
    files, _ = list_images(a.paths)
    t0 = time.perf_counter()
    rows, problems = predict_on_dask(
        a.model, files, a.threshold, dask_address=a.dask_address, workers=a.workers, shard_size=a.shard_size
    )
    dt = time.perf_counter() - t0
    print(f"{len(rows)} images in {dt:.1f} s ({len(rows) / dt:.1f} images/s); {len(problems)} skipped")
    if a.out:
        rows.to_csv(a.out, index=False)


if __name__ == "__main__":
    main()
