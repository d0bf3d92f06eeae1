"""The EDA statistics of many image files, on every core (a process pool over chunks of files,
with a progress bar): the ``eda`` stage's table. ``flows/features.py`` shards the same per-file
function over Prefect/Dask instead."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.core.errors import LesionflowError
from pipeline.core.images import ImageError
from pipeline.core.params import FeatureConfig
from pipeline.core.workers import map_chunks
from pipeline.features.imagestats import DEFAULT_CONFIG, features_for_file


class FeatureError(LesionflowError, ValueError):
    """Images whose statistics could not be computed; the message names every file."""


def _chunk(paths: list[str], config: FeatureConfig) -> list[tuple[dict[str, Any] | None, str | None]]:
    """(row, None) per readable file, (None, message) per unreadable one: nothing raised in a worker."""
    out: list[tuple[dict[str, Any] | None, str | None]] = []
    for p in paths:
        try:
            out.append((features_for_file(p, config), None))
        except ImageError as exc:
            out.append((None, str(exc)))
    return out


def compute_features(
    paths: Sequence[Path | str],
    config: FeatureConfig = DEFAULT_CONFIG,
    workers: int = 0,
    chunk_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """:func:`pipeline.features.imagestats.features_for_file` of every path, in the order given,
    on ``workers`` processes (0 = all cores; 1 = this process). Raises :class:`FeatureError`
    listing every unreadable file."""
    results = map_chunks(
        partial(_chunk, config=config),
        [str(p) for p in paths],
        chunk_size=chunk_size,
        workers=workers,
        progress=progress,
        desc="eda: image statistics",
    )
    errors = [err for _, err in results if err is not None]
    if errors:
        shown = "\n  ".join(errors[:20])
        more = f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise FeatureError(f"{len(errors)} image(s) could not be read:\n  {shown}{more}")
    return [row for row, _ in results]
