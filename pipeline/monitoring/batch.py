"""A batch of current images for a drift check: the same columns as the reference profile.

From a folder of images (:func:`current_from_folder`: each file decoded once, statistics over a
process pool with a progress bar, predictions and projected embeddings through THE prediction path,
an optional metadata CSV with optional ``dx`` labels) or from the service's inference log
(:func:`current_from_log`). :func:`compute_batch` is also how the ``reference`` stage profiles the
training sample.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.images import ImageError, decode_rgb, fit_to_size, list_images
from pipeline.core.metadata import read_metadata_csv
from pipeline.core.params import FeatureConfig
from pipeline.core.predictions import IN_DISTRIBUTION, P_MALIGNANT, QUALITY, join_reasons, pred_column, prob_column
from pipeline.core.workers import map_chunks
from pipeline.features.imagestats import SHARPNESS, image_statistics, sharpness
from pipeline.monitoring.profile import MonitorError, Reference, embedding_columns


def _process_chunk(
    paths: Sequence[str], config: FeatureConfig, input_size: tuple[int, int] | None, with_stats: bool
) -> list[tuple[str, dict[str, Any] | None, np.ndarray | None, str | None]]:
    """Decode each file once; its statistics (or only sharpness) and its model-input pixels."""
    out = []
    for p in paths:
        try:
            rgb = decode_rgb(Path(p), str(p))
            stats = image_statistics(rgb, config) if with_stats else {SHARPNESS: sharpness(rgb, config)}
            pix = None
            if input_size is not None:  # (H, W, 3) at the model's input size: Predictor.predict's fast path
                pix = np.ascontiguousarray(fit_to_size(rgb, *input_size))
            out.append((p, stats, pix, None))
        except (ImageError, ValueError, OSError) as exc:
            out.append((p, None, None, str(exc)))
    return out


def compute_batch(
    paths: Sequence[Path | str],
    *,
    config: FeatureConfig,
    predictor: Any = None,
    projection: np.ndarray | None = None,
    metadata: pd.DataFrame | None = None,
    tta: bool = False,
    batch_size: int = 64,
    workers: int = 0,
    chunk_size: int = 32,
    with_stats: bool = True,
    progress: bool = True,
    desc: str = "monitor",
) -> tuple[pd.DataFrame, list[str]]:
    """Rows (``image_id`` = file stem, in the order given) of statistics, and with a
    ``predictor`` its prediction columns and the projected embedding ``emb_XX``; plus the messages
    of unreadable files (skipped). ``metadata`` (aligned with ``paths``) goes to fusion models."""
    input_size = tuple(predictor.input_size) if predictor is not None else None
    fn = partial(_process_chunk, config=config, input_size=input_size, with_stats=with_stats)
    items = map_chunks(
        fn,
        [str(p) for p in paths],
        chunk_size=chunk_size,
        workers=workers,
        progress=progress,
        desc=f"{desc}: image statistics",
    )
    errors = [err for _, _, _, err in items if err is not None]
    keep = [k for k, it in enumerate(items) if it[3] is None]
    rows = [{"image_id": Path(items[k][0]).stem, **items[k][1]} for k in keep]
    frame = pd.DataFrame(rows) if rows else pd.DataFrame({"image_id": pd.Series([], dtype=str)})
    if predictor is not None and keep:
        meta = metadata.iloc[keep].reset_index(drop=True) if metadata is not None else None
        t0 = time.perf_counter()
        out = predictor.predict([items[k][2] for k in keep], metadata=meta, tta=tta, batch_size=batch_size)
        if progress:
            print(f"{desc}: predicted {len(keep)} images in {time.perf_counter() - t0:.1f} s", flush=True)
        frame = pd.concat([frame, prediction_frame(out, projection)], axis=1)
    return frame, errors


def prediction_frame(out: Mapping[str, Any], projection: np.ndarray | None) -> pd.DataFrame:
    """The native level's prediction columns, ``p_malignant`` and ``emb_XX`` from
    :meth:`pipeline.model.inference.Predictor.predict`'s output."""
    level = out["native_level"]
    classes = list(out["classes"][level])
    probs = np.asarray(out["native_probs"], dtype=np.float64)
    cols: dict[str, Any] = {pred_column(level): [classes[i] for i in probs.argmax(axis=1)]}
    for j, c in enumerate(classes):
        cols[prob_column(level, c)] = probs[:, j]
    cols[P_MALIGNANT] = (
        np.asarray(out["p_malignant"], dtype=np.float64)
        if out.get("p_malignant") is not None
        else np.full(len(probs), np.nan)
    )
    if out.get("in_distribution") is not None:
        cols[IN_DISTRIBUTION] = np.asarray(out["in_distribution"], dtype=bool)
    if out.get("quality_reasons") is not None:
        cols[QUALITY] = [join_reasons(r) for r in out["quality_reasons"]]
    frame = pd.DataFrame(cols)
    if projection is not None:
        emb = np.asarray(out["embeddings"], dtype=np.float32)
        if emb.shape[1] != projection.shape[0]:
            raise MonitorError(
                f"model embeddings have {emb.shape[1]} dims but the reference projection expects "
                f"{projection.shape[0]}: the reference profile belongs to another model"
            )
        proj = emb @ projection
        frame = pd.concat([frame, pd.DataFrame(proj, columns=embedding_columns(proj.shape[1]))], axis=1)
    return frame


def current_from_folder(
    folder: Path | str,
    reference: Reference,
    predictor: Any,
    *,
    metadata_csv: Path | str | None = None,
    taxonomy: Any = None,
    workers: int = 0,
    chunk_size: int = 32,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[str]]:
    """The current batch of a folder of images (JPEG/PNG, any size) with an optional metadata CSV
    (labels in ``dx``). Returns the rows and the messages of skipped unreadable files."""
    if not Path(folder).is_dir():
        raise MonitorError(f"{folder}: not a folder of images")
    paths, _ = list_images([folder])
    meta = None
    if metadata_csv is not None:
        meta = read_metadata_csv(metadata_csv, taxonomy)
    meta_rows = None
    if meta is not None:
        ids = pd.DataFrame({"image_id": [p.stem for p in paths]})
        meta_rows = ids.merge(meta, on="image_id", how="left")
    frame, errors = compute_batch(
        paths,
        config=reference.feature_config,
        predictor=predictor,
        projection=reference.projection,
        metadata=meta_rows,
        tta=bool(reference.schema.get("tta", False)),
        batch_size=batch_size,
        workers=workers,
        chunk_size=chunk_size,
        progress=progress,
        desc="monitor",
    )
    if meta is not None and len(frame):
        frame = frame.merge(meta, on="image_id", how="left", suffixes=("", "_meta"))
        if "dx" in frame and taxonomy is not None and frame["dx"].notna().any():
            level = reference.schema.get("native_level", "dx")
            frame["label"] = [taxonomy.labels([d], level)[0] if isinstance(d, str) else None for d in frame["dx"]]
    return frame, errors


def current_from_log(location: Path | str, start: Any = None, end: Any = None) -> pd.DataFrame:
    """The current batch from the service's inference log for ``[start, end)``: its answers but the
    explanations of ``/gradcam`` (the page asks for one after classifying the same image: counted
    once); ``attrs["coverage"]`` as the reader gave it."""
    from pipeline.monitoring import inferencelog

    df = inferencelog.read(location, start, end)
    if "route" in df:
        kept = df[df["route"] != "/gradcam"].reset_index(drop=True)
        kept.attrs = dict(df.attrs)
        return kept
    return df
