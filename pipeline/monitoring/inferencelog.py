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
import warnings
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.model.bundle import REFERENCE_DIR
from pipeline.monitoring import logstore
from pipeline.monitoring.logrecord import (
    ANSWER,
    DISPUTE,
    FEATURES,
    STATISTICS_EXPECTED,
    TALLY,
    Answer,
    InferenceLogError,
    as_utc,
    features_record,
    flatten,
    record_for,
    to_line,
    utcnow,
)
from pipeline.monitoring.profile import PROJECTION_FILE, read_feature_config

__all__ = ["Answer", "InferenceLog", "InferenceLogError", "append", "as_utc", "log_file", "read", "utcnow", "window"]

logger = logging.getLogger(__name__)


def log_file(log_dir: Path | str, when: datetime) -> Path:
    """The local day file of ``when`` (UTC)."""
    return logstore.day_file(log_dir, as_utc(when).date())


# ----------------------------------------------------------------------------------------------
# writing


def append(record: Mapping[str, Any], location: Path | str) -> str:
    """Append ``record`` as one JSON line for its UTC day at ``location`` (a local folder: its day
    file, under ``flock``; an object-store URL: this process's spool segment, put by
    :func:`pipeline.monitoring.logstore.flush` or the service's uploader); returns the file, or the
    spool folder. An ``OSError`` when the line could not be kept (a full spool included)."""
    return logstore.append_line(location, *to_line(record))


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
        """The combined record of ``answer`` (:func:`pipeline.monitoring.logrecord.record_for` with this
        log's projection and feature configuration), written; the file or spool, or None when the
        log is off or the answer could not be logged (a warning says why)."""
        if not self.enabled:
            return None
        try:
            rec = record_for(answer, self.projection, self.feature_config, self.store_images, self.metadata)
        except Exception as exc:  # noqa: BLE001 - logging must never fail a prediction
            logger.warning("inference log: could not build the record: %s", exc)
            return None
        return self.write(rec)

    def log_features(self, answer: Answer) -> str | None:
        """The features record of ``answer`` (:func:`pipeline.monitoring.logrecord.features_record`:
        what the log's writer process adds to the answer record the service wrote), written."""
        if not self.enabled:
            return None
        try:
            rec = features_record(answer, self.feature_config, self.store_images)
        except Exception as exc:  # noqa: BLE001
            logger.warning("inference log: could not compute the statistics of %s: %s", answer.request_id, exc)
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
        """Roll an object-store spool segment whose oldest record is due (no-op for a local log)."""
        if self.enabled and logstore.is_url(self.location):
            logstore.spool(self.location)[0].tick()

    def roll(self) -> None:
        """Roll this process's open spool segment of an object-store log, ready for an uploader
        (the service's; no-op for a local log)."""
        if self.enabled and logstore.is_url(self.location):
            logstore.spool(self.location)[0].roll()

    def flush(self) -> bool:
        """Put what this process spooled for an object-store log now (True for a local log)."""
        return not self.enabled or logstore.flush(self.location)


#: The route of the answers ``lesionflow predict --log`` writes.
PREDICT_ROUTE = "lesionflow predict"


def log_prediction_rows(
    rows: pd.DataFrame, model_path: Path | str, model_tag: str, location: str, metadata: str = "binned"
) -> tuple[int, int]:
    """Write one record per row of ``lesionflow predict``'s table (``file``, the probability
    columns ``p_<level>_<class>``, ``p_malignant``, ``decision``, ``in_distribution``,
    ``ood_score``), as the service would for that image: the statistics of the file's image, its
    sha256 and size, route :data:`PREDICT_ROUTE` (never the file's name or path). Returns
    ``(written, failed)``; an object-store log's spool is put before returning."""
    import hashlib

    from pipeline.core.images import decode_rgb
    from pipeline.core.predictions import OOD_SCORE, QUALITY, THRESHOLD, split_reasons

    log = InferenceLog.for_model(model_path, location, metadata)
    written = failed = 0
    for row in rows.to_dict("records"):
        prediction: dict[str, Any] = {}
        for level in ("dx", "risk", "binary"):
            prefix = f"p_{level}_"
            probs = {k[len(prefix) :]: float(v) for k, v in row.items() if k.startswith(prefix) and pd.notna(v)}
            if probs:
                prediction[f"{level}_probabilities"] = probs
        for key in ("p_malignant", "decision", "in_distribution", OOD_SCORE, THRESHOLD, "site"):
            value = row.get(key)
            prediction[key] = None if value is None or (isinstance(value, float) and np.isnan(value)) else value
        if isinstance(row.get(QUALITY), str):
            prediction["quality_reasons"] = split_reasons(row[QUALITY])
        try:
            data = Path(row["file"]).read_bytes()
            rgb = decode_rgb(data, str(row["file"]))
        except (OSError, ValueError) as exc:
            logger.warning("inference log: %s: %s", row["file"], exc)
            failed += 1
            continue
        answer = Answer(rgb, prediction, model_tag, route=PREDICT_ROUTE)
        answer.image_sha256, answer.image_nbytes = hashlib.sha256(data).hexdigest(), len(data)
        if log.log(answer) is None:
            failed += 1
        else:
            written += 1
    log.flush()
    return written, failed


# ----------------------------------------------------------------------------------------------
# reading


