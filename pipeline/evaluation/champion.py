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

from pipeline.core.params import EvaluateParams
from pipeline.core.taxonomy import Taxonomy
from pipeline.evaluation import metrics
from pipeline.evaluation.predictions import Predictions, binary_truth, cached_predictions
from pipeline.evaluation.summary import flat_for_gates, headline, level_metrics
from pipeline.model import bundle


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
    if not all((champion_dir / name).exists() for name in bundle.TRAINED_FILES):
        return None
    md5 = bundle.model_md5(champion_dir)
    champ = _Champion(champion_dir, load_model, images_dir, p, cache_dir, progress)
    # the champion may be this very model (judged before it was packaged): no need to predict again
    same = bundle.fingerprint(champion_dir) == bundle.fingerprint(model_dir)
    preds = dict(own) if same else {"test": champ.predict(frames["test"], "test")}
    op = bundle.operating_point(champion_dir)
    if op is not None:
        thr, source = op.threshold, f"from {champion_dir / bundle.OPERATING_POINT_FILE}"
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
