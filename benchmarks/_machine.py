"""Describe the machine a benchmark ran on, and when (written into every result file)."""

from __future__ import annotations

from datetime import UTC, datetime

from pipeline.core.machine import describe


def machine() -> dict:
    """:func:`pipeline.core.machine.describe` and ``measured_at``: the UTC time the benchmark asked
    (about when it ran)."""
    return {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), **describe()}