def read(log_dir: Path | str, start: datetime | str | None = None, end: datetime | str | None = None) -> pd.DataFrame:
    """The answers with ``start <= timestamp < end`` (either bound optional; naive = UTC) at a local
    folder or object-store URL, from every writer, as a flat DataFrame (see :func:`flatten`), sorted
    by time, ``timestamp`` as UTC datetimes: each answer record joined with the features record of
    its request id (``has_statistics`` False where there is none), or a combined record, and the
    last dispute of it (``disputed_dx``, ``dispute_note``). Lines that
    are not valid JSON records (a line torn by a crash) are skipped with a warning naming file and
    line; the skipped places are in ``df.attrs["skipped"]``, and what the window should hold
    against what it holds in ``df.attrs["coverage"]`` (:func:`coverage`)."""
    start_dt = as_utc(start) if start is not None else None
    end_dt = as_utc(end) if end is not None else None
    answers: dict[str, dict[str, Any]] = {}
    features: dict[str, Mapping[str, Any]] = {}
    tallies: list[Mapping[str, Any]] = []
    disputes: dict[str, Mapping[str, Any]] = {}
    skipped = []
    for name, lineno, line in logstore.iter_lines(log_dir, start_dt, end_dt):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ts = as_utc(rec["timestamp"])
        except (json.JSONDecodeError, KeyError, TypeError, InferenceLogError):
            skipped.append(f"{name}:{lineno}")
            continue
        kind = rec.get("kind")
        if kind == TALLY:
            tallies.append({**rec, "_ts": ts})
            continue
        if (start_dt is not None and ts < start_dt) or (end_dt is not None and ts >= end_dt):
            continue
        rid = str(rec.get("request_id"))
        if kind == FEATURES:
            features.setdefault(rid, rec)
        elif kind == DISPUTE:
            disputes[rid] = rec
        elif kind in (None, ANSWER) and rid not in answers:  # None: a combined record (schema 1)
            answers[rid] = rec
    rows = [_joined(rec, features.get(rid), disputes.get(rid)) for rid, rec in answers.items()]
    _warn_skipped(skipped)
    df = pd.DataFrame(rows)
    if len(df):
        df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True, format="ISO8601")
        df = df.sort_values("timestamp", kind="stable").reset_index(drop=True)
    df.attrs["skipped"] = skipped
    df.attrs["coverage"] = coverage(df, tallies, start_dt, end_dt)
    return df


def _warn_skipped(skipped: list[str]) -> None:
    if skipped:
        warnings.warn(
            f"inference log: skipped {len(skipped)} unreadable line(s): {', '.join(skipped[:5])}"
            + (" ..." if len(skipped) > 5 else ""),
            stacklevel=3,
        )


def _joined(
    answer: Mapping[str, Any], features: Mapping[str, Any] | None, dispute: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The flat row of an answer record with its features record (or a combined record) and its
    dispute."""
    disputed = {"disputed_dx": dispute["dx"], "dispute_note": dispute.get("note", "")} if dispute else {}
    if answer.get("kind") is None:
        return {**flatten(answer), HAS_STATISTICS: bool(answer.get("stats")), **disputed}
    merged = dict(answer)
    if features is not None:
        merged["stats"] = features.get("stats") or {}
        if "image_b64" in features:
            merged["image_b64"] = features["image_b64"]
    return {**flatten(merged), HAS_STATISTICS: features is not None, **disputed}


#: The column saying whether an answer's image statistics were computed.
HAS_STATISTICS = "has_statistics"
#: Below this share of answers with their record (or with statistics), the monitor warns.
MIN_COVERAGE = 0.99


def coverage(
    df: pd.DataFrame, tallies: list[Mapping[str, Any]], start: datetime | None, end: datetime | None
) -> dict[str, Any]:
    """What a window holds against what the service answered in it: ``answered`` (from the writers'
    tallies, to within one tally interval at the window's edges; None when the log has no tally,
    e.g. records written by a batch job), ``records`` (answers with their record), ``with_statistics``,
    ``expecting_statistics`` (records of answers that have statistics at all: not an explanation of
    ``/gradcam`` nor a tensor of ``/infer``),
    ``dropped``/``failed`` (answer records the service could not keep), ``statistics_dropped``, and the
    two shares ``record_coverage`` and ``statistics_coverage``."""
    records = len(df)
    with_stats = int(df[HAS_STATISTICS].sum()) if records else 0
    expecting = int(df[STATISTICS_EXPECTED].sum()) if records and STATISTICS_EXPECTED in df else records
    runs: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for t in sorted(tallies, key=lambda t: t["_ts"]):
        runs.setdefault((str(t.get("writer")), str(t.get("run"))), []).append(t)
    totals: dict[str, int] = {}
    for seen in runs.values():
        inside = [t for t in seen if (start is None or t["_ts"] >= start) and (end is None or t["_ts"] < end)]
        if not inside:
            continue
        before = [t for t in seen if start is not None and t["_ts"] < start]
        if before:
            base = before[-1]["counts"]
        elif start is None or as_utc(inside[0]["started"]) >= start:
            base = {}
        else:  # started before the window, no tally of it before: count from its first tally inside
            base = inside[0]["counts"]
        for key, value in inside[-1]["counts"].items():
            totals[key] = totals.get(key, 0) + int(value) - int(base.get(key, 0))
    answered = totals.get("answered") if runs else None
    return {
        "answered": answered,
        "records": records,
        "with_statistics": with_stats,
        "dropped": totals.get("dropped", 0),
        "failed": totals.get("failed", 0),
        "statistics_dropped": totals.get("statistics_dropped", 0),
        "record_coverage": None if not answered else min(1.0, records / answered),
        "expecting_statistics": expecting,
        "statistics_coverage": None if not expecting else with_stats / expecting,
    }


def window(hours: float, now: datetime | None = None) -> tuple[datetime, datetime]:
    """``(now - hours, now)`` in UTC: the latest window the monitoring flow checks."""
    end = as_utc(now) if now is not None else utcnow()
    return end - timedelta(hours=hours), end
