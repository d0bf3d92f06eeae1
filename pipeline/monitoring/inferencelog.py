"""The service's inference log: one JSON line per prediction, read back by drift monitoring.

Every request the service answers appends one record (:func:`record_for` builds it, :func:`append`
writes it) to the log's location (:mod:`pipeline.monitoring.logstore`): a local folder of day files
``inference-YYYY-MM-DD.jsonl``, or an object-store URL (``s3://bucket/prefix``) where each replica
writes its own append-only segment objects per UTC day. A record holds the timestamp, a request
id, the model tag, the image statistics of :func:`pipeline.features.imagestats.image_statistics`
(the EDA statistics plus sharpness), the metadata (age, sex, localization), the prediction (class
probabilities, predicted class, malignancy probability, decision) and, when the model was
packaged with its reference profile, the penultimate embedding reduced by the profile's fixed
random projection (32 numbers). The image itself is stored only when asked (``image_bytes``).

Locally, appends are atomic at the line level (one ``write`` under ``flock``), so concurrent
workers never interleave; on object storage no object is ever shared or overwritten.
:func:`read` returns the records of a time window, from every writer, as one flat DataFrame with the
column names of the reference profile (statistics, metadata, prediction rows as
:mod:`pipeline.core.predictions` names them, ``emb_XX``; a torn last line after a crash is skipped
with a warning naming the file and line).

    from pipeline.monitoring import inferencelog
    log = inferencelog.InferenceLog("logs/inference", reference_dir=model_path / "reference")
    log.write(log.record(stats=log.stats(rgb), metadata=meta, prediction=result, model_tag=tag))
    df = inferencelog.read("logs/inference", start=datetime(...), end=None)   # or "s3://bucket/log"

The service logs through :class:`pipeline.serving.logqueue.BackgroundLog` (a low-priority writer
process), so that no answer waits for its log record.

Depends on NumPy, SciPy and pandas only (fsspec for an object-store URL; no Evidently, no torch):
the service imports it.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import LesionflowError
from pipeline.core.metadata import FIELDS
from pipeline.core.predictions import DECISION, IN_DISTRIBUTION, P_MALIGNANT, pred_column, prob_column
from pipeline.features.imagestats import image_statistics
from pipeline.monitoring import logstore
from pipeline.monitoring.profile import PROJECTION_FILE, embedding_columns, read_feature_config

SCHEMA = 1
#: Records an object-store writer buffers before it puts a segment, and its oldest record's age at most.
ROLL_RECORDS = int(os.environ.get("LESIONFLOW_LOG_ROLL_RECORDS", "500"))
ROLL_SECONDS = float(os.environ.get("LESIONFLOW_LOG_ROLL_SECONDS", "60"))
_writers: dict[str, logstore.SegmentWriter] = {}

logger = logging.getLogger(__name__)


class InferenceLogError(LesionflowError, ValueError):
    """A record that cannot be logged (missing field, bad timestamp): the message names it."""


# ----------------------------------------------------------------------------------------------
# small helpers


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(ts: datetime | str | pd.Timestamp) -> datetime:
    """A timezone-aware UTC datetime from a datetime (naive = UTC) or an ISO 8601 string."""
    if isinstance(ts, pd.Timestamp):
        ts = ts.to_pydatetime()
    if isinstance(ts, str):
        try:
            ts = datetime.fromisoformat(ts.strip().replace("Z", "+00:00"))
        except ValueError:
            raise InferenceLogError(f"timestamp: not an ISO 8601 time: {ts!r}") from None
    if not isinstance(ts, datetime):
        raise InferenceLogError(f"timestamp: expected a datetime or ISO string, got {ts!r}")
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def iso(ts: datetime) -> str:
    return as_utc(ts).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def log_file(log_dir: Path | str, when: datetime) -> Path:
    """The local day file of ``when`` (UTC)."""
    return logstore.day_file(log_dir, as_utc(when).date())


def project(embedding: Any, projection: np.ndarray | None) -> list[float] | None:
    """One embedding (or a row of a batch) through the reference profile's projection matrix."""
    if projection is None or embedding is None:
        return None
    e = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if e.shape[0] != projection.shape[0]:
        raise InferenceLogError(
            f"embedding: {e.shape[0]} values but the projection expects {projection.shape[0]} "
            "(the reference profile belongs to another model)"
        )
    return [float(v) for v in e @ projection]


