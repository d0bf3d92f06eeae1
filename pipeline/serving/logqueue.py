"""The service's inference log: every answer's record written before its response, its image
statistics off the request path and out of the service's process.

For every answer :meth:`BackgroundLog.submit` writes the **answer record**
(:func:`pipeline.monitoring.logrecord.answer_record`: request id, time, model, prediction, OOD
verdict and score, metadata as the privacy policy says, the image's sha256 and size) before the
request goes on, through the worker's appender thread (:class:`pipeline.serving.appender.Appender`,
a group commit) to the local day file, or to the replica's spool of an object-store log, whose
uploader thread puts the segments (retrying with backoff while the store is down). So a SIGKILL or
an OOM kill loses at most the answers in flight. A record counts as ``written`` once it is in the
local file or its segment's PUT succeeded, ``spooled`` while it waits in the spool, ``dropped``
when the spool is full, ``failed`` when the disk refused it.

The **image statistics** (about 3 ms of Python per image) are computed by a writer process
(:mod:`pipeline.serving.logworker`) at the lowest CPU priority, off the service's interpreter lock:
once its record is written, the answer's statistics copy (its uploaded file when that is no
larger than the 200 px copy of its pixels, else that copy; with its request id and time only:
:func:`pipeline.serving.logworker.statistics_copy`) is queued for the writer, which appends a
**features record** with the same request id. While the service is busy the writer computes nothing
(:class:`pipeline.serving.logworker.Pacing`) and the copies wait: in memory up to
``max_queue_bytes``, then on local disk (:mod:`pipeline.serving.backlog`, bounded), until the load
falls or the disk backlog is half full. Only when both are full, or the service stops before the
writer caught up, are an answer's statistics skipped and counted (``statistics dropped``); the
reader marks its record ``has_statistics: false``.

Every ten seconds (and at flush) a **tally** record says how many answers this worker gave and what
became of their records, so the monitor knows what its window should hold; the same totals are
persisted beside the log (``counters/<writer>.json``) and on ``/metrics`` as
``lesionflow_inference_log_records_total{state}``, ``lesionflow_inference_log_statistics_total{state}``
and ``lesionflow_inference_log_queue_depth``, starting from the persisted totals after a restart.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.statsconfig import feature_config_from_dict
from pipeline.model import bundle
from pipeline.monitoring import logrecord, logstore
from pipeline.monitoring.logrecord import Answer, utcnow
from pipeline.serving import logmetrics, logworker
from pipeline.serving.appender import KEPT, Appender
from pipeline.serving.backlog import BACKLOG_MB, DiskBacklog, OnDisk, backlog_folder

logger = logging.getLogger(__name__)

#: Seconds between two starts of the writer process when it keeps dying.
RESTART_AFTER_S = 10.0
#: The writer's answers as the integers iterating over the bytes read gives.
WRITTEN, FLUSHED = logworker.WRITTEN[0], logworker.FLUSHED[0]
#: Seconds between two tallies (and persisted counters) of a worker that answered meanwhile.
TALLY_S = float(os.environ.get("LESIONFLOW_LOG_TALLY_S", "10"))
#: States of an answer record, and of an answer's statistics.
RECORD_STATES = ("written", "spooled", "dropped", "failed")
STATISTICS_STATES = ("written", "dropped", "failed")


@dataclass(frozen=True)
class LogTarget:
    """Where the log goes (None: no log), whether it keeps the uploaded files, and which metadata of
    a request it keeps (``monitor.log_metadata``)."""

    location: str | None
    store_images: bool
    metadata: str

    @property
    def enabled(self) -> bool:
        return self.location is not None

    @property
    def remote(self) -> bool:
        return self.location is not None and logstore.is_url(self.location)


class BackgroundLog:
    """The inference log of the model at ``model_path`` at ``location``
    (:func:`pipeline.monitoring.logstore.location`; None: no log); see the module docstring. At most
    ``max_queue_bytes`` of statistics copies wait for the writer process in memory, and at most
    ``backlog_bytes`` more on local disk. :meth:`flush` waits until
    every queued statistics record is written and every spooled segment is put (tests, shutdown);
    :meth:`close` also ends the writer process and the uploader."""

    def __init__(
        self,
        model_path: Path | str,
        location: str | None,
        max_queue_bytes: int = 64 << 20,
        metadata: str = "binned",
        writer: str | None = None,
        backlog_bytes: int = int(BACKLOG_MB * (1 << 20)),
    ):
        self.model_path = Path(model_path)
        self.log = LogTarget(None if location is None else str(location), logstore.images_kept(), metadata)
        self.max_queue_bytes = int(max_queue_bytes)
        self.writer = writer or logmetrics.worker_name()
        self.run, self.started = uuid.uuid4().hex[:12], utcnow()
        self.projection, self.statistics_side = _reference(self.model_path)
        self._lock = threading.Lock()
        self._queueing = threading.Lock()  # held while one statistics copy is queued
        self._changed = threading.Condition(self._lock)
        self._queue: queue.Queue = queue.Queue()
        self._seq = 0
        self._pending: dict[int, int] = {}  # record number -> bytes in memory, from submit() to the writer's answer
        self._queued_bytes = 0
        self._flushes = 0
        self._counts = dict.fromkeys(("answered", *RECORD_STATES), 0)
        self._counts.update({f"statistics_{k}": 0 for k in STATISTICS_STATES})
        self._tallied: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._sent: collections.deque[int] = collections.deque()  # records sent to self._proc, unanswered
        self._started_at = 0.0
        self._feeder: threading.Thread | None = None
        self._stop = threading.Event()
        self._metrics = logmetrics.LogMetrics.get() if self.log.enabled else None
        self._persisted = self._load_persisted()
        self._backlog = DiskBacklog(backlog_folder(self.writer), self.run, backlog_bytes)
        if self.log.enabled:
            left = self._backlog.clear_leftovers()
            if left:
                logger.warning("inference log: deleted %d statistics backlog file(s) a killed run left", left)
            if self.log.remote:
                self._spool, self._uploader = logstore.spool(str(self.log.location))
            self._appender = Appender(str(self.log.location))
            with self._lock:
                self._start()
            threading.Thread(target=self._housekeeping, name="inference-log-tally", daemon=True).start()

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
        # one thread: a BLAS helper started at import would spin at normal priority beside the service
        env.update(dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1"))
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
                    str(self._backlog.folder),
                    str(self._backlog.max_bytes),
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

    def _count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to a counter (callers hold self._lock) and to its Prometheus series."""
        self._counts[key] += n
        if self._metrics is not None and n:
            if key.startswith("statistics_"):
                self._metrics.statistics.labels(key[len("statistics_") :]).inc(n)
            elif key in RECORD_STATES:
                self._metrics.records.labels(key).inc(n)

    def _settle(self, seqs: Iterable[int], ok: bool) -> None:
        """The statistics of records ``seqs`` are done (written or failed); counted at once."""
        done = 0
        for seq in seqs:
            size = self._pending.pop(seq, None)
            if size is not None:
                self._queued_bytes -= size
                done += 1
        if done:
            self._count("statistics_written" if ok else "statistics_failed", done)
            if self._metrics is not None:
                self._metrics.queue.dec(done)
            self._changed.notify_all()

    def _frame(self, item: Answer | OnDisk) -> bytes | None:
        """The frame of a queued item: encoded from memory, or read back from the disk backlog."""
        if not isinstance(item, OnDisk):
            return logworker.encode(item)
        frame = self._backlog.read(item)
        if self._metrics is not None:
            self._metrics.backlog.set(self._backlog.bytes)
        return frame

    def _feed(self) -> None:
        """Send the queued statistics copies to the writer, in order."""
        while True:
            seq, item = self._queue.get()
            try:
                frame = logworker.encode_flush() if seq is None else self._frame(item)
                if frame is None:
                    raise ValueError("its frame on disk is gone")
            except (TypeError, ValueError) as exc:
                logger.warning("inference log: could not encode a record: %s", exc)
                with self._lock:
                    self._settle([seq], ok=False)
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
                        self._settle([seq], ok=False)

    def _read_answers(self, proc: subprocess.Popen, sent: collections.deque[int]) -> None:
        """Count the answers of one writer process; when it ends, fail what it did not answer."""
        assert proc.stdout is not None
        while answers := proc.stdout.read1(4096):  # every answer that arrived (a byte each), at once
            with self._lock:
                done: dict[bool, list[int]] = {True: [], False: []}
                for answer in answers:
                    if answer == FLUSHED:
                        self._flushes += 1
                        self._changed.notify_all()
                    elif sent:
                        done[answer == WRITTEN].append(sent.popleft())
                self._settle(done[True], ok=True)
                self._settle(done[False], ok=False)
        proc.wait()
        with self._lock:
            lost = len(sent)
            self._settle([sent.popleft() for _ in range(lost)], ok=False)
        if lost or proc.returncode:
            logger.warning("inference log: the writer ended (exit %s); %d statistics lost", proc.returncode, lost)

    # -- the service's side ----------------------------------------------------------------------
    def submit(self, answer: Answer, statistics: bool = True) -> bool:
        """Log one answer: its answer record appended before this returns, its statistics queued
        for the writer process
        (``statistics=False``: none, e.g. an explanation). False when the answer record could not
        be kept (spool full, disk error: counted) or logging is off."""
        if not self.log.enabled:
            return False
        try:
            rec = logrecord.answer_record(answer, self.projection, self.log.metadata, statistics)
            day, line = logrecord.to_line(rec)
        except Exception as exc:  # noqa: BLE001 - a bad record must not fail the answer
            logger.warning("inference log: could not write the answer record of %s: %s", answer.request_id, exc)
            with self._lock:
                self._count("answered")
                self._count("failed")
            return False
        after = (lambda: self._queue_copy(answer)) if statistics else None
        state = self._appender.append(day, line, after)
        with self._lock:
            self._count("answered")
            self._count(state)
        dropped = self._counts["dropped"]
        if state == "dropped" and (dropped in (1, 10, 100) or dropped % 1000 == 0):
            logger.warning("inference log: spool full; %d answer record(s) dropped so far", dropped)
        return state in KEPT

    def _queue_copy(self, answer: Answer) -> None:
        """Queue the statistics copy of an answer whose record was kept (on the appender)."""
        with self._queueing:  # one copy at a time: whether it fits in memory, then its place
            self._queue_statistics(logworker.statistics_copy(answer, self.statistics_side, self.log.store_images))

    def _queue_statistics(self, item: Answer) -> None:
        """Queue one statistics copy (callers hold self._queueing): in memory, or as a
        frame on the disk backlog when the memory queue is full (encoded and written without
        holding self._lock); skipped and counted when both are full or the writer is down."""
        nbytes = int(np.asarray(item.rgb).nbytes) + (len(item.image_bytes) if item.image_bytes else 0)
        with self._lock:
            alive = self._alive()
            spill = alive and self._queued_bytes and self._queued_bytes + nbytes > self.max_queue_bytes
        queued: Answer | OnDisk | None = item if alive else None
        if spill:
            try:
                frame = logworker.encode(item)
            except (TypeError, ValueError) as exc:
                logger.warning("inference log: could not encode a record: %s", exc)
                with self._lock:
                    self._count("statistics_failed")
                return
            queued, nbytes = self._backlog.append(frame), 0
            if self._metrics is not None:
                self._metrics.backlog.set(self._backlog.bytes)
        with self._lock:
            if queued is None:
                self._count("statistics_dropped")
                return
            self._seq += 1
            self._pending[self._seq] = nbytes
            self._queued_bytes += nbytes
            if self._metrics is not None:
                self._metrics.queue.inc()
            self._queue.put((self._seq, queued))

    # -- tallies, persisted counters, uploads ------------------------------------------------------
    def _counters_file(self) -> Path:
        return logmetrics.counters_file(str(self.log.location), self.log.remote, self.writer)

    def _load_persisted(self) -> dict[str, int]:
        """The totals of this worker's earlier runs (see the module docstring), added to /metrics."""
        if not self.log.enabled:
            return {}
        totals = logmetrics.read_totals(self._counters_file())
        if self._metrics is not None:
            self._metrics.add_totals(totals, RECORD_STATES, STATISTICS_STATES)
        return totals

    def tally(self) -> None:
        """Write a tally record and persist the totals when anything changed since the last."""
        with self._lock:
            counts = dict(self._counts)
        if counts == self._tallied or not self.log.enabled:
            return
        try:
            rec = logrecord.tally_record(self.writer, self.run, self.started, counts)
            logstore.append_line(str(self.log.location), *logrecord.to_line(rec))
            totals = {k: self._persisted.get(k, 0) + v for k, v in counts.items()}
            logmetrics.write_totals(self._counters_file(), self.writer, totals)
            self._tallied = counts
        except OSError as exc:
            logger.warning("inference log: could not write the tally: %s", exc)

    def _upload(self, force: bool = False) -> None:
        """Put the spooled segments of an object-store log (counting the answer records put)."""
        if not self.log.remote:
            return
        self._spool.tick()
        put, answers = self._uploader.upload(force=force)
        if answers:
            with self._lock:
                self._count("written", answers)
        if self._uploader.last_error and not put:
            logger.warning(
                "inference log: %d segment(s) wait in %s; the store refused: %s",
                len(self._uploader.pending()),
                self._uploader.folder,
                self._uploader.last_error,
            )

    def _housekeeping(self) -> None:
        """Every TALLY_S a tally; every half second the uploads of an object-store log."""
        last = time.monotonic()
        while not self._stop.wait(0.5):
            try:
                self._upload()
                if time.monotonic() - last >= TALLY_S:
                    self.tally()
                    last = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - keep the thread alive whatever happens
                logger.warning("inference log: %s", exc)

    def handed_over(self, timeout: float = 30.0) -> bool:
        """Wait until every answer submitted so far has its statistics copy queued (or counted
        dropped); False after ``timeout`` seconds. Its answer record was written when submit returned."""
        return not self.log.enabled or self._appender.idle(timeout)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued statistics record is written (or ``timeout`` seconds), have the
        writer roll its spool segment, write a tally and put what waits in the spool; True when
        all of it happened in time."""
        deadline = time.monotonic() + timeout
        if self.log.enabled and not self.handed_over(timeout):
            return False
        with self._changed:
            if not self.log.enabled:
                return True
            if not self._changed.wait_for(lambda: not self._pending, max(0.0, deadline - time.monotonic())):
                return False
            if self._proc is not None and self._proc.poll() is None:
                target = self._flushes + 1
                self._queue.put((None, None))
                if not self._changed.wait_for(lambda: self._flushes >= target, max(0.0, deadline - time.monotonic())):
                    return False
        self.tally()
        return self._drain_spool(deadline)

    def _drain_spool(self, deadline: float) -> bool:
        """Roll and put every segment waiting in the spool (object-store log) before ``deadline``."""
        if not self.log.remote:
            return True
        self._spool.roll()
        while True:
            self._upload(force=True)
            if not self._uploader.pending():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def close(self, timeout: float = 30.0) -> bool:
        """:meth:`flush`, then end the writer process (it exits when its input closes; killed when
        it did not catch up in time: the statistics it did not write are counted) and the uploader.
        What could not be put stays in the spool for the next start."""
        deadline = time.monotonic() + timeout
        ok = self.flush(timeout)
        proc = self._proc
        if proc is not None and not ok and proc.poll() is None:
            proc.kill()  # its input may be full: closing it would wait for a process that is behind
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                ok = False
        self._stop.set()
        if self.log.enabled:
            self._abandon()
            ok = self._drain_spool(max(deadline, time.monotonic() + 1.0)) and ok
        return ok

    def _abandon(self) -> None:
        """After the writer ended: the statistics still waiting are counted dropped, their copies on
        disk deleted, and the totals tallied."""
        with self._lock:
            left = list(self._pending)
            for seq in left:
                self._queued_bytes -= self._pending.pop(seq)
            self._count("statistics_dropped", len(left))
            if self._metrics is not None and left:
                self._metrics.queue.dec(len(left))
        self._backlog.discard()
        if self._metrics is not None:
            self._metrics.backlog.set(0)
        if left:
            logger.warning("inference log: stopped before the statistics of %d answer(s) were computed", len(left))
        self.tally()

    def counters(self) -> dict[str, int]:
        """Since this worker started: answered; answer records written, spooled, dropped (spool
        full), failed (disk); statistics written, dropped (queue and backlog full, or not computed
        before the service stopped), failed; queued (statistics waiting), backlog_bytes (their
        copies on disk) and spool (segments waiting for upload)."""
        with self._lock:
            out = {**self._counts, "queued": len(self._pending), "backlog_bytes": self._backlog.bytes}
        out["spool"] = len(self._uploader.pending()) if self.log.remote else 0
        return out


def _reference(model_path: Path) -> tuple[np.ndarray | None, int]:
    """The reference profile's projection (None without one) and the longer side of the copy its
    statistics are computed on."""
    folder = model_path / bundle.REFERENCE_DIR
    projection = None
    with contextlib.suppress(OSError, ValueError):
        projection = np.load(folder / bundle.REFERENCE_PROJECTION_FILE, allow_pickle=False)
    try:  # the profile's schema, read here: pipeline.monitoring.profile imports pandas
        schema = json.loads((folder / bundle.REFERENCE_SCHEMA_FILE).read_text())
    except (OSError, ValueError):
        schema = {}
    return projection, feature_config_from_dict(schema.get("feature_config") or {}).working_max_side
