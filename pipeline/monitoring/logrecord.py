"""One record of the inference log: what the service answered for one image, as one JSON line.

:class:`Answer` is the one typed object that travels from the service (which builds it when it
answers and writes its :func:`answer_record`) through the log's writer process
(:mod:`pipeline.serving.logworker` sends it as one frame) to :func:`features_record`, which adds
the image statistics. :func:`flatten` turns a record back into a flat row with the column names
of the reference profile, which is what drift monitoring reads.

The service writes two records per answer (schema 2): the **answer record**
(:func:`answer_record`: request id, time, model tag, route, the image's sha256 and size, the
metadata as the privacy policy says, the prediction with the refusal or OOD verdict and score, the
projected embedding), appended by the request itself and never dropped; and the **features
record** (:func:`features_record`: the image statistics, keyed by the same request id), computed
by the log's writer process, which under overload may fall behind and skip some (counted). A
**tally** record (:func:`tally_record`) now and then says how many answers the writer gave and
what became of their records, so a reader knows what its window should hold. :func:`record_for`
gives the single combined record of schema 1 (a record written in one piece, e.g. by a batch job).

A record holds the timestamp, the request id, the model tag, the image statistics of
:func:`pipeline.features.imagestats.image_statistics` (the EDA statistics plus sharpness), the
metadata (age, sex, localization), the prediction (class probabilities, predicted class,
malignancy probability, decision, out-of-distribution verdict) and, when the model carries its
reference profile, the penultimate embedding reduced by the profile's fixed random projection. The
uploaded file is stored only when asked (``image_bytes``).

NumPy only (no pandas, torch, SciPy or Evidently): the service imports it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from pipeline.core.errors import LesionflowError
from pipeline.core.metadata import FIELDS
from pipeline.core.predictions import (
    DECISION,
    IN_DISTRIBUTION,
    P_MALIGNANT,
    QUALITY,
    THRESHOLD,
    join_reasons,
    pred_column,
    prob_column,
)

SCHEMA = 1
#: Schema of the split records (answer, features, tally).
SPLIT_SCHEMA = 2
ANSWER, FEATURES, TALLY, DISPUTE = "answer", "features", "tally", "dispute"
#: The column saying whether an answer has image statistics to wait for (not an explanation or a tensor).
STATISTICS_EXPECTED = "statistics_expected"
LEVELS = ("dx", "risk", "binary")


def uploaded_file_identity(data: bytes | None) -> tuple[str | None, int | None]:
    """``(sha256 hex, size in bytes)`` of an uploaded file (None, None without one)."""
    if data is None:
        return None, None
    return hashlib.sha256(data).hexdigest(), len(data)


def _statistics(rgb: np.ndarray, feature_config: Any, size: tuple[int, int] | None = None) -> dict[str, float]:
    """:func:`pipeline.features.imagestats.image_statistics`, imported where the record is built (the
    log's writer process), not in the service that only hands the answer over."""
    from pipeline.features.imagestats import image_statistics

    return image_statistics(rgb, feature_config, size)


class InferenceLogError(LesionflowError, ValueError):
    """A record that cannot be logged (missing field, bad timestamp): the message names it."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(ts: Any) -> datetime:
    """A timezone-aware UTC datetime from a datetime (naive = UTC), a pandas Timestamp or an ISO 8601 string."""
    if hasattr(ts, "to_pydatetime"):
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


def clean(value: Any) -> Any:
    """JSON-safe scalar: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class Answer:
    """What the service answered for one image, as the inference log receives it.

    ``prediction`` is the service's response for the image (``dx_probabilities`` ...,
    ``p_malignant``, ``decision``, ``in_distribution``, ``ood_score``), with the probabilities even
    when they were withheld from the person; ``rgb`` the decoded image its statistics are computed
    from, or its :func:`pipeline.features.imagestats.statistics_copy` with ``size`` the decoded
    image's ``(width, height)`` (empty in a log frame that carries the uploaded file instead:
    :func:`pipeline.serving.logworker.statistics_copy`); ``embedding`` the model's penultimate
    embedding (never logged raw: projected); ``image_sha256`` and ``image_nbytes`` identify the
    uploaded file, ``image_bytes`` is the file itself (a features record keeps it only when the log
    keeps files)."""

    rgb: np.ndarray
    prediction: Mapping[str, Any]
    model_tag: str
    metadata: Mapping[str, Any] | None = None
    embedding: np.ndarray | None = None
    timestamp: datetime = field(default_factory=utcnow)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    source: str | None = None
    image_bytes: bytes | None = None
    size: tuple[int, int] | None = None
    image_sha256: str | None = None
    image_nbytes: int | None = None
    route: str | None = None

    @classmethod
    def from_predictions(cls, rgb: np.ndarray, out: Mapping[str, Any], row: int, model_tag: str, **kw: Any) -> Answer:
        """The answer of row ``row`` of :meth:`pipeline.model.inference.Predictor.predict`'s output."""
        prediction: dict[str, Any] = {}
        for level in LEVELS:
            probs = out.get(f"{level}_probs")
            if probs is not None:
                prediction[f"{level}_probabilities"] = dict(zip(out["classes"][level], np.asarray(probs)[row].tolist()))
        for key in ("p_malignant", "in_distribution", "ood_score"):
            if out.get(key) is not None:
                prediction[key] = np.asarray(out[key])[row].item()
        if out.get("quality_reasons") is not None:
            prediction["quality_reasons"] = list(out["quality_reasons"][row])
        emb = out.get("embeddings")
        return cls(rgb, prediction, model_tag, embedding=None if emb is None else np.asarray(emb)[row], **kw)


def _prediction_part(prediction: Mapping[str, Any]) -> dict[str, Any]:
    """The prediction of one image from the service's response fields."""
    out: dict[str, Any] = {}
    for level in LEVELS:
        probs = prediction.get(f"{level}_probabilities")
        if probs:
            out["level"], out["probabilities"] = level, {str(k): float(v) for k, v in probs.items()}
            break
    if "probabilities" not in out and prediction.get("explained_class") is not None:  # /gradcam: the class shown
        return {"level": None, "probabilities": None, "pred_class": str(prediction["explained_class"])}
    if "probabilities" not in out:
        raise InferenceLogError("prediction: no class probabilities (dx_probabilities / risk_ / binary_)")
    probs = out["probabilities"]
    out["pred_class"] = max(probs, key=probs.get)
    p_mal = prediction.get("p_malignant")
    out["p_malignant"] = None if p_mal is None else clean(float(p_mal))
    decision = prediction.get("decision")
    out["decision"] = None if decision is None else str(decision)
    for key in ("threshold", "site"):  # the operating point the decision was made at (a site's, or the model's)
        if prediction.get(key) is not None:
            out[key] = prediction[key]
    inside = prediction.get("in_distribution")
    out["in_distribution"] = None if inside is None else bool(inside)
    score = prediction.get("ood_score")
    if score is not None:
        out["ood_score"] = clean(float(score))
    reasons = prediction.get("quality_reasons")
    if reasons is not None:
        out["quality_reasons"] = [str(r) for r in reasons]
    return out


def make_record(
    *,
    stats: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    prediction: Mapping[str, Any],
    model_tag: str,
    embedding: Iterable[float] | None = None,
    request_id: str | None = None,
    timestamp: datetime | None = None,
    source: str | None = None,
    image_bytes: bytes | None = None,
    route: str | None = None,
    image: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A log record from already computed statistics (see :func:`record_for`)."""
    meta = dict(metadata or {})
    rec: dict[str, Any] = {
        "schema": SCHEMA,
        "timestamp": iso(timestamp or utcnow()),
        "request_id": request_id or uuid.uuid4().hex,
        "model_tag": str(model_tag),
        "stats": {str(k): clean(v) for k, v in stats.items()},
        "metadata": {k: clean(meta.get(k)) for k in FIELDS},
        "prediction": _prediction_part(prediction),
    }
    if source is not None:
        rec["source"] = str(source)
    if route is not None:
        rec["route"] = str(route)
    if image is not None:
        rec["image"] = dict(image)
    if embedding is not None:
        rec["embedding"] = [float(v) for v in embedding]
    if image_bytes is not None:
        rec["image_b64"] = base64.b64encode(image_bytes).decode("ascii")
    return rec


def to_line(record: Mapping[str, Any]) -> tuple[date, bytes]:
    """``(UTC day, JSON line)`` of a record: compact separators, no NaN (:func:`clean`)."""
    if "timestamp" not in record:
        raise InferenceLogError("record: missing field 'timestamp'")
    day = as_utc(record["timestamp"]).date()
    return day, (json.dumps(record, allow_nan=False, separators=(",", ":"), default=clean) + "\n").encode("utf-8")


def project(embedding: Any, projection: np.ndarray | None) -> list[float] | None:
    """One embedding through the reference profile's projection matrix (None without either)."""
    if projection is None or embedding is None:
        return None
    e = np.asarray(embedding, dtype=np.float32).reshape(-1)
    if e.shape[0] != projection.shape[0]:
        raise InferenceLogError(
            f"embedding: {e.shape[0]} values but the projection expects {projection.shape[0]} "
            "(the reference profile belongs to another model)"
        )
    return [float(v) for v in e @ projection]


#: How much of a request's metadata a record keeps (``monitor.log_metadata``).
METADATA_POLICIES = ("binned", "exact", "off")
AGE_BIN_YEARS = 5


def kept_metadata(metadata: Mapping[str, Any] | None, policy: str = "binned") -> dict[str, Any]:
    """The metadata a record keeps: ``exact``; ``binned`` (the default): the age as the start of its
    5-year bin (HAM10000's ages are such bins already), sex and site as given; ``off``: none."""
    if policy not in METADATA_POLICIES:
        raise InferenceLogError(f"log_metadata: expected one of {', '.join(METADATA_POLICIES)}, got {policy!r}")
    meta = {k: clean((metadata or {}).get(k)) for k in FIELDS}
    if policy == "off":
        return dict.fromkeys(FIELDS)
    age = meta.get("age")
    if policy == "binned" and isinstance(age, (int, float)):
        meta["age"] = float(AGE_BIN_YEARS * math.floor(age / AGE_BIN_YEARS))
    return meta


def record_for(
    answer: Answer,
    projection: np.ndarray | None = None,
    feature_config: Any = None,
    store_image: bool = False,
    metadata: str = "exact",
) -> dict[str, Any]:
    """The log record of one answer: the statistics of its image (with ``feature_config``), its
    metadata as ``metadata`` says (:func:`kept_metadata`), its prediction, its embedding through
    ``projection`` (the reference profile's ``projection.npy``; none without it) and, with
    ``store_image``, the uploaded file without its embedded metadata (EXIF and the like)."""
    from pipeline.core.images import strip_metadata

    return make_record(
        stats=_statistics(answer.rgb, feature_config),
        metadata=kept_metadata(answer.metadata, metadata),
        prediction=answer.prediction,
        model_tag=answer.model_tag,
        embedding=project(answer.embedding, projection),
        request_id=answer.request_id,
        timestamp=answer.timestamp,
        source=answer.source,
        image_bytes=strip_metadata(answer.image_bytes) if store_image and answer.image_bytes else None,
        route=answer.route,
        image={"sha256": answer.image_sha256, "bytes": answer.image_nbytes, "size": _size(answer)},
    )


def answer_record(
    answer: Answer, projection: np.ndarray | None = None, metadata: str = "binned", statistics: bool = True
) -> dict[str, Any]:
    """The answer record of ``answer`` (see the module docstring): no image statistics, so it costs
    the request a few tens of microseconds. ``statistics=False``: no features record will follow
    (an explanation, or a model-input tensor of ``/infer``), and readers do not count it missing.
    NumPy and the standard library only."""
    rec: dict[str, Any] = {
        "schema": SPLIT_SCHEMA,
        "kind": ANSWER,
        "timestamp": iso(answer.timestamp),
        "request_id": answer.request_id,
        "model_tag": str(answer.model_tag),
        "image": {"sha256": answer.image_sha256, "bytes": answer.image_nbytes, "size": _size(answer)},
        "metadata": kept_metadata(answer.metadata, metadata),
        "prediction": _prediction_part(answer.prediction),
    }
    if answer.source is not None:
        rec["source"] = str(answer.source)
    if answer.route is not None:
        rec["route"] = str(answer.route)
    if not statistics:
        rec["statistics"] = False
    embedding = project(answer.embedding, projection)
    if embedding is not None:
        rec["embedding"] = embedding
    return rec


def _size(answer: Answer) -> list[int] | None:
    if answer.size is not None:
        return [int(answer.size[0]), int(answer.size[1])]
    shape = np.shape(answer.rgb)
    return [int(shape[1]), int(shape[0])] if len(shape) >= 2 else None


def features_record(answer: Answer, feature_config: Any = None, store_image: bool = False) -> dict[str, Any]:
    """The features record of ``answer``: the statistics of its image (computed here, a few ms), keyed
    by its request id and stamped with its time, and with ``store_image`` the uploaded file without
    its embedded metadata."""
    from pipeline.core.images import strip_metadata

    rec: dict[str, Any] = {
        "schema": SPLIT_SCHEMA,
        "kind": FEATURES,
        "timestamp": iso(answer.timestamp),
        "request_id": answer.request_id,
        "stats": {str(k): clean(v) for k, v in _statistics(answer.rgb, feature_config, answer.size).items()},
    }
    if store_image and answer.image_bytes:
        rec["image_b64"] = base64.b64encode(strip_metadata(answer.image_bytes)).decode("ascii")
    return rec


def tally_record(writer: str, run: str, started: datetime, counts: Mapping[str, int]) -> dict[str, Any]:
    """A tally: the answers one run of one writer (a service worker since its start) gave so far and
    what became of their records (cumulative ``counts``)."""
    return {
        "schema": SPLIT_SCHEMA,
        "kind": TALLY,
        "timestamp": iso(utcnow()),
        "writer": writer,
        "run": run,
        "started": iso(started),
        "counts": {str(k): int(v) for k, v in counts.items()},
    }


def dispute_record(request_id: str, dx: str, note: str = "", timestamp: datetime | None = None) -> dict[str, Any]:
    """A clinician's disagreement with an answer: the diagnosis they give instead, keyed by the
    answer's request id (the page's "disagree" control). It reaches the labelling queue."""
    return {
        "schema": SPLIT_SCHEMA,
        "kind": DISPUTE,
        "timestamp": iso(timestamp or utcnow()),
        "request_id": str(request_id),
        "dx": str(dx),
        "note": str(note)[:500],
    }


def flatten(record: Mapping[str, Any]) -> dict[str, Any]:
    """One record as a flat row: statistics and metadata under their own names, the prediction as
    prediction columns (``p_<level>_<class>``, ``<level>_pred``, ``p_malignant``, ``decision``,
    ``in_distribution``) and the projected embedding as ``emb_00``..."""
    from pipeline.monitoring.profile import embedding_columns

    row: dict[str, Any] = {k: record.get(k) for k in ("timestamp", "request_id", "model_tag")}
    for key in ("source", "route"):
        if key in record:
            row[key] = record[key]
    row[STATISTICS_EXPECTED] = record.get("statistics", True) is not False
    row.update(record.get("stats") or {})
    row.update({k: (record.get("metadata") or {}).get(k) for k in FIELDS})
    pred = record.get("prediction") or {}
    level = pred.get("level")
    row["pred_level"] = level
    if level:
        row[pred_column(level)] = pred.get("pred_class")
        for cls, p in (pred.get("probabilities") or {}).items():
            row[prob_column(level, cls)] = p
    elif pred.get("pred_class") is not None:  # an explanation (/gradcam): the class it showed
        row["explained_class"] = pred["pred_class"]
    row[P_MALIGNANT] = pred.get("p_malignant")
    row[THRESHOLD] = pred.get("threshold")
    row[DECISION] = pred.get("decision")
    row["site"] = pred.get("site")
    row[IN_DISTRIBUTION] = pred.get("in_distribution")
    row["ood_score"] = pred.get("ood_score")
    reasons = pred.get("quality_reasons")
    row[QUALITY] = None if reasons is None else join_reasons(reasons)
    image = record.get("image") or {}
    row["image_sha256"], row["image_bytes"] = image.get("sha256"), image.get("bytes")
    emb = record.get("embedding")
    if emb is not None:
        row.update(zip(embedding_columns(len(emb)), emb))
    if "image_b64" in record:
        row["image_b64"] = record["image_b64"]
    return row
