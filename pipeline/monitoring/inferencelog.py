"""The service's inference log: one JSON line per prediction, read back by drift monitoring.

Every request the service answers appends one record (:func:`record_for` builds it, :func:`append`
writes it) to ``<log_dir>/inference-YYYY-MM-DD.jsonl`` (one file per UTC day, named by the
record's timestamp). A record holds the timestamp, a request id, the model tag, the image
statistics of :func:`pipeline.features.imagestats.image_statistics` (the EDA statistics plus
sharpness), the metadata (age, sex, localization), the prediction
(class probabilities, predicted class, malignancy probability, decision) and, when the model was
packaged with its reference profile, the penultimate embedding reduced by the profile's fixed
random projection (32 numbers). The image itself is stored only when asked (``image_bytes``).

Appends are atomic at the line level: the line is written with a single ``write`` on a file opened
``O_APPEND`` while holding an exclusive ``flock``, so concurrent workers (threads or processes)
never interleave. :func:`read` returns the records of a time window as one flat DataFrame with the
column names of the reference profile (statistics, metadata, prediction rows as
:mod:`pipeline.core.predictions` names them, ``emb_XX``; a torn last line after a crash is skipped
with a warning naming the file and line).

    from pipeline.monitoring import inferencelog
    log = inferencelog.InferenceLog("logs/inference", reference_dir=model_path / "reference")
    log.write(log.record(stats=log.stats(rgb), metadata=meta, prediction=result, model_tag=tag))
    df = inferencelog.read("logs/inference", start=datetime(...), end=None)

The service logs through :class:`pipeline.serving.logqueue.BackgroundLog`, a background thread,
so that no answer waits for its log record.

Depends on NumPy, SciPy and pandas only (no Evidently, no torch): the service imports it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.errors import LesionflowError
from pipeline.core.metadata import FIELDS
from pipeline.core.predictions import DECISION, IN_DISTRIBUTION, P_MALIGNANT, pred_column, prob_column
from pipeline.features.imagestats import image_statistics
from pipeline.monitoring.profile import PROJECTION_FILE, embedding_columns, read_feature_config

try:  # POSIX; on other systems appends rely on O_APPEND alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

SCHEMA = 1
FILE_PREFIX = "inference-"
FILE_SUFFIX = ".jsonl"
_FILE_RE = re.compile(r"^inference-(\d{4}-\d{2}-\d{2})\.jsonl$")

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
    """The day file of ``when`` (UTC)."""
    return Path(log_dir) / f"{FILE_PREFIX}{as_utc(when).date().isoformat()}{FILE_SUFFIX}"


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


def append(record: Mapping[str, Any], log_dir: Path | str) -> Path:
    """Append ``record`` as one JSON line to its UTC day file under ``log_dir``; return the file.

    One ``write`` of the whole line on an ``O_APPEND`` descriptor under an exclusive ``flock``:
    concurrent writers never interleave and a reader never sees half a record (except a line torn
    by a crash, which :func:`read` skips)."""
    if "timestamp" not in record:
        raise InferenceLogError("record: missing field 'timestamp'")
    when = as_utc(record["timestamp"])
    line = (json.dumps(record, allow_nan=False, separators=(",", ":"), default=_clean) + "\n").encode("utf-8")
    path = log_file(log_dir, when)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return path


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
        self.log_dir = Path(log_dir)
        self.store_images = store_images
        self.enabled = enabled
        self.projection: np.ndarray | None = None
        self.feature_config = None
        if reference_dir is not None and Path(reference_dir, PROJECTION_FILE).exists():
            self.projection = np.load(Path(reference_dir, PROJECTION_FILE), allow_pickle=False)
            self.feature_config = read_feature_config(Path(reference_dir))

    @classmethod
    def from_env(cls, model_path: Path | str) -> InferenceLog:
        """``$LESIONFLOW_INFERENCE_LOG`` (a directory; ``off`` disables; default ``logs/inference``),
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

    def write(self, record: Mapping[str, Any] | None) -> Path | None:
        if not self.enabled or record is None:
            return None
        try:
            return append(record, self.log_dir)
        except (OSError, InferenceLogError, TypeError, ValueError) as exc:
            logger.warning("inference log: could not append to %s: %s", self.log_dir, exc)
            return None


# ----------------------------------------------------------------------------------------------
# reading


def _day_files(log_dir: Path, start: datetime | None, end: datetime | None) -> list[Path]:
    out = []
    for p in sorted(log_dir.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}")):
        m = _FILE_RE.match(p.name)
        if not m:
            continue
        day = date.fromisoformat(m.group(1))
        if start is not None and day < start.date():
            continue
        if end is not None and day > end.date():
            continue
        out.append(p)
    return out


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
    """The records with ``start <= timestamp < end`` (either bound optional; naive = UTC) as a flat
    DataFrame (see :func:`flatten`), sorted by time, ``timestamp`` as UTC datetimes. Lines that are
    not valid JSON records (a line torn by a crash) are skipped with a warning naming file and line;
    the skipped places are in ``df.attrs["skipped"]``."""
    log_dir = Path(log_dir)
    start_dt = as_utc(start) if start is not None else None
    end_dt = as_utc(end) if end is not None else None
    rows, skipped = [], []
    if log_dir.is_dir():
        for path in _day_files(log_dir, start_dt, end_dt):
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        ts = as_utc(rec["timestamp"])
                    except (json.JSONDecodeError, KeyError, TypeError, InferenceLogError):
                        skipped.append(f"{path}:{lineno}")
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
