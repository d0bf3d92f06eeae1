"""Group commit of the inference log's answer records: the records of requests that arrive while
one is being appended are appended together, in one write, by the next request in line; each
request returns once its own record is in the file.

Why not one append per request: an append holds the log file's ``flock`` across system calls,
and each call gives up and takes back Python's interpreter lock. With many request threads the
lock was held while its holder waited for the interpreter, the others queued behind it, and the
service's throughput fell by about a tenth (``benchmarks/log_cost.py``). Why not a thread of its
own that appends for everyone: every record would then wait for that thread to get the
interpreter, and for its request's thread to get it back (about twice the p99 latency of
``/classify`` beside Grad-CAM work, ``tests/model/test_service_security.py``). Here a request
that finds nobody appending appends its record itself, with any others waiting (the *leader*);
a request that finds a leader at work waits on its own event, holding nothing, and takes over
if the leader finished before seeing its record. A SIGKILL loses only the answers in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from itertools import groupby
from typing import Any

from pipeline.monitoring import logstore

logger = logging.getLogger(__name__)

#: Most records appended in one write.
MAX_BATCH = 512
#: Seconds a waiting request sleeps before it looks whether the leader left its record behind.
LEADER_POLL_S = 0.05


@dataclass
class Pending:
    """One record waiting for its append: its day and line, what the caller attached to it, and,
    once appended, its state (``written``, ``spooled``, ``dropped`` or ``failed``)."""

    day: date
    line: bytes
    item: Any = None
    state: str = ""
    done: threading.Event = field(default_factory=threading.Event)


Hook = Callable[[list["Pending"]], None]


class Appender:
    """Appends lines to the log at ``location`` (:func:`pipeline.monitoring.logstore.append_line`),
    a batch per write (see the module docstring). The leader runs ``counted(batch)`` once a batch's
    states are known, before its callers go on (the service counts the states there, so a caller
    sees its record counted), and ``after(batch)`` once it gave up leading (it queues their
    statistics; one batch at a time)."""

    def __init__(self, location: str, counted: Hook | None = None, after: Hook | None = None):
        self.location = location
        self.remote = logstore.is_url(location)
        self._hooks = (counted, after)
        self._mu = threading.Lock()  # guards _waiting and _busy; held for no I/O
        self._waiting: list[Pending] = []
        self._busy = 0  # batches taken and not yet through their hooks
        self._leader = threading.Lock()  # held by the request appending for everyone
        self._after_lock = threading.Lock()  # held while a batch's after hook runs

    def append(self, day: date, line: bytes, item: Any = None, timeout: float | None = None) -> str:
        """Append one line and return once it is in the file (or the spool): its state, or
        ``late`` when that took longer than ``timeout`` seconds (it still lands, and is counted
        then)."""
        pending = Pending(day, line, item)
        with self._mu:
            self._waiting.append(pending)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not pending.done.is_set():
            if self._leader.acquire(blocking=False):
                self._lead_while_waiting()
            elif pending.done.wait(LEADER_POLL_S):
                break
            if deadline is not None and time.monotonic() > deadline:
                return "late"
        return pending.state

    def _lead_while_waiting(self) -> None:
        """Lead (holding self._leader, released here), then run ``after`` on the batches appended,
        no longer holding it: a record arriving meanwhile waits for the next write, not for the
        statistics of the last batch. After that, lead again when a record arrived after the last
        look and no other request took over, so that none is left waiting."""
        while True:
            appended: list[list[Pending]] = []
            try:
                self._lead(appended)
            finally:
                self._leader.release()
            for batch in appended:
                with self._after_lock:  # one batch's hook at a time: it queues statistics in order
                    self._call(1, batch)
                with self._mu:
                    self._busy -= 1
            with self._mu:
                if not self._waiting:
                    return
            if not self._leader.acquire(blocking=False):
                return  # another leader holds it, and will look at what waits

    def _lead(self, appended: list[list[Pending]]) -> None:
        """Append batches until none waits, releasing each batch's callers (the leader, holding
        self._leader); the batches go to ``appended`` for their ``after`` hook."""
        while True:
            with self._mu:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                if not batch:
                    return
                self._busy += 1
            appended.append(batch)
            self._commit(batch)
            self._call(0, batch)
            for pending in batch:
                pending.done.set()

    def wait(self, timeout: float) -> bool:
        """Whether every line appended before this call was handled, hooks included, within
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._mu:
                if not self._waiting and not self._busy:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self, timeout: float = 5.0) -> None:
        """Wait for what is being appended (there is no thread to end)."""
        self.wait(timeout)

    def _call(self, which: int, batch: list[Pending]) -> None:
        """Run one of the hooks on a non-empty batch; the thread outlives a failing hook."""
        hook = self._hooks[which]
        if batch and hook is not None:
            try:
                hook(batch)
            except Exception:  # noqa: BLE001 - the thread must outlive a bug in a hook
                logger.exception("inference log: after an append")

    def _commit(self, batch: list[Pending]) -> None:
        """Set the state of every line of ``batch``: one write per day for a local log, one spool
        append per line for an object-store log (its spool counts records per segment)."""
        for day, group in groupby(batch, key=lambda p: p.day):
            lines = list(group)
            try:
                if self.remote:
                    for pending in lines:
                        pending.state = _spooled(self.location, pending)
                else:
                    logstore.append_local(self.location, day, b"".join(p.line for p in lines))
                    for pending in lines:
                        pending.state = "written"
            except Exception as exc:  # noqa: BLE001 - a full disk must not fail the answers
                logger.warning("inference log: could not append %d answer record(s): %s", len(lines), exc)
                for pending in lines:
                    pending.state = pending.state or "failed"


def _spooled(location: str, pending: Pending) -> str:
    """Append one line to the spool of an object-store log: ``spooled``, or ``dropped`` when full."""
    try:
        logstore.append_line(location, pending.day, pending.line)
    except logstore.SpoolFull:
        return "dropped"
    return "spooled"
