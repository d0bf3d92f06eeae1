"""The service's inference log, off the request path.

The image statistics of a record (about 3 ms per image on one core) are computed and appended by
one background thread at a lower CPU priority, so a request never waits for its log record. The
queue is bounded by the bytes of the images it holds; when the service is saturated and the queue
is full, a record is dropped (counted in :meth:`BackgroundLog.counters`, shown by the service's
``/model``) rather than slowing answers: under overload the log keeps a sample of the traffic,
which is what drift monitoring needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from pipeline.monitoring.inferencelog import InferenceLog, utcnow

logger = logging.getLogger(__name__)


class BackgroundLog:
    """:meth:`InferenceLog.log` off the request path: :meth:`submit` queues the image and the
    prediction (with the request's timestamp) and returns at once; one daemon thread, at OS
    priority ``nice`` (Linux; best effort elsewhere), builds and appends the records in order.
    At most ``max_queue_bytes`` of images wait in the queue; beyond that :meth:`submit` drops
    the record and counts it. :meth:`flush` waits until the queue is empty (tests, shutdown)."""

    def __init__(self, log: InferenceLog, max_queue_bytes: int = 64 << 20, nice: int = 10):
        self.log = log
        self.max_queue_bytes = int(max_queue_bytes)
        self.nice = nice
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued_bytes = 0
        self._counts = {"submitted": 0, "written": 0, "dropped": 0, "failed": 0}
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.log.enabled

    def submit(
        self,
        rgb: np.ndarray,
        metadata: Mapping[str, Any] | None,
        prediction: Mapping[str, Any],
        model_tag: str,
        *,
        source: str | None = None,
        image_bytes: bytes | None = None,
    ) -> bool:
        """Queue one prediction for the log; False when it was dropped (queue full) or logging is off."""
        if not self.log.enabled:
            return False
        size = int(getattr(rgb, "nbytes", 0)) + (len(image_bytes) if image_bytes else 0)
        with self._lock:
            self._counts["submitted"] += 1
            if self._queued_bytes and self._queued_bytes + size > self.max_queue_bytes:
                self._counts["dropped"] += 1
                dropped = self._counts["dropped"]
            else:
                dropped = 0
                self._queued_bytes += size
                self._start()
                self._queue.put((size, utcnow(), rgb, metadata, prediction, model_tag, source, image_bytes))
        if dropped and (dropped == 1 or dropped % 1000 == 0):
            logger.warning(
                "inference log: queue full (%d bytes of images waiting); %d record(s) dropped so far",
                self.max_queue_bytes,
                dropped,
            )
        return not dropped

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError, PermissionError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)  # this thread only (Linux)
        while True:
            try:
                item = self._queue.get(timeout=1.0)
            except queue.Empty:  # idle: an object-store segment may be due
                self.log.tick()
                continue
            size, ts, rgb, metadata, prediction, tag, source, image_bytes = item
            ok = (
                self.log.log(rgb, metadata, prediction, tag, source=source, image_bytes=image_bytes, timestamp=ts)
                is not None
            )
            with self._lock:
                self._queued_bytes -= size
                self._counts["written" if ok else "failed"] += 1
            self._queue.task_done()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued record is written (or ``timeout`` seconds), then put any
        buffered object-store segment; True when empty."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._queue.unfinished_tasks == 0:
                    self.log.flush()
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def counters(self) -> dict[str, int]:
        """submitted, written, dropped (queue full), failed (bad record or disk), queued."""
        with self._lock:
            return {**self._counts, "queued": self._queue.unfinished_tasks}
