"""The statistics backlog on local disk: log frames that wait for the inference log's writer when
its in-memory queue is full.

At the service's peak the writer process (lowest CPU priority: it only takes CPU nothing else
wants) falls behind, and the statistics copies of the answers wait. The first
``$LESIONFLOW_LOG_QUEUE_MB`` wait in memory; beyond that, :class:`DiskBacklog` keeps their frames
(:func:`pipeline.serving.logworker.encode`) in chunk files of a private folder (0700, files 0600)
up to ``$LESIONFLOW_LOG_BACKLOG_MB`` (default 1024: about 11,000 answers of a 200x150 copy, and
many more of the uploaded files that are sent instead when they are smaller), and the
feeder reads them back in order once the writer catches up, when the load falls. A chunk is
deleted as soon as every frame in it was read: a copy of a patient's image stays on disk only
until its statistics are computed. What does not fit is counted as ``statistics dropped``.

The folder is ``$LESIONFLOW_LOG_SPOOL`` (or ``<tmp>/lesionflow-log-spool``)
``/statistics-backlog/<worker>``: one per service worker. A process holds each of its chunks open
under an exclusive ``flock`` until it deletes it (the spool's mechanism,
:func:`pipeline.monitoring.logstore.lock_free`), so the chunks a killed process left there, whose
lock nobody holds, are deleted when that worker starts again (they belong to answers of a run
whose counts are gone); the service warns how many files that was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.monitoring.logstore import lock_free, private_folder, spool_base

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, and leftovers are never cleared
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

#: Statistics copies kept on local disk beyond the in-memory queue, at most (MB).
BACKLOG_MB = float(os.environ.get("LESIONFLOW_LOG_BACKLOG_MB", "1024"))
#: Size at which a chunk file is closed and the next one started.
CHUNK_BYTES = 16 << 20
SUFFIX = ".frames"


def backlog_folder(writer: str, environ: dict[str, str] | None = None) -> Path:
    """The backlog folder of service worker ``writer`` (see the module docstring)."""
    return spool_base(environ) / "statistics-backlog" / writer


@dataclass(frozen=True)
class OnDisk:
    """Where one frame lies: chunk number, offset and length."""

    chunk: int
    offset: int
    length: int


@dataclass
class _Chunk:
    path: Path
    fd: int  # open under an exclusive flock from creation to deletion: the chunk of a live process
    size: int = 0
    frames: int = 0
    read: int = 0
    closed: bool = False  # no more appends

    def append(self, frame: bytes) -> int:
        """Append ``frame`` (the file is opened with O_APPEND); the bytes written."""
        return os.write(self.fd, frame)

    def delete(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class DiskBacklog:
    """Frames appended to chunk files in ``folder`` (at most ``max_bytes`` on disk) and read back
    once each (:meth:`read`, in the order the caller keeps). Thread-safe."""

    def __init__(self, folder: Path, run: str, max_bytes: int, chunk_bytes: int = CHUNK_BYTES):
        self.folder, self.run = Path(folder), run
        self.max_bytes, self.chunk_bytes = int(max_bytes), int(chunk_bytes)
        self._lock = threading.Lock()
        self._chunks: dict[int, _Chunk] = {}
        self._next = 0
        self.bytes = 0  # on disk now

    def clear_leftovers(self) -> int:
        """Delete the chunk files that processes no longer running left here (a kill: nobody holds
        their lock, :func:`pipeline.monitoring.logstore.lock_free`); returns how many. A live
        process's chunks (another replica on this host) are left alone."""
        if not self.folder.is_dir():
            return 0
        gone = 0
        for path in self.folder.glob(f"*{SUFFIX}"):
            if lock_free(path):
                with contextlib.suppress(OSError):
                    path.unlink()
                    gone += 1
        return gone

    def _open_chunk(self) -> _Chunk:
        """The chunk frames are appended to (a new one when the last is full or gone)."""
        last = self._chunks.get(self._next - 1)
        if last is not None and not last.closed and last.size < self.chunk_bytes:
            return last
        if last is not None:
            last.closed = True
            self._release(self._next - 1)
        private_folder(self.folder)
        path = self.folder / f"{self.run}-{self._next:06d}{SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        chunk = self._chunks[self._next] = _Chunk(path, fd)
        self._next += 1
        return chunk

    def append(self, frame: bytes) -> OnDisk | None:
        """Keep ``frame`` on disk; None when the backlog is full or the disk refused it."""
        with self._lock:
            if self.bytes + len(frame) > self.max_bytes:
                return None
            chunk = None
            try:
                chunk = self._open_chunk()
                written = chunk.append(frame)
                if written != len(frame):
                    raise OSError(f"{chunk.path}: wrote {written} of {len(frame)} bytes (disk full?)")
            except OSError as exc:
                logger.warning("inference log: statistics backlog %s: %s", self.folder, exc)
                if chunk is not None:  # a partial frame: nothing more is appended after it
                    with contextlib.suppress(OSError):
                        actual = chunk.path.stat().st_size
                        self.bytes += actual - chunk.size
                        chunk.size = actual
                    chunk.closed = True
                return None
            where = OnDisk(self._next - 1, chunk.size, len(frame))
            chunk.size += len(frame)
            chunk.frames += 1
            self.bytes += len(frame)
            return where

    def read(self, where: OnDisk) -> bytes | None:
        """The frame at ``where`` (None when its file is gone); its chunk is deleted once every
        frame in it was read and no more will be appended."""
        with self._lock:
            chunk = self._chunks.get(where.chunk)
            if chunk is None:
                return None
            try:
                frame = os.pread(chunk.fd, where.length, where.offset)
            except OSError as exc:
                logger.warning("inference log: statistics backlog %s: %s", chunk.path, exc)
                frame = None
            chunk.read += 1
            if chunk.read >= chunk.frames and where.chunk == self._next - 1:
                chunk.closed = True  # the writer caught up: the next append starts a new chunk
            self._release(where.chunk)
            return frame if frame is not None and len(frame) == where.length else None

    def _release(self, number: int) -> None:
        """Delete chunk ``number`` when it is closed and fully read (callers hold the lock)."""
        chunk = self._chunks[number]
        if chunk.closed and chunk.read >= chunk.frames:
            chunk.delete()
            self.bytes -= chunk.size
            del self._chunks[number]

    def discard(self) -> None:
        """Delete every chunk (shutdown: what was not computed is counted dropped by the caller)."""
        with self._lock:
            for chunk in self._chunks.values():
                chunk.delete()
            self._chunks.clear()
            self.bytes = 0
