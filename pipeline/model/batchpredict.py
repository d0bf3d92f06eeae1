"""Batch inference of image files: prediction rows (:mod:`pipeline.core.predictions`) of a list of
files, in one process (``lesionflow predict``) or as shards on Dask workers (:mod:`flows.predict`,
``lesionflow predict --dask-address``), identical either way.

Files that cannot be read, or images too small or too elongated for the model
(:class:`pipeline.core.formats.SizeLimits`), are reported, not predicted. An image out of
distribution, or refused by an image-quality check (:mod:`pipeline.model.quality`, the reasons in
``quality_reasons``), keeps its probabilities but gets no decision (``withhold``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import images
from pipeline.core.predictions import prediction_frame


def predict_files(
    predictor: Any,
    files: list[Path],
    threshold: float,
    batch_size: int,
    progress: bool = True,
    tta: bool | None = None,
) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Prediction rows of every readable file (a ``file`` column first) and ``(file, reason)`` of
    the others (``tta``: flip TTA, default the model's setting)."""
    from tqdm.auto import tqdm

    frames, problems = [], []
    starts = range(0, len(files), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress or len(files) <= batch_size):
        chunk, arrays = [], []
        for f in files[start : start + batch_size]:
            try:
                rgb = images.decode_rgb(f, str(f))
                images.check_size(rgb, predictor.size_limits, str(f))
                arrays.append(rgb)
                chunk.append(f)
            except images.ImageError as exc:
                problems.append((str(f), exc.reason))
        if arrays:
            res = predictor.predict(arrays, tta=tta, batch_size=batch_size)
            levels = {lvl: res[f"{lvl}_probs"] for lvl in ("dx", "risk", "binary")}
            rows = prediction_frame(
                levels,
                predictor.taxonomy,
                res["p_malignant"],
                threshold,
                digits=None,
                in_distribution=res["in_distribution"],
                ood_score=res["ood_score"],
                withhold=True,
                quality_reasons=res.get("quality_reasons"),
            )
            frames.append(pd.concat([pd.DataFrame({"file": [str(f) for f in chunk]}), rows], axis=1))
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), problems


@functools.lru_cache(maxsize=2)
def worker_predictor(model_dir: str, engine: str = "auto", threads: int = 1) -> Any:
    """The model of ``model_dir``, loaded once per worker process (``threads`` torch threads: one
    per Dask worker, the workers share the cores)."""
    import torch

    from pipeline.model.inference import load_model

    torch.set_num_threads(threads)
    return load_model(model_dir, device="cpu", engine=engine)


def predict_shard(
    model_dir: str,
    files: list[str],
    threshold: float,
    batch_size: int,
    tta: bool | None = None,
    engine: str = "auto",
    threads: int = 1,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """:func:`predict_files` of one shard with this worker's cached model: rows as records."""
    predictor = worker_predictor(model_dir, engine, threads)
    rows, problems = predict_files(predictor, [Path(f) for f in files], threshold, batch_size, False, tta)
    return rows.to_dict("records"), problems
