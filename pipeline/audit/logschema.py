"""The inference log's schema and counters for an audit bundle: what every answer's record holds,
never a patient's record.

The schema is derived from the log's own record builders (:mod:`pipeline.monitoring.logrecord`)
run on a synthetic answer, so it cannot drift from what the service writes: each field with its
JSON type, per record kind (answer, features, tally, dispute).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np

from pipeline.monitoring import logrecord

#: Said in the bundle beside the schema.
POLICY = (
    "Every answer of /classify, /classify_batch, /similar, /gradcam and /infer (and lesionflow predict --log) "
    "gets an answer record; the image statistics follow in a features record. The uploaded image is kept "
    "only when the operator turns it on; the metadata follows serving.log_metadata (binned by default). "
    "A clinician's disagreement (POST /dispute) adds a dispute record: the answer's request id, a diagnosis, a note. "
    "See docs/monitoring.md and docs/security.md."
)


def _type(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _type(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_type(value[0])] if value else ["any"]
    return {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def _example() -> logrecord.Answer:
    prediction = {
        "dx_probabilities": {"mel": 0.25, "nv": 0.75},
        "p_malignant": 0.25,
        "decision": "refer",
        "threshold": 0.07,
        "site": "site-name",
        "in_distribution": True,
        "ood_score": 1.0,
        "quality_reasons": ["blank"],
    }
    yy, xx = np.mgrid[:96, :128]
    rgb = np.full((96, 128, 3), (200, 160, 140), np.uint8)
    rgb[(yy - 48) ** 2 + (xx - 64) ** 2 < 30**2] = (90, 50, 30)  # a dark disc on skin: every statistic defined
    return logrecord.Answer(
        rgb=rgb,
        prediction=prediction,
        model_tag="name:version",
        metadata={"age": 45, "sex": "female", "localization": "back"},
        embedding=None,
        timestamp=datetime(2026, 1, 1, tzinfo=UTC),
        source="source",
        route="/classify",
        image_sha256="0" * 64,
        image_nbytes=1,
    )


def schema() -> dict[str, Any]:
    """``{kind: {field: type}}`` of the records the log holds, from the record builders."""
    answer = _example()
    return {
        "schema_version": logrecord.SPLIT_SCHEMA,
        "answer": _type(logrecord.answer_record(answer) | {"embedding": [0.0]}),
        "features": _type(logrecord.features_record(answer)),
        "tally": _type(logrecord.tally_record("writer", "run", answer.timestamp, {"answered": 1})),
        "dispute": _type(logrecord.dispute_record("request-id", "mel", "note", answer.timestamp)),
        "policy": POLICY,
    }


def files(counters: Mapping[str, Any] | None) -> dict[str, bytes]:
    """``inference_log/schema.json`` and ``inference_log/counters.json`` (the persisted totals per
    writer, or a note that the log is not configured here)."""
    dump = lambda o: (json.dumps(o, indent=2, sort_keys=True) + "\n").encode()  # noqa: E731
    kept = dict(counters) if counters else {"note": "no inference log configured or no counters persisted here"}
    return {"inference_log/schema.json": dump(schema()), "inference_log/counters.json": dump(kept)}
