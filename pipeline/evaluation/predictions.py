"""A model's predictions on a split: computed through THE prediction path
(:mod:`pipeline.model.inference`, TTA included), cached, and written as prediction rows
(:mod:`pipeline.core.predictions`)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core import images, lineage
from pipeline.core.layout import LAYOUT
from pipeline.core.metadata import FIELDS
from pipeline.core.predictions import prediction_frame, truth_frame
from pipeline.core.taxonomy import LEVELS, Taxonomy
from pipeline.data import splits
from pipeline.model import bundle, quality

#: Prediction files kept in the cache (newest first).
CACHE_KEEP = 6


@dataclass
class Predictions:
    """Probabilities of one model on one split, at every label level it can give (calibrated, and
    before calibration), and the out-of-distribution scores and verdicts (None without a detector)."""

    frame: pd.DataFrame  # the split rows (metadata), in order
    probs: dict[str, np.ndarray | None]  # level -> (n, K) or None
    p_malignant: np.ndarray
    uncalibrated: dict[str, np.ndarray | None] = field(default_factory=dict)
    ood_score: np.ndarray | None = None
    in_distribution: np.ndarray | None = None
    embeddings: np.ndarray | None = None  # the penultimate embeddings (plain view), for retrieval
    quality: np.ndarray | None = None  # image-quality reasons as bit masks (pipeline.model.quality.to_mask)

    def level(self, level: str) -> np.ndarray | None:
        return self.probs.get(level)


def binary_truth(frame: pd.DataFrame, tax: Taxonomy) -> np.ndarray:
    """1 for a malignant (positive) image, 0 otherwise."""
    return (tax.encode(frame["dx"], "binary") == tax.positive_index).astype(int)


def predict_split(
    predictor: Any, frame: pd.DataFrame, images_dir: Path, batch_size: int, desc: str, progress: bool = True
) -> Predictions:
    """Run ``predictor`` over a split in batches (decode, predict, forget: memory stays flat)."""
    from tqdm.auto import tqdm

    from pipeline.model.inference import derive_levels

    files = splits.image_files(frame, images_dir, desc)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("native", "raw", "score", "inside", "emb", "quality")}
    meta_cols = [c for c in FIELDS if c in frame.columns]
    with tqdm(total=len(frame), desc=desc, unit="img", leave=False, disable=not progress) as bar:
        for s in range(0, len(frame), batch_size):
            chunk = frame.iloc[s : s + batch_size]
            imgs = [images.decode_rgb(f, str(f)) for f in files[s : s + batch_size]]
            meta = chunk[meta_cols].reset_index(drop=True) if meta_cols else None
            out = predictor.predict(imgs, metadata=meta, batch_size=batch_size)
            parts["native"].append(np.asarray(out["native_probs"], dtype=np.float64))
            parts["raw"].append(np.asarray(out["native_probs_uncalibrated"], dtype=np.float64))
            parts["emb"].append(np.asarray(out["embeddings"], dtype=np.float32))
            if out.get("ood_score") is not None:
                parts["score"].append(np.asarray(out["ood_score"], dtype=np.float64))
                parts["inside"].append(np.asarray(out["in_distribution"], dtype=bool))
            if out.get("quality_reasons") is not None:
                parts["quality"].append(quality.to_mask(out["quality_reasons"]))
            bar.update(len(chunk))
    level, tax = predictor.native_level, predictor.taxonomy
    probs = derive_levels(np.concatenate(parts["native"]), level, tax)
    raw = derive_levels(np.concatenate(parts["raw"]), level, tax)
    return Predictions(
        frame,
        probs,
        probs["binary"][:, tax.positive_index],
        raw,
        np.concatenate(parts["score"]) if parts["score"] else None,
        np.concatenate(parts["inside"]) if parts["inside"] else None,
        np.concatenate(parts["emb"]) if parts["emb"] else None,
        np.concatenate(parts["quality"]) if parts["quality"] else None,
    )


def prediction_key(model_dir: Path, frame: pd.DataFrame, images_dir: Path) -> str:
    """What predictions depend on: what the model answers (:func:`pipeline.model.bundle.fingerprint`:
    weights, config, OOD statistics), the image list, the images directory and the data version."""
    h = hashlib.md5()
    h.update(str(bundle.fingerprint(model_dir)).encode())
    h.update("\n".join(frame["image_id"]).encode())
    h.update(str(images_dir).encode())  # as given (not resolved): the same key on a GPU machine's copy
    h.update(str(lineage.data_version(LAYOUT.data_pointer).get("md5")).encode())
    h.update(b"evaluate-predictions/4")
    return h.hexdigest()


def _cached(path: Path, frame: pd.DataFrame) -> Predictions | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if list(z["image_id"]) == list(frame["image_id"]):
                get = lambda key: z[key] if key in z.files else None  # noqa: E731
                return Predictions(
                    frame,
                    {lvl: get(lvl) for lvl in LEVELS},
                    z["p_malignant"],
                    {lvl: get(f"raw_{lvl}") for lvl in LEVELS},
                    get("ood_score"),
                    get("in_distribution"),
                    get("embeddings"),
                    get("quality"),
                )
    except (OSError, ValueError, KeyError):
        pass  # unreadable cache entry: predict again
    return None


def cached_predictions(
    model_dir: Path,
    load: Callable[[], Any],
    frame: pd.DataFrame,
    images_dir: Path,
    batch_size: int,
    desc: str,
    cache_dir: Path | None,
    progress: bool = True,
) -> Predictions:
    """:func:`predict_split` through a small local cache (``.npz``, read without pickle), so that a
    re-run for new gates, bootstrap or report settings, or the previous candidate judged again as
    the champion, does not predict again. ``load()`` gives the predictor on a cache miss."""
    path = cache_dir / f"{prediction_key(model_dir, frame, images_dir)}.npz" if cache_dir is not None else None
    if path is not None and path.exists():
        hit = _cached(path, frame)
        if hit is not None:
            print(f"evaluate: {desc}: predictions reused from {path}", flush=True)
            return hit
    pred = predict_split(load(), frame, images_dir, batch_size, desc, progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        extra = {
            "ood_score": pred.ood_score,
            "in_distribution": pred.in_distribution,
            "embeddings": pred.embeddings,
            "quality": pred.quality,
        }
        np.savez_compressed(
            tmp,
            image_id=np.asarray(frame["image_id"], dtype=str),
            p_malignant=pred.p_malignant,
            **{lvl: v for lvl, v in pred.probs.items() if v is not None},
            **{f"raw_{lvl}": v for lvl, v in pred.uncalibrated.items() if v is not None},
            **{k: v for k, v in extra.items() if v is not None},
        )
        tmp.replace(path)
        for old in sorted(path.parent.glob("*.npz"), key=lambda q: q.stat().st_mtime, reverse=True)[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    return pred


def prediction_table(pred: Predictions, tax: Taxonomy, threshold: float) -> pd.DataFrame:
    """One prediction row per image (:mod:`pipeline.core.predictions`): ids, the truth at every
    level, every class probability (full precision: metrics recomputed from the file agree with
    the evaluation's exactly), the predicted classes and the decision at ``threshold``."""
    f = pred.frame.reset_index(drop=True)
    ids = f[["image_id", "lesion_id"]]
    return pd.concat(
        [
            ids,
            truth_frame(f["dx"], tax),
            prediction_frame(
                pred.probs,
                tax,
                pred.p_malignant,
                threshold,
                digits=None,
                in_distribution=pred.in_distribution,
                ood_score=pred.ood_score,
                quality_reasons=None if pred.quality is None else quality.from_mask(pred.quality),
            ),
        ],
        axis=1,
    )
