"""The champion on the same test split: what the no-regression gates compare with.

The champion (the packaged model the flow exports to ``artifacts/champion/``) is predicted through
the same cached prediction path and judged at its own stored operating threshold (or, without
one, a threshold chosen on val like the candidate's).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core import fsutil, lineage
from pipeline.core.params import EvaluateParams
from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation import metrics
from pipeline.evaluation.predictions import Predictions, binary_truth, cached_predictions
from pipeline.evaluation.summary import flat_for_gates, headline, level_metrics
from pipeline.model.checkpoint import CONFIG_FILE, MODEL_FILE


class _Champion:
    """The champion's model, loaded only when a prediction is not in the cache."""

    def __init__(
        self,
        folder: Path,
        load_model: Callable[[Path], Any],
        images_dir: Path,
        p: EvaluateParams,
        cache_dir: Path | None,
        progress: bool,
    ):
        self.folder, self._load, self.images_dir, self.p = folder, load_model, images_dir, p
        self.cache_dir, self.progress, self._model = cache_dir, progress, None

    def model(self) -> Any:
        if self._model is None:
            self._model = self._load(self.folder)
        return self._model

    def predict(self, frame: pd.DataFrame, split: str) -> Predictions:
        return cached_predictions(
            self.folder,
            self.model,
            frame,
            self.images_dir,
            self.p.batch_size,
            f"champion {split}",
            self.cache_dir,
            self.progress,
        )


def evaluate_champion(
    champion_dir: Path,
    model_dir: Path,
    own: Mapping[str, Predictions],
    frames: Mapping[str, pd.DataFrame],
    images_dir: Path,
    tax: Taxonomy,
    p: EvaluateParams,
    load_model: Callable[[Path], Any],
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """The champion's headline metrics on the same test split (None when there is no champion)."""
    weights, config = champion_dir / MODEL_FILE, champion_dir / CONFIG_FILE
    if not (weights.exists() and config.exists()):
        return None
    md5 = lineage.file_md5(weights)
    champ = _Champion(champion_dir, load_model, images_dir, p, cache_dir, progress)
    same = (
        md5 == lineage.file_md5(model_dir / MODEL_FILE)
        and config.read_bytes() == (model_dir / CONFIG_FILE).read_bytes()
    )
    # the champion may be this very model (judged before it was packaged): no need to predict again
    preds = dict(own) if same else {"test": champ.predict(frames["test"], "test")}
    op = fsutil.read_json(champion_dir / "operating_point.json")
    if op is not None and "threshold" in op:
        thr, source = float(op["threshold"]), f"from {champion_dir / 'operating_point.json'}"
    else:
        val = preds.get("val") or champ.predict(frames["val"], "val")
        thr = metrics.choose_threshold(binary_truth(frames["val"], tax), val.p_malignant, p.target_sensitivity)[
            "threshold"
        ]
        source = "chosen on val (no operating_point.json with the champion)"
    head = headline(level_metrics(preds["test"], tax, thr, p, with_ci=False))
    return {
        "dir": str(champion_dir),
        "md5": md5,
        "threshold": thr,
        "threshold_source": source,
        "metrics": head,
        "flat": flat_for_gates(head),
    }
