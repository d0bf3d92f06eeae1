"""One thread appends the answer records of all the requests a service worker serves (group commit).

Each request used to append its own line to the day file under the file's ``flock``. That lock
is held across the system calls of the append, and each of them gives the interpreter lock up and
takes it back: under load the holder waited for the interpreter while the other requests waited
for the file. At 32 clients on 2 cores a request waited 9.7 ms on average for the ``flock``, in
an answer path of about 13 ms of logging (instrumented run of ``benchmarks/log_cost.py``'s load,
2026-12-07).

Here a request hands its line to :class:`Appender` and waits until it is written: the appender
writes every line waiting, one ``write`` per day file under one ``flock`` (or one spool append per
line for an object-store log), then wakes the requests of that batch, so that an answer is still
sent only once its record is kept. Work that may follow a record (queueing its statistics copy,
which may write to the disk backlog) runs after the requests were woken, in the order of the
records, on a second thread: the requests of the next batch do not wait for it. At most
:data:`MAX_FOLLOW_UPS` (plus the batch that reached it) wait for that thread, each holding its
answer's statistics copy; beyond that the appender takes no new batch until some are done, so the
requests wait instead of memory growing.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

from pipeline.monitoring import logstore

logger = logging.getLogger(__name__)

#: States of an appended answer record (see :mod:`pipeline.serving.logqueue`).
KEPT = ("written", "spooled")
#: Follow-ups (with the answers they hold) waiting for their thread, at most.
MAX_FOLLOW_UPS = 64


@dataclass
class _Line:
    day: date
    data: bytes
    after: Callable[[], None] | None
    done: threading.Event  # the batch's: set once for all its lines
    state: str = "failed"


class Appender:
    """Appends lines at ``location`` (a local log folder or an object-store URL,
    :func:`pipeline.monitoring.logstore.append_line`) from one thread; see the module docstring."""

    def __init__(self, location: str):
        self.location = str(location)
        self.remote = logstore.is_url(self.location)
        lock = threading.Lock()  # one lock, three things to wait for
        self._lines_waiting, self._follow_ups_waiting, self._settled = (threading.Condition(lock) for _ in range(3))
        self._waiting: list[_Line] = []
        self._batch_done = threading.Event()  # of the lines waiting now
        self._busy = False
        self._follow: collections.deque[Callable[[], None]] = collections.deque()
        self._following = 0  # follow-ups handed over and not finished
        threading.Thread(target=self._run, name="inference-log-appender", daemon=True).start()
        threading.Thread(target=self._run_follow_ups, name="inference-log-follow-ups", daemon=True).start()

    def append(self, day: date, data: bytes, after: Callable[[], None] | None = None) -> str:
        """Append one line of ``day``; returns once it is kept, with its state: ``written`` (local
        file), ``spooled`` (object-store log), ``dropped`` (spool full) or ``failed`` (an error,
        logged). ``after`` runs on the appender once the line is kept (not when it was refused)."""
        with self._lines_waiting:
            line = _Line(day, data, after, self._batch_done)
            self._waiting.append(line)
            self._lines_waiting.notify()
        line.done.wait()
        return line.state

    def idle(self, timeout: float) -> bool:
        """Wait until every line handed over is written and its ``after`` ran; False after ``timeout``."""
        with self._settled:
            return self._settled.wait_for(lambda: not self._waiting and not self._busy and not self._following, timeout)

    def _run(self) -> None:
        while True:
            with self._lines_waiting:
                self._lines_waiting.wait_for(lambda: bool(self._waiting) and self._following < MAX_FOLLOW_UPS)
                batch, self._waiting, self._busy = self._waiting, [], True
                done, self._batch_done = self._batch_done, threading.Event()
            try:
                self._write(batch)
            finally:
                done.set()
            with self._settled:
                for line in batch:
                    if line.after is not None and line.state in KEPT:
                        self._follow.append(line.after)
                        self._following += 1
                self._busy = False
                self._follow_ups_waiting.notify()
                self._settled.notify_all()

    def _run_follow_ups(self) -> None:
        while True:
            with self._follow_ups_waiting:
                self._follow_ups_waiting.wait_for(lambda: bool(self._follow))
                after = self._follow.popleft()
            try:
                after()
            except Exception:  # noqa: BLE001 - the thread must outlive any follow-up
                logger.exception("inference log: after appending a record")
            finally:
                with self._settled:
                    self._following -= 1
                    self._settled.notify_all()
                    self._lines_waiting.notify()  # the appender may take a batch again

    def _write(self, batch: list[_Line]) -> None:
        """Write a batch: one append per day (local), or one spool append per line."""
        if self.remote:
            for line in batch:
                line.state = self._one(line.day, line.data, "spooled")
            return
        for day in dict.fromkeys(line.day for line in batch):
            lines = [line for line in batch if line.day == day]
            state = self._one(day, b"".join(line.data for line in lines), "written")
            for line in lines:
                line.state = state

    def _one(self, day: date, data: bytes, kept: str) -> str:
        try:
            logstore.append_line(self.location, day, data)
            return kept
        except logstore.SpoolFull:
            return "dropped"
        except Exception as exc:  # noqa: BLE001 - a full disk must not fail the answers
            logger.warning("inference log: could not write %d byte(s) of answer records: %s", len(data), exc)
            return "failed"
