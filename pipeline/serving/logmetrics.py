"""The inference log's Prometheus series and the name a service worker writes under.

``/metrics`` gathers every worker's series (BentoML's multiprocess registry); the names and states
are listed in docs/monitoring.md. The totals persisted beside the log are added when a worker starts
(:class:`pipeline.serving.logqueue.BackgroundLog`), so the counters survive restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

from pipeline.core import fsutil
from pipeline.monitoring import logstore

logger = logging.getLogger("pipeline.serving.logqueue")


def worker_name() -> str:
    """This service worker's name in tallies and persisted counters: the host (a pod's name) and
    BentoML's worker index, so that a restarted container goes on counting where it stopped."""
    index = 0
    with contextlib.suppress(Exception):
        from bentoml import server_context

        index = int(server_context.worker_index or 0)
    return f"{socket.gethostname()}-w{index}"


def counters_file(location: str, remote: bool, writer: str) -> Path:
    """Where ``writer``'s totals are persisted: beside a local log (``counters/``), or in the spool
    folder of an object-store log."""
    folder = logstore.spool_folder(location) if remote else Path(location) / "counters"
    return folder / f"{writer}.json"


def read_totals(path: Path) -> dict[str, int]:
    """The totals persisted at ``path`` (empty when missing or unreadable)."""
    try:
        return {k: int(v) for k, v in json.loads(path.read_text()).get("totals", {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def persisted(location: str) -> dict[str, dict[str, int]]:
    """Every writer's persisted totals for the log at ``location``, by writer (what ``/metrics``
    starts from after a restart)."""
    folder = counters_file(location, logstore.is_url(location), "any").parent
    found = {f.stem: read_totals(f) for f in sorted(folder.glob("*.json"))}
    return {w: t for w, t in found.items() if t}


def write_totals(path: Path, writer: str, totals: Mapping[str, int]) -> None:
    """Persist ``writer``'s totals at ``path`` (atomically, in a folder readable by its owner only)."""
    logstore.private_folder(path.parent)
    fsutil.atomic_write_text(path, json.dumps({"writer": writer, "totals": dict(totals)}))


class LogMetrics:
    """The log's Prometheus series (created once per process; ``/metrics`` gathers every worker's)."""

    _made: LogMetrics | None = None

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.records = Counter(
            "lesionflow_inference_log_records", "Answer records of the inference log, by state", ["state"]
        )
        self.statistics = Counter(
            "lesionflow_inference_log_statistics", "Image statistics of answers (features records), by state", ["state"]
        )
        self.queue = Gauge(
            "lesionflow_inference_log_queue_depth",
            "Answers whose image statistics wait for the log's writer",
            multiprocess_mode="livesum",
        )
        self.disputes = Counter(
            "lesionflow_disputes", "Clinicians' disagreements (POST /dispute) for the log, by state", ["state"]
        )
        self.backlog = Gauge(
            "lesionflow_inference_log_backlog_bytes",
            "Bytes of statistics copies waiting on local disk for the log's writer",
            multiprocess_mode="livesum",
        )

    def add_totals(self, totals: Mapping[str, int], records: Iterable[str], statistics: Iterable[str]) -> None:
        """Start the counters from a worker's persisted ``totals`` (``<state>`` and ``statistics_<state>``)."""
        for state in records:
            self.records.labels(state).inc(totals.get(state, 0))
        for state in statistics:
            self.statistics.labels(state).inc(totals.get(f"statistics_{state}", 0))

    @classmethod
    def get(cls) -> LogMetrics | None:
        if cls._made is None:
            try:
                cls._made = cls()
            except Exception as exc:  # noqa: BLE001 - metrics must never stop the log
                logger.warning("inference log: no Prometheus series: %s", exc)
                return None
        return cls._made
