"""The sections of ``params.yaml`` that configure the running service and the monitoring of its
answers: ``serving`` and ``monitor`` (:mod:`pipeline.core.sections` holds the registry and the
pipeline's stages' sections; :mod:`pipeline.core.params` reads them all). Standard library only.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from pipeline.core.layout import INFERENCE_LOG
from pipeline.core.sections import section
from pipeline.core.strict import fail


@section("serving")
@dataclasses.dataclass(frozen=True)
class ServingParams:
    """What the service shows of other patients: the similar confirmed cases' diagnosis, how it was
    confirmed and their similarity always; their age, sex and body site only when
    ``share_case_demographics`` (a decision for the site's data-protection officer). A site's own
    operating point (``lesionflow site add``) needs enough malignant cases that its sensitivity is
    known within ``site_interval_width`` (the width of its confidence interval), and a site whose
    specificity at the target sensitivity is below ``min_site_specificity`` is "not suitable": the
    service gives it probabilities but no decision."""

    share_case_demographics: bool = False
    min_site_specificity: float = 0.30
    site_interval_width: float = 0.20

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_site_specificity < 1.0:
            fail("min_site_specificity", f"must be in [0, 1), got {self.min_site_specificity}")
        if not 0.0 < self.site_interval_width < 1.0:
            fail("site_interval_width", f"must be in (0, 1), got {self.site_interval_width}")


@section("monitor")
@dataclasses.dataclass(frozen=True)
class MonitorParams:
    """Drift monitoring: the ``reference`` stage's profile and the thresholds of the decision.

    A numerical column drifts when Evidently's test flags it (``num_method`` / ``num_threshold``) *and*
    it moved by at least ``min_effect`` reference standard deviations (Wasserstein distance); a
    categorical one when Evidently flags it (``cat_method`` / ``cat_threshold``).
    A check decides *drift* when the share of drifted feature columns reaches ``drift_share``, or a
    column of ``key_features`` drifts, or the embeddings drift (``embedding_method`` ``share``: the
    share of drifted projected-embedding components reaches ``embedding_drift_share``; ``model``:
    Evidently's domain-classifier ROC AUC reaches ``embedding_auc_threshold``). Fewer than
    ``min_batch_size`` current images give *not enough data*.
    """

    max_reference_rows: int = 2000
    seed: int = 0
    projection_dim: int = 32
    tta: bool = False
    batch_size: int = 64
    workers: int = 0
    chunk_size: int = 32
    min_batch_size: int = 100
    num_method: str = "ks"
    num_threshold: float = 0.01
    cat_method: str = "jensenshannon"
    cat_threshold: float = 0.1
    min_effect: float = 0.25
    drift_share: float = 0.25
    key_features: list[str] = dataclasses.field(default_factory=list)
    embedding_method: Literal["share", "model"] = "share"
    embedding_drift_share: float = 0.25
    embedding_auc_threshold: float = 0.6
    embedding_max_rows: int = 1000
    log_url: str = INFERENCE_LOG
    log_metadata: Literal["binned", "exact", "off"] = "binned"
    log_retention_days: float = 90.0
    window_hours: float = 24.0
    retrain_deployment: str = "lesionflow-retrain/lesionflow-retrain-scheduled"

    def __post_init__(self) -> None:
        if self.max_reference_rows < 0:
            fail("max_reference_rows", f"must be 0 (all) or a positive count, got {self.max_reference_rows}")
        for name in ("projection_dim", "batch_size", "chunk_size", "min_batch_size", "embedding_max_rows"):
            if getattr(self, name) < 1:
                fail(name, f"must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            fail("workers", f"must be 0 (all cores) or a positive count, got {self.workers}")
        if self.min_effect < 0:
            fail("min_effect", f"must be >= 0, got {self.min_effect}")
        for name in ("num_threshold", "cat_threshold"):
            if not getattr(self, name) > 0:
                fail(name, f"must be positive, got {getattr(self, name)}")
        for name in ("num_method", "cat_method"):
            if not getattr(self, name).strip():
                fail(name, "empty stattest name")
        for name in ("drift_share", "embedding_drift_share"):
            if not 0.0 < getattr(self, name) <= 1.0:
                fail(name, f"must be in (0, 1], got {getattr(self, name)}")
        if not 0.5 < self.embedding_auc_threshold <= 1.0:
            fail("embedding_auc_threshold", f"must be in (0.5, 1], got {self.embedding_auc_threshold}")
        if not self.window_hours > 0:
            fail("window_hours", f"must be positive, got {self.window_hours}")
        if not self.log_retention_days > 0:
            fail("log_retention_days", f"must be a positive number of days, got {self.log_retention_days}")
        if self.retrain_deployment.count("/") != 1 or not all(self.retrain_deployment.split("/")):
            fail("retrain_deployment", f"must be '<flow name>/<deployment name>', got {self.retrain_deployment!r}")
        for i, name in enumerate(self.key_features):
            if not name.strip():
                fail(f"key_features[{i}]", "empty column name")


@section("label_queue")
@dataclasses.dataclass(frozen=True)
class QueueParams:
    """The labelling queue (``lesionflow label queue``, :mod:`pipeline.evaluation.labelqueue`): after
    every disputed and every refused image, the rest chosen by ``uncertainty`` (``entropy``,
    ``margin`` or ``risk`` of the calibrated probabilities) plus ``novelty_weight`` times the scaled
    distance to the nearest known or already chosen image (a weighted k-centre), interleaved with a
    ``random_share`` drawn at random (with ``seed``); each task shows the ``similar`` most similar
    training cases as context."""

    uncertainty: Literal["entropy", "margin", "risk"] = "entropy"
    novelty_weight: float = 0.0
    random_share: float = 0.5
    seed: int = 0
    similar: int = 3
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.uncertainty not in ("entropy", "margin", "risk"):
            fail("uncertainty", f"must be entropy, margin or risk, got {self.uncertainty!r}")
        if not self.novelty_weight >= 0:
            fail("novelty_weight", f"must be >= 0, got {self.novelty_weight}")
        if not 0.0 <= self.random_share <= 1.0:
            fail("random_share", f"must be in [0, 1], got {self.random_share}")
        for name in ("similar", "batch_size"):
            if getattr(self, name) < 1:
                fail(name, f"must be at least 1, got {getattr(self, name)}")