# ----------------------------------------------------------------------------------------------
# building a record


def _prediction_part(prediction: Mapping[str, Any], row: int = 0) -> dict[str, Any]:
    """The prediction of one image from either the service's response (``dx_probabilities`` ...)
    or :meth:`pipeline.model.inference.Predictor.predict`'s output (row ``row``)."""
    out: dict[str, Any] = {}
    for level in ("dx", "risk", "binary"):
        probs = prediction.get(f"{level}_probabilities")
        if probs is None and prediction.get(f"{level}_probs") is not None and prediction.get("classes"):
            arr = np.asarray(prediction[f"{level}_probs"])[row]
            probs = dict(zip(prediction["classes"][level], (float(v) for v in arr)))
        if probs:
            out["level"], out["probabilities"] = level, {str(k): float(v) for k, v in probs.items()}
            break
    if "probabilities" not in out:
        raise InferenceLogError("prediction: no class probabilities (dx_probabilities / dx_probs ...)")
    probs = out["probabilities"]
    out["pred_class"] = max(probs, key=probs.get)
    p_mal = prediction.get("p_malignant")
    if p_mal is not None and np.ndim(p_mal) > 0:
        p_mal = np.asarray(p_mal)[row]
    out["p_malignant"] = _clean(float(p_mal)) if p_mal is not None else None
    decision = prediction.get("decision")
    out["decision"] = None if decision is None else str(decision)
    inside = prediction.get("in_distribution")
    if inside is not None and np.ndim(inside) > 0:
        inside = np.asarray(inside)[row]
    out["in_distribution"] = None if inside is None else bool(inside)
    return out


def make_record(
    *,
    stats: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    prediction: Mapping[str, Any],
    model_tag: str,
    row: int = 0,
    embedding: Iterable[float] | None = None,
    request_id: str | None = None,
    timestamp: datetime | None = None,
    source: str | None = None,
    image_bytes: bytes | None = None,
) -> dict[str, Any]:
    """A log record from already computed statistics (see :func:`record_for`)."""
    meta = dict(metadata or {})
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": iso(timestamp or utcnow()),
        "request_id": request_id or uuid.uuid4().hex,
        "model_tag": str(model_tag),
        "stats": {str(k): _clean(v) for k, v in stats.items()},
        "metadata": {k: _clean(meta.get(k)) for k in FIELDS},
        "prediction": _prediction_part(prediction, row),
    }
    if source is not None:
        rec["source"] = str(source)
    if embedding is not None:
        rec["embedding"] = [float(v) for v in embedding]
    if image_bytes is not None:
        rec["image_b64"] = base64.b64encode(image_bytes).decode("ascii")
    return rec


def record_for(
    rgb: np.ndarray,
    metadata: Mapping[str, Any] | None,
    prediction: Mapping[str, Any],
    model_tag: str,
    *,
    row: int = 0,
    projection: np.ndarray | None = None,
    feature_config: Any = None,
    request_id: str | None = None,
    timestamp: datetime | None = None,
    source: str | None = None,
    image_bytes: bytes | None = None,
) -> dict[str, Any]:
    """The log record of one prediction: statistics of ``rgb`` (an (H, W, 3) uint8 array), the
    metadata, the prediction (the service's response dict, or ``Predictor.predict``'s output and
    ``row``) and the model tag. With ``projection`` (the reference profile's ``projection.npy``) and
    an ``embeddings`` entry in ``prediction`` (or ``embedding``), the projected embedding is logged.
    ``image_bytes`` is stored (base64) only when given."""
    stats = image_statistics(rgb, feature_config)
    emb = prediction.get("embedding")
    if emb is None and prediction.get("embeddings") is not None:
        emb = np.asarray(prediction["embeddings"])[row]
    # only the projected embedding is logged (the raw one is large and means nothing to the monitor)
    embedding = project(emb, projection) if emb is not None and projection is not None else None
    return make_record(
        stats=stats,
        metadata=metadata,
        prediction=prediction,
        model_tag=model_tag,
        row=row,
        embedding=embedding,
        request_id=request_id,
        timestamp=timestamp,
        source=source,
        image_bytes=image_bytes,
    )


# ----------------------------------------------------------------------------------------------
# writing


