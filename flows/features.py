"""Prefect flow: the per-image EDA features, sharded over tasks on a choice of task runner.

:func:`pipeline.features.imagestats.image_features` is a pure function of one image, so the work shards
freely: this flow cuts the list of files into shards of ``shard_size`` and maps one task over
them. Where the tasks run is the task runner's business:

* ``runner="local"`` (default): Prefect's in-process :class:`~prefect.task_runners.ThreadPoolTaskRunner`;
* ``runner="dask"``: :class:`prefect_dask.DaskTaskRunner` (the maintained Prefect integration),
  on a local ``distributed`` cluster of ``workers`` processes by default, or on an existing Dask
  cluster given by ``dask_address`` (``tcp://scheduler:8786``): the way past one machine.

This module only orchestrates; all the image work is in :mod:`pipeline.features.imagestats`. The rows
come back in the order of the input files, identical whichever runner computed them.

Command line (prints throughput; ``--out`` writes the rows as Parquet)::

    python -m flows.features --runner dask --workers 2 --limit 500 --out /tmp/features.parquet
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.core import params, project
from pipeline.core.images import list_images
from pipeline.core.layout import Layout
from pipeline.core.workers import resolve_workers
from pipeline.features import imagestats

Runner = Literal["local", "dask"]


@task(name="image-features-shard", task_run_name="features-shard-{index}")
def features_shard(paths: list[str], config: imagestats.FeatureConfig, index: int = 0) -> list[dict[str, Any]]:
    """The features of one shard of files (raises ImageError naming a bad file)."""
    return imagestats.features_for_files(paths, config)


@flow(name="image-features", validate_parameters=False, log_prints=True)
def image_features_flow(
    image_paths: list[str],
    shard_size: int = 256,
    config: imagestats.FeatureConfig | None = None,
) -> list[dict[str, Any]]:
    """Features of every image in ``image_paths`` (one dict per image, input order)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    config = config or imagestats.DEFAULT_CONFIG
    paths = [str(p) for p in image_paths]
    shards = [paths[i : i + shard_size] for i in range(0, len(paths), shard_size)]
    futures = features_shard.map(shards, unmapped(config), index=list(range(len(shards))))
    rows = [row for fut in futures for row in fut.result()]
    print(f"computed features of {len(rows)} images in {len(shards)} shards")
    return rows


def make_task_runner(
    runner: Runner = "local", workers: int = 0, dask_address: str | None = None, dask_processes: bool = True
):
    """The task runner for ``runner``; ``workers`` = threads (local) or Dask workers (0 = all
    cores), each a process unless ``dask_processes`` is False (then threads of this process:
    quicker to start, for tests)."""
    n = resolve_workers(workers)
    if runner == "local":
        return ThreadPoolTaskRunner(max_workers=n)
    if runner == "dask":
        from prefect_dask import DaskTaskRunner

        if dask_address:
            return DaskTaskRunner(address=dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": n,
                "threads_per_worker": 1,
                "processes": dask_processes,
                "dashboard_address": None,
            }
        )
    raise ValueError(f"unknown runner {runner!r} (known: local, dask)")


def compute_features(
    image_paths: Sequence[str | Path],
    runner: Runner = "local",
    workers: int = 0,
    shard_size: int = 256,
    config: imagestats.FeatureConfig | None = None,
    dask_address: str | None = None,
    dask_processes: bool = True,
) -> list[dict[str, Any]]:
    """Run :func:`image_features_flow` on the chosen task runner."""
    task_runner = make_task_runner(runner, workers, dask_address, dask_processes)
    configured = image_features_flow.with_options(task_runner=task_runner)
    return configured([str(p) for p in image_paths], shard_size=shard_size, config=config)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=None, help="folder of images (default: the project's data/images)")
    ap.add_argument("--runner", choices=["local", "dask"], default="local")
    ap.add_argument("--workers", type=int, default=0, help="0 = all cores")
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--dask-address", default=None, help="an existing Dask scheduler (dask runner)")
    ap.add_argument("--dask-threads", action="store_true", help="local Dask workers as threads, not processes")
    ap.add_argument("--limit", type=int, default=0, help="first N images only (0 = all)")
    ap.add_argument("--out", default=None, help="write the rows to this Parquet file")
    args = ap.parse_args(argv)
    root = project.find_root() or Path.cwd()
    images_dir = Path(args.images) if args.images else Layout(root).images_dir
    paths, _ = list_images([images_dir], recursive=False)
    if args.limit:
        paths = paths[: args.limit]
    if not paths:
        raise SystemExit(f"{images_dir}: no image files found")
    try:
        config = params.load_section("eda", Layout(root).params_file).features
    except params.ParamsError:  # no params.yaml here: the library defaults
        config = imagestats.DEFAULT_CONFIG
    t0 = time.perf_counter()
    rows = compute_features(
        paths, args.runner, args.workers, args.shard_size, config, args.dask_address, not args.dask_threads
    )
    dt = time.perf_counter() - t0
    print(f"{len(rows)} images in {dt:.1f} s ({len(rows) / dt:.0f} images/s) on the {args.runner} runner")
    if args.out:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(args.out, index=False)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
