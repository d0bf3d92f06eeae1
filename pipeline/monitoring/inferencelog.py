"""The service's inference log: one JSON line per answer, read back by drift monitoring.

Every answer the service gives goes to the log as one :class:`pipeline.monitoring.logrecord.Answer`,
which :meth:`InferenceLog.log` turns into a record (:func:`pipeline.monitoring.logrecord.record_for`)
and :func:`append` writes at the log's location (:mod:`pipeline.monitoring.logstore`, which also
decides where that is): a local folder of day files ``inference-YYYY-MM-DD.jsonl``, or an
object-store URL (``s3://bucket/prefix``) where each replica writes its own append-only segment
objects per UTC day.

Locally, appends are atomic at the line level (one ``write`` under ``flock``), so concurrent
workers never interleave; on object storage no object is ever shared or overwritten.
:func:`read` returns the records of a time window, from every writer, as one flat DataFrame with the
column names of the reference profile (:func:`pipeline.monitoring.logrecord.flatten`; a torn last
line after a crash is skipped with a warning naming the file and line).

    from pipeline.monitoring import inferencelog, logstore
    log = inferencelog.InferenceLog.for_model(model_path, logstore.location())   # a packaged model's log
    log.log(Answer(rgb, response, tag, metadata=meta, embedding=emb))
    df = inferencelog.read("logs/inference", start=datetime(...), end=None)   # or "s3://bucket/log"

The service logs through :class:`pipeline.serving.logqueue.BackgroundLog` (a low-priority writer
process), so that no answer waits for its log record.

Depends on NumPy, SciPy and pandas only (fsspec for an object-store URL; no Evidently, no torch):
the service imports it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.model.bundle import REFERENCE_DIR
from pipeline.monitoring import logstore
from pipeline.monitoring.logrecord import Answer, InferenceLogError, as_utc, clean, flatten, record_for, utcnow
from pipeline.monitoring.profile import PROJECTION_FILE, read_feature_config

__all__ = ["Answer", "InferenceLog", "InferenceLogError", "append", "as_utc", "log_file", "read", "utcnow", "window"]

#: Records an object-store writer buffers before it puts a segment, and its oldest record's age at most.
ROLL_RECORDS = int(os.environ.get("LESIONFLOW_LOG_ROLL_RECORDS", "500"))
ROLL_SECONDS = float(os.environ.get("LESIONFLOW_LOG_ROLL_SECONDS", "60"))
_writers: dict[str, logstore.SegmentWriter] = {}

logger = logging.getLogger(__name__)


def log_file(log_dir: Path | str, when: datetime) -> Path:
    """The local day file of ``when`` (UTC)."""
    return logstore.day_file(log_dir, as_utc(when).date())


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
    line = (json.dumps(record, allow_nan=False, separators=(",", ":"), default=clean) + "\n").encode("utf-8")
    if logstore.is_url(location):
        return segment_writer(str(location)).append(day, line)
    return str(logstore.append_local(location, day, line))


class InferenceLog:
    """What the service holds to log its answers (see the module docstring).

    ``location``: a local folder or an object-store URL, None for no log
    (:func:`pipeline.monitoring.logstore.location`). ``reference_dir``: the reference profile
    packaged with the model (``projection.npy`` and ``profile.json``); without it, statistics use the
    default feature configuration and no embedding is logged. ``store_images``: keep each answer's
    uploaded file. :meth:`log` and :meth:`write` never raise: a full disk must not stop the service.
    """

    def __init__(
        self,
        location: Path | str | None,
        reference_dir: Path | str | None = None,
        store_images: bool = False,
        metadata: str = "binned",
    ):
        self.location = None if location is None else str(location)
        self.store_images = store_images
        self.metadata = metadata
        self.projection: np.ndarray | None = None
        self.feature_config = None
        if reference_dir is not None and Path(reference_dir, PROJECTION_FILE).exists():
            self.projection = np.load(Path(reference_dir, PROJECTION_FILE), allow_pickle=False)
            self.feature_config = read_feature_config(Path(reference_dir))

    @property
    def enabled(self) -> bool:
        return self.location is not None

    @classmethod
    def for_model(cls, model_path: Path | str, location: str | None, metadata: str = "binned") -> InferenceLog:
        """The log of the model packaged at ``model_path`` (its reference profile) at ``location``,
        keeping ``metadata`` of each request (``monitor.log_metadata``); ``$LESIONFLOW_LOG_IMAGES=1``
        stores the uploaded files (without their EXIF and other embedded metadata)."""
        return cls(
            location,
            Path(model_path) / REFERENCE_DIR,
            store_images=logstore.images_kept(),
            metadata=metadata,
        )

    def log(self, answer: Answer) -> str | None:
        """The record of ``answer`` (:func:`pipeline.monitoring.logrecord.record_for` with this log's
        projection and feature configuration), written; the file or object name, or None when the
        log is off or the answer could not be logged (a warning says why)."""
        if not self.enabled:
            return None
        try:
            rec = record_for(answer, self.projection, self.feature_config, self.store_images, self.metadata)
        except Exception as exc:  # noqa: BLE001 - logging must never fail a prediction
            logger.warning("inference log: could not build the record: %s", exc)
            return None
        return self.write(rec)

    def write(self, record: Mapping[str, Any] | None) -> str | None:
        if not self.enabled or record is None:
            return None
        try:
            return append(record, self.location)
        except (OSError, InferenceLogError, TypeError, ValueError) as exc:
            logger.warning("inference log: could not append to %s: %s", self.location, exc)
            return None

    def tick(self) -> None:
        """Put an object-store segment whose oldest record is due (no-op for a local log)."""
        if self.enabled and logstore.is_url(self.location):
            try:
                segment_writer(self.location).tick()
            except Exception as exc:  # noqa: BLE001 - logging must never fail the service
                logger.warning("inference log: could not write a segment to %s: %s", self.location, exc)

    def flush(self) -> None:
        """Put the buffered object-store segment now (no-op for a local log)."""
        if self.enabled and logstore.is_url(self.location):
            try:
                segment_writer(self.location).flush()
            except Exception as exc:  # noqa: BLE001
                logger.warning("inference log: could not write a segment to %s: %s", self.location, exc)


# ----------------------------------------------------------------------------------------------
# reading


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