def segment_writer(url: str) -> logstore.SegmentWriter:
    """This process's writer of an object-store log (one per URL)."""
    if url not in _writers:
        _writers[url] = logstore.SegmentWriter(url, ROLL_RECORDS, ROLL_SECONDS)
    return _writers[url]


def append(record: Mapping[str, Any], location: Path | str) -> str:
    """Append ``record`` as one JSON line for its UTC day at ``location`` (a local folder: its day
    file, under ``flock``; an object-store URL: this process's buffered segment); returns the file
    or object name."""
    if "timestamp" not in record:
        raise InferenceLogError("record: missing field 'timestamp'")
    day = as_utc(record["timestamp"]).date()
    line = (json.dumps(record, allow_nan=False, separators=(",", ":"), default=_clean) + "\n").encode("utf-8")
    if logstore.is_url(location):
        return segment_writer(str(location)).append(day, line)
    return str(logstore.append_local(location, day, line))


class InferenceLog:
    """What the service holds to log its predictions (see the module docstring).

    ``reference_dir``: the reference profile packaged with the model (``projection.npy`` and
    ``profile.json``); without it, statistics use the default feature configuration and no
    embedding is logged. ``enabled=False`` makes every call a no-op. :meth:`write` never raises:
    a full disk must not stop the service (it logs a warning instead).
    """

    def __init__(
        self,
        log_dir: Path | str,
        reference_dir: Path | str | None = None,
        store_images: bool = False,
        enabled: bool = True,
    ):
        self.log_dir = str(log_dir)  # a local folder or an object-store URL
        self.store_images = store_images
        self.enabled = enabled
        self.projection: np.ndarray | None = None
        self.feature_config = None
        if reference_dir is not None and Path(reference_dir, PROJECTION_FILE).exists():
            self.projection = np.load(Path(reference_dir, PROJECTION_FILE), allow_pickle=False)
            self.feature_config = read_feature_config(Path(reference_dir))

    @classmethod
    def from_env(cls, model_path: Path | str) -> InferenceLog:
        """``$LESIONFLOW_INFERENCE_LOG`` (a folder or an object-store URL; ``off`` disables; default
        ``logs/inference``),
        ``$LESIONFLOW_LOG_IMAGES=1`` to store images; the profile under ``model_path/reference``."""
        target = os.environ.get("LESIONFLOW_INFERENCE_LOG", "logs/inference")
        enabled = target.strip().lower() not in ("off", "0", "false", "")
        return cls(
            target if enabled else ".",
            Path(model_path) / "reference",
            store_images=os.environ.get("LESIONFLOW_LOG_IMAGES", "0") == "1",
            enabled=enabled,
        )

    def stats(self, rgb: np.ndarray) -> dict[str, Any] | None:
        """The image statistics a record holds (None when logging is off)."""
        return image_statistics(rgb, self.feature_config) if self.enabled else None

    def record(
        self,
        *,
        stats: Mapping[str, Any] | None,
        metadata: Mapping[str, Any] | None,
        prediction: Mapping[str, Any],
        model_tag: str,
        embedding: Iterable[float] | None = None,
        request_id: str | None = None,
        source: str | None = None,
        image_bytes: bytes | None = None,
    ) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        return make_record(
            stats=stats or {},
            metadata=metadata,
            prediction=prediction,
            model_tag=model_tag,
            embedding=embedding,
            request_id=request_id,
            source=source,
            image_bytes=image_bytes if self.store_images else None,
        )

    def log(
        self,
        rgb: np.ndarray,
        metadata: Mapping[str, Any] | None,
        prediction: Mapping[str, Any],
        model_tag: str,
        *,
        source: str | None = None,
        request_id: str | None = None,
        image_bytes: bytes | None = None,
        timestamp: datetime | None = None,
    ) -> Path | None:
        """The service's one-line hook: :func:`record_for` with this log's projection and feature
        configuration, then :meth:`write`; ``timestamp``: when the prediction was made (default
        now). Never raises (a failure is a logged warning and ``None``)."""
        if not self.enabled:
            return None
        try:
            rec = record_for(
                rgb,
                metadata,
                prediction,
                model_tag,
                projection=self.projection,
                feature_config=self.feature_config,
                request_id=request_id,
                source=source,
                timestamp=timestamp,
                image_bytes=image_bytes if self.store_images else None,
            )
        except Exception as exc:  # noqa: BLE001 - logging must never fail a prediction
            logger.warning("inference log: could not build the record: %s", exc)
            return None
        return self.write(rec)

    def write(self, record: Mapping[str, Any] | None) -> str | None:
        if not self.enabled or record is None:
            return None
        try:
            return append(record, self.log_dir)
        except (OSError, InferenceLogError, TypeError, ValueError) as exc:
            logger.warning("inference log: could not append to %s: %s", self.log_dir, exc)
            return None

    def tick(self) -> None:
        """Put an object-store segment whose oldest record is due (no-op for a local log)."""
        if self.enabled and logstore.is_url(self.log_dir):
            try:
                segment_writer(self.log_dir).tick()
            except Exception as exc:  # noqa: BLE001 - logging must never fail the service
                logger.warning("inference log: could not write a segment to %s: %s", self.log_dir, exc)

    def flush(self) -> None:
        """Put the buffered object-store segment now (no-op for a local log)."""
        if self.enabled and logstore.is_url(self.log_dir):
            try:
                segment_writer(self.log_dir).flush()
            except Exception as exc:  # noqa: BLE001
                logger.warning("inference log: could not write a segment to %s: %s", self.log_dir, exc)


