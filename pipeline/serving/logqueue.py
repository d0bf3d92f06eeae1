"""The service's inference log, off the request path and out of the service's process.

Each record's image statistics (about 3 ms of Python per image) are computed by a writer process
(:mod:`pipeline.serving.logworker`) at the lowest CPU priority, so a request never waits for its
log record and the statistics never hold the service's interpreter lock (as a thread of the
service they cost a fifth of its throughput under load). :meth:`BackgroundLog.submit` queues the
image and the prediction and returns at once; a feeder thread sends them to the writer, which
appends the records in order. The queue is bounded by the bytes of the images waiting; when the
service is saturated and the queue is full, a record is dropped (counted in
:meth:`BackgroundLog.counters`, shown by the service's ``/model``) rather than slowing answers:
under overload the log keeps a sample of the traffic, which is what drift monitoring needs.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.monitoring import logstore
from pipeline.monitoring.logrecord import Answer
from pipeline.serving import logworker

logger = logging.getLogger(__name__)

#: Seconds between two starts of the writer process when it keeps dying.
RESTART_AFTER_S = 10.0


@dataclass(frozen=True)
class LogTarget:
    """Where the writer process logs (None: no log), whether it keeps the uploaded files, and which
    metadata of a request it keeps (``monitor.log_metadata``). The service holds only this: the
    writer builds the records (:meth:`pipeline.monitoring.inferencelog.InferenceLog.log`)."""

    location: str | None
    store_images: bool
    metadata: str

    @property
    def enabled(self) -> bool:
        return self.location is not None


class BackgroundLog:
    """:meth:`InferenceLog.log` in a writer process (see the module docstring): the log of the model
    at ``model_path`` at ``location`` (:func:`pipeline.monitoring.logstore.location`; None: no log).
    At most ``max_queue_bytes`` of images wait; beyond that :meth:`submit` drops the record and
    counts it. :meth:`flush` waits until every record is written (tests, shutdown); :meth:`close`
    also ends the writer."""

    def __init__(
        self, model_path: Path | str, location: str | None, max_queue_bytes: int = 64 << 20, metadata: str = "binned"
    ):
        self.model_path = Path(model_path)
        self.log = LogTarget(None if location is None else str(location), logstore.images_kept(), metadata)
        self.max_queue_bytes = int(max_queue_bytes)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: queue.Queue = queue.Queue()
        self._seq = 0
        self._pending: dict[int, int] = {}  # record number -> bytes, from submit() to the writer's answer
        self._queued_bytes = 0
        self._flushes = 0
        self._counts = {"submitted": 0, "written": 0, "dropped": 0, "failed": 0}
        self._proc: subprocess.Popen | None = None
        self._sent: collections.deque[int] = collections.deque()  # records sent to self._proc, unanswered
        self._started_at = 0.0
        self._feeder: threading.Thread | None = None
        if self.log.enabled:
            with self._lock:
                self._start()

    @property
    def enabled(self) -> bool:
        return self.log.enabled

    @property
    def pid(self) -> int | None:
        """The writer process's id (None when logging is off or it is not running)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # -- the writer process (callers hold self._lock) --------------------------------------------
    def _start(self) -> None:
        """Start the writer process, a thread reading its answers and (once) the feeder thread."""
        env = dict(os.environ)
        package_root = str(Path(logworker.__file__).resolve().parents[2])  # the folder holding pipeline/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._started_at = time.monotonic()
        with logworker.stop_signals_blocked():  # the writer must outlive a SIGTERM from its first instant
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    logworker.__name__,
                    str(self.model_path),
                    str(self.log.location),
                    self.log.metadata,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
                close_fds=True,
            )
        self._sent = collections.deque()
        reader = threading.Thread(
            target=self._read_answers, args=(self._proc, self._sent), name="inference-log-answers", daemon=True
        )
        reader.start()
        if self._feeder is None:
            self._feeder = threading.Thread(target=self._feed, name="inference-log", daemon=True)
            self._feeder.start()

    def _alive(self) -> bool:
        """Whether the writer runs; restarts it (at most every RESTART_AFTER_S) when it ended."""
        if self._proc is not None and self._proc.poll() is None:
            return True
        if time.monotonic() - self._started_at < RESTART_AFTER_S:
            return False
        code = self._proc.returncode if self._proc is not None else None
        logger.warning("inference log: starting the writer process again (it ended with exit %s)", code)
        self._start()
        return True

    def _settle(self, seq: int, ok: bool) -> None:
        """Record ``seq`` is done (written or failed)."""
        size = self._pending.pop(seq, None)
        if size is not None:
            self._queued_bytes -= size
            self._counts["written" if ok else "failed"] += 1
            self._changed.notify_all()

    def _feed(self) -> None:
        """Encode the queued records and send them to the writer, in order."""
        while True:
            seq, item = self._queue.get()
            try:
                frame = logworker.encode_flush() if seq is None else logworker.encode(item)
            except (TypeError, ValueError) as exc:
                logger.warning("inference log: could not encode a record: %s", exc)
                with self._lock:
                    self._settle(seq, ok=False)
                continue
            with self._lock:
                proc, sent = self._proc, self._sent
                if seq is not None:
                    sent.append(seq)  # before writing: the answer may come back at once
            try:
                assert proc is not None and proc.stdin is not None
                proc.stdin.write(frame)
                proc.stdin.flush()
            except (OSError, ValueError, AssertionError):  # the writer ended; its reader fails the rest
                with self._lock:
                    if seq is not None and seq in sent:
                        sent.remove(seq)
                        self._settle(seq, ok=False)

    def _read_answers(self, proc: subprocess.Popen, sent: collections.deque[int]) -> None:
        """Count the answers of one writer process; when it ends, fail what it did not answer."""
        assert proc.stdout is not None
        while answer := proc.stdout.read(1):
            with self._lock:
                if answer == logworker.FLUSHED:
                    self._flushes += 1
                    self._changed.notify_all()
                elif sent:
                    self._settle(sent.popleft(), ok=answer == logworker.WRITTEN)
        proc.wait()
        with self._lock:
            lost = len(sent)
            while sent:
                self._settle(sent.popleft(), ok=False)
        if lost or proc.returncode:
            logger.warning("inference log: the writer ended (exit %s); %d record(s) lost", proc.returncode, lost)

    # -- the service's side ----------------------------------------------------------------------
    def submit(self, answer: Answer) -> bool:
        """Queue one answer for the log; False when it was dropped (queue full, or the writer is
        down) or logging is off."""
        if not self.log.enabled:
            return False
        size = int(answer.rgb.nbytes) + (len(answer.image_bytes) if answer.image_bytes else 0)
        with self._lock:
            self._counts["submitted"] += 1
            full = self._queued_bytes and self._queued_bytes + size > self.max_queue_bytes
            if full or not self._alive():
                self._counts["dropped"] += 1
                dropped = self._counts["dropped"]
            else:
                dropped = 0
                self._seq += 1
                self._pending[self._seq] = size
                self._queued_bytes += size
                self._queue.put((self._seq, answer))
        if dropped and (dropped == 1 or dropped % 1000 == 0):
            logger.warning(
                "inference log: %s; %d record(s) dropped so far",
                "queue full" if full else "writer process down",
                dropped,
            )
        return not dropped

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued record is written (or ``timeout`` seconds), then have the writer
        put any buffered object-store segment; True when all of it happened in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            if not self.log.enabled:
                return True
            if not self._changed.wait_for(lambda: not self._pending, max(0.0, deadline - time.monotonic())):
                return False
            if self._proc is None or self._proc.poll() is not None:
                return True  # nothing buffered in a writer that ended
            target = self._flushes + 1
            self._queue.put((None, None))
            return self._changed.wait_for(lambda: self._flushes >= target, max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 30.0) -> bool:
        """:meth:`flush`, then end the writer process (it exits when its input closes)."""
        ok = self.flush(timeout)
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=max(1.0, timeout))
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                ok = False
        return ok

    def counters(self) -> dict[str, int]:
        """submitted, written, dropped (queue full), failed (bad record or disk), queued."""
        with self._lock:
            return {**self._counts, "queued": len(self._pending)}
