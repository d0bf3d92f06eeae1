"""Which packaged model is the champion: the model of the latest change of champion.

A gated model becomes the champion when it is packaged (:mod:`pipeline.registry.package`); a
rollback (:func:`pipeline.registry.history.rollback`) makes an earlier one the champion again and is
recorded in the history file beside the model store (one JSON line: who, when, why). So the
champion is the newest packaged model unless a rollback came after it. This module is all the
service needs of the registry (its model lookup).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.registry.store import bentoml_home, model_record, model_store, models

#: The champion's history beside the model store: one JSON line per rollback (who, when, why).
HISTORY_FILE = "lesionflow-champions.jsonl"


def history_file() -> Path:
    """Where rollbacks are recorded (in the BentoML home, next to the models they name)."""
    return bentoml_home() / HISTORY_FILE


def rollbacks() -> list[dict[str, Any]]:
    """The recorded rollbacks, oldest first (``{"at", "tag", "reason", "by", "from"}``)."""
    path = history_file()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def timeline() -> list[dict[str, Any]]:
    """Every change of champion, oldest first: each stored model's packaging and each rollback to a
    stored model (``{"at", "tag", "event", ...}``)."""
    stored = {str(m.tag): m for m in models()}
    events = [
        {"at": m.info.creation_time.astimezone(UTC), "tag": tag, "event": "packaged"} for tag, m in stored.items()
    ]
    for r in rollbacks():
        if r.get("tag") in stored:
            events.append({**r, "at": datetime.fromisoformat(r["at"]).astimezone(UTC), "event": "rollback"})
    return sorted(events, key=lambda e: e["at"])


def champion() -> dict[str, Any] | None:
    """The champion: ``{"tag", "path", "labels", "metadata", "created_at"}`` of the model of the
    latest change in :func:`timeline`, or None when the store holds no lesionflow model."""
    events = timeline()
    if not events:
        return None
    return model_record(model_store().get(events[-1]["tag"]))