# ----------------------------------------------------------------------------------------------
# reading


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as a flat row: statistics and metadata under their own names, the prediction as
    prediction columns (``p_<level>_<class>``, ``<level>_pred``, ``p_malignant``, ``decision``,
    ``in_distribution``) and
    the projected embedding as ``emb_00``..."""
    row: dict[str, Any] = {
        "timestamp": record.get("timestamp"),
        "request_id": record.get("request_id"),
        "model_tag": record.get("model_tag"),
    }
    if "source" in record:
        row["source"] = record["source"]
    row.update(record.get("stats") or {})
    row.update({k: (record.get("metadata") or {}).get(k) for k in FIELDS})
    pred = record.get("prediction") or {}
    level = pred.get("level")
    row["pred_level"] = level
    if level:
        row[pred_column(level)] = pred.get("pred_class")
        for cls, p in (pred.get("probabilities") or {}).items():
            row[prob_column(level, cls)] = p
    row[P_MALIGNANT] = pred.get("p_malignant")
    row[DECISION] = pred.get("decision")
    row[IN_DISTRIBUTION] = pred.get("in_distribution")
    emb = record.get("embedding")
    if emb is not None:
        row.update(zip(embedding_columns(len(emb)), emb))
    if "image_b64" in record:
        row["image_b64"] = record["image_b64"]
    return row


def read(log_dir: Path | str, start: datetime | str | None = None, end: datetime | str | None = None) -> pd.DataFrame:
    """The records with ``start <= timestamp < end`` (either bound optional; naive = UTC) at a local
    folder or object-store URL, from every writer, as a flat DataFrame (see :func:`flatten`), sorted
    by time, ``timestamp`` as UTC datetimes. Lines that are not valid JSON records (a line torn by a
    crash) are skipped with a warning naming file and line; the skipped places are in
    ``df.attrs["skipped"]``."""
    start_dt = as_utc(start) if start is not None else None
    end_dt = as_utc(end) if end is not None else None
    rows, skipped = [], []
    for name, lineno, line in logstore.iter_lines(log_dir, start_dt, end_dt):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ts = as_utc(rec["timestamp"])
        except (json.JSONDecodeError, KeyError, TypeError, InferenceLogError):
            skipped.append(f"{name}:{lineno}")
            continue
        if (start_dt is not None and ts < start_dt) or (end_dt is not None and ts >= end_dt):
            continue
        rows.append(flatten(rec))
    if skipped:
        warnings.warn(
            f"inference log: skipped {len(skipped)} unreadable line(s): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""),
            stacklevel=2,
        )
    df = pd.DataFrame(rows)
    if len(df):
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
        df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    df.attrs["skipped"] = skipped
    return df


def window(hours: float, now: datetime | None = None) -> tuple[datetime, datetime]:
    """``(now - hours, now)`` in UTC: the latest window the monitoring flow checks."""
    end = as_utc(now) if now is not None else utcnow()
    return end - timedelta(hours=hours), end
