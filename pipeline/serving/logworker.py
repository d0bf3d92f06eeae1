"""The inference log's writer process, and the frames the service sends it.

The service (:class:`pipeline.serving.logqueue.BackgroundLog`) starts ``python -m
pipeline.serving.logworker MODEL_PATH LOCATION METADATA`` once per worker and writes one frame per answer
(:func:`statistics_copy` of its :class:`pipeline.monitoring.logrecord.Answer`) to its
standard input; this process computes each answer's features record
(:meth:`pipeline.monitoring.inferencelog.InferenceLog.log_features`: the image statistics, about
3 ms of Python per image) at the lowest CPU priority
(:func:`pipeline.core.priority.lowest_priority`) and appends it, in order (the service wrote the
answer record itself). Being a process of its own, it never holds the service's interpreter lock:
in a thread, the statistics slowed every answer in flight (``benchmarks/serve_load.py``).

**It waits while the service is busy** (:class:`Pacing`). The lowest priority alone did not keep
it out of the way: at the service's peak on 2 cores the worker used about 1.45 cores, the writer
took the rest (about 0.4 core) and the service answered 15-20% fewer requests; a process spinning
at the same priority cost as much, so it is the CPU time itself, not what it computes. So the
writer reads no frame while its service worker (the process that started it) used at least
``$LESIONFLOW_LOG_YIELD_CORES`` cores over the last tenth of a second (default: half the cores a
worker gets, that is the CPUs this process may run on divided by ``$LESIONFLOW_WORKERS``); the
copies wait in the service's memory queue and disk backlog (:mod:`pipeline.serving.backlog`), and
it catches up when the load falls. Once the backlog holds half its bound it computes whatever the
load, so that a long peak costs throughput rather than statistics.

A frame: 4-byte big-endian length of a JSON header (request id, time, the copy's shape and the
image's size), the header, then the raw bytes it announces (the statistics copy's pixels, the
uploaded file without its metadata): an upload no larger than its 200 px copy comes alone (0x0
pixels), and this process decodes it as the service did (:func:`with_pixels`), so that the service
spends nothing on pixels; never the answer's prediction or metadata. No pickle: the header is JSON,
the array is rebuilt from its shape. A frame ``{"op": "flush"}`` asks for
the open spool segment of an object-store log to be rolled (the service puts it). For each frame
the process answers one byte on its standard output: ``W`` written, ``F`` failed (a warning on
standard error says why), ``S`` flushed.

It ignores SIGINT and SIGTERM (a service's process group gets them at shutdown, and the records
still queued must be written): it ends when its standard input closes, after writing everything
it was sent. The service starts it with both signals blocked (:func:`stop_signals_blocked`), so
that one arriving while its interpreter is still starting cannot end it either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.images import strip_metadata, working_copy, working_shape
from pipeline.core.priority import lowest_priority
from pipeline.core.workers import one_thread_per_worker, resolve_workers
from pipeline.monitoring.logrecord import Answer, as_utc
from pipeline.serving.backlog import SUFFIX
from pipeline.serving.requests import MAX_IMAGE_PIXELS, ApiError, decode_image

if TYPE_CHECKING:  # imported by the writer process only (pandas, SciPy): the service imports this module
    from pipeline.monitoring.inferencelog import InferenceLog

HEADER = struct.Struct(">I")
WRITTEN, FAILED, FLUSHED = b"W", b"F", b"S"
#: What a service's process group gets at shutdown; the writer ignores them.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
#: The pixels of a statistics copy that carries its uploaded file instead (:func:`statistics_copy`).
NO_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)
NO_PIXELS.flags.writeable = False
#: Seconds without a frame after which a due object-store segment is put.
IDLE_TICK_S = 1.0
#: Seconds over which the service worker's CPU use is measured, and waited while it is busy.
PACING_WINDOW_S = 0.1

logger = logging.getLogger("lesionflow.inference_log")


def statistics_copy(answer: Answer, side: int, keep_file: bool = False) -> Answer:
    """What the writer needs of an answer for its features record (what :func:`encode` keeps): its
    request id, time, the image's size and its pixels, as the cheaper of two forms:

    * the **uploaded file**, without its embedded metadata, when it is no larger than the copy
      below (a dermoscopic JPEG usually is: 4 KB for 200x150, about 25 KB for 600x450, against
      90 KB of pixels). The service then spends nothing on the pixels; the writer decodes the file
      with the service's own decoder (:func:`with_pixels`). ``rgb`` is left empty;
    * else the **copy** the statistics read (longer side ``side``:
      :func:`pipeline.features.imagestats.statistics_copy`, without importing SciPy into the service),
      with the uploaded file only when the log keeps files (``keep_file``).

    Never the prediction, metadata or embedding, so that a copy waiting in memory holds no more than
    the bytes it is counted for."""
    rgb = np.asarray(answer.rgb)
    size = answer.size if answer.size is not None or rgb.ndim < 2 else (int(rgb.shape[1]), int(rgb.shape[0]))
    slim = {"size": size, "embedding": None, "prediction": {}, "metadata": None}
    upload = answer.image_bytes
    if rgb.ndim == 3 and upload is not None:
        h, w = working_shape(rgb.shape[0], rgb.shape[1], side)
        if len(upload) <= h * w * rgb.shape[2]:
            return replace(answer, rgb=NO_PIXELS, image_bytes=strip_metadata(upload), **slim)
    small = working_copy(rgb, side) if rgb.ndim == 3 else rgb
    return replace(answer, rgb=small, image_bytes=upload if keep_file else None, **slim)


def with_pixels(answer: Answer) -> Answer:
    """``answer`` with the pixels of its uploaded file when its frame carried the file instead of a
    copy (:func:`statistics_copy`), decoded as the service decoded it
    (:func:`pipeline.serving.requests.decode_image`); raises ValueError when the file does not decode
    to the size the service saw."""
    if np.asarray(answer.rgb).size or answer.image_bytes is None:
        return answer
    data = answer.image_bytes
    try:  # the service checked the file's bytes already; its pixels are checked again
        rgb = decode_image(data, "image", None, max_bytes=len(data), max_pixels=MAX_IMAGE_PIXELS)
    except ApiError as exc:
        raise ValueError(f"its uploaded file does not decode here: {exc}") from None
    decoded = (int(rgb.shape[1]), int(rgb.shape[0]))
    if answer.size is not None and decoded != tuple(answer.size):
        raise ValueError(f"its uploaded file decodes to {decoded}, not to the {tuple(answer.size)} the service saw")
    return replace(answer, rgb=rgb)


def encode(answer: Answer) -> bytes:
    """One log frame of ``answer``: what its features record needs (request id, time, the image's
    pixels and size, the uploaded file when :func:`statistics_copy` kept it), which :func:`decode`
    gives back.
    The prediction, metadata and embedding are its answer record's: a frame never holds them, in
    the pipe or in the disk backlog."""
    img = np.ascontiguousarray(answer.rgb)
    header = {
        "op": "log",
        "timestamp": answer.timestamp.isoformat(),
        "request_id": answer.request_id,
        "shape": list(img.shape),
        "dtype": img.dtype.str,  # ("|u1"; str(dtype) costs more than the rest of the header)
        "sizes": [img.nbytes, -1 if answer.image_bytes is None else len(answer.image_bytes)],
        "size": None if answer.size is None else [int(v) for v in answer.size],
    }
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return b"".join((HEADER.pack(len(head)), head, img.tobytes(), answer.image_bytes or b""))


def encode_flush() -> bytes:
    """The frame asking for the buffered object-store segment to be put."""
    head = b'{"op":"flush"}'
    return HEADER.pack(len(head)) + head


def decode(header: Mapping[str, Any], payload: bytes) -> Answer:
    """The :class:`Answer` of a frame's header and payload (no prediction, metadata or embedding)."""
    n_rgb, n_img = header["sizes"]
    rgb = np.frombuffer(payload[:n_rgb], dtype=np.dtype(header["dtype"])).reshape(header["shape"])
    return Answer(
        rgb=rgb,
        prediction={},
        model_tag="",
        timestamp=as_utc(header["timestamp"]),
        request_id=header["request_id"],
        image_bytes=None if n_img < 0 else payload[n_rgb : n_rgb + n_img],
        size=None if header.get("size") is None else tuple(header["size"]),
    )


class FrameReader:
    """Frames from a file descriptor (unbuffered reads, so that waiting with ``select`` sees
    every byte that arrived)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = os.read(self.fd, max(1 << 16, n - len(self.buf)))
            if not chunk:
                return False
            self.buf += chunk
        return True

    def ready(self, timeout: float) -> bool:
        """True when a frame may be read without waiting longer than ``timeout`` for its start."""
        return bool(self.buf) or bool(select.select([self.fd], [], [], timeout)[0])

    def next(self) -> tuple[dict[str, Any], bytes] | None:
        """The next ``(header, payload)``; None at the end of the input."""
        if not self._fill(HEADER.size):
            return None
        (n,) = HEADER.unpack(self.buf[: HEADER.size])
        if not self._fill(HEADER.size + n):
            return None
        header = json.loads(bytes(self.buf[HEADER.size : HEADER.size + n]))
        del self.buf[: HEADER.size + n]
        total = sum(max(n, 0) for n in header.get("sizes", ()))  # -1: a part it does not carry
        if not self._fill(total):
            return None
        payload = bytes(self.buf[:total])
        del self.buf[:total]
        return header, payload


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, every thread) process ``pid`` used so far; None when it cannot be
    read (not Linux, or the process ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def default_yield_cores(environ: Mapping[str, str] | None = None) -> float:
    """``$LESIONFLOW_LOG_YIELD_CORES``, else half the cores one service worker gets (the CPUs this
    process may run on divided by ``$LESIONFLOW_WORKERS``)."""
    env = os.environ if environ is None else environ
    if env.get("LESIONFLOW_LOG_YIELD_CORES"):
        return float(env["LESIONFLOW_LOG_YIELD_CORES"])
    return resolve_workers(0) / max(1, int(env.get("LESIONFLOW_WORKERS") or 1)) / 2


class Pacing:
    """Whether the writer should wait (see the module docstring): while process ``pid`` (the
    service worker) used at least ``cores`` cores over the last ``window`` seconds, unless the
    statistics backlog in ``backlog`` holds half of its ``backlog_bytes`` or more (no backlog, or
    ``cores`` <= 0: never waits). Where the CPU time cannot be read it never waits either."""

    def __init__(
        self, pid: int, cores: float, backlog: Path | None, backlog_bytes: int, window: float = PACING_WINDOW_S
    ):
        self.pid, self.cores, self.window = pid, float(cores), float(window)
        self.backlog, self.backlog_bytes = backlog, int(backlog_bytes)
        self._last: tuple[float, float | None] = (float("-inf"), None)  # nothing measured yet
        self._busy = False

    def busy(self) -> bool:
        """Whether the service used at least ``cores`` cores over the last window. A verdict stands
        for a window; after a longer pause (the writer waited for frames) a whole window is
        measured first."""
        now, used = time.monotonic(), cpu_seconds(self.pid)
        then, before = self._last
        if now - then < self.window:
            return self._busy
        if now - then > 2 * self.window:  # stale: measure the window from now
            time.sleep(self.window)
            then, before = now, used
            now, used = time.monotonic(), cpu_seconds(self.pid)
        self._last = (now, used)
        self._busy = used is not None and before is not None and used - before >= self.cores * (now - then)
        return self._busy

    def backlog_half_full(self) -> bool:
        """Whether the statistics copies waiting on disk take half the backlog's bound or more."""
        try:
            held = sum(p.stat().st_size for p in self.backlog.glob(f"*{SUFFIX}")) if self.backlog else 0
        except OSError:  # a chunk deleted while listing: look again next time
            return False
        return held * 2 >= self.backlog_bytes

    def wait(self) -> bool:
        """True after waiting one window because the service is busy; False: go on now."""
        if self.cores <= 0 or self.backlog is None or self.backlog_bytes <= 0:
            return False
        if not self.busy() or self.backlog_half_full():
            return False
        time.sleep(self.window)
        return True


def serve(log: InferenceLog, fd_in: int, out: Any, pacing: Pacing | None = None) -> int:
    """Write the records of the frames read from ``fd_in`` to ``log``, answering on ``out``, waiting
    while ``pacing`` says the service is busy; returns at the end of the input (after putting any
    buffered segment)."""
    frames = FrameReader(fd_in)
    while True:
        if not frames.ready(IDLE_TICK_S):
            log.tick()  # idle: an object-store segment may be due
            continue
        while pacing is not None and pacing.wait():
            log.tick()  # the service is busy; an object-store segment may be due meanwhile
        frame = frames.next()
        if frame is None:
            log.roll()
            return 0
        header, payload = frame
        if header.get("op") == "flush":
            log.roll()  # the service puts the rolled segments of an object-store log
            answer = FLUSHED
        else:
            try:
                answer = WRITTEN if log.log_features(with_pixels(decode(header, payload))) is not None else FAILED
            except Exception as exc:  # noqa: BLE001 - a bad frame must not end the log
                logger.warning("inference log: could not decode a record: %s", exc)
                answer = FAILED
        out.write(answer)
        out.flush()


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Block :data:`STOP_SIGNALS` in the calling thread while it starts the writer. A child process
    inherits the signal mask through fork and exec, so a stop signal that reaches the writer while
    its interpreter is still starting waits, and :func:`main` then ignores it. Without this, a
    service stopped within a second or two of starting lost its writer and every record sent to it.
    The service's other threads still take the signal for the service."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.serving.logworker MODEL_PATH LOCATION METADATA [BACKLOG_DIR BACKLOG_BYTES]``
    (started by the service; with the backlog's folder and bound it waits while the service is busy)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (3, 5):
        print(
            f"usage: python -m {__spec__.name if __spec__ else 'pipeline.serving.logworker'} "
            "MODEL_PATH LOCATION METADATA [BACKLOG_DIR BACKLOG_BYTES]",
            file=sys.stderr,
        )
        return 2
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by the service since the start: now ignored
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    one_thread_per_worker()  # no busy-waiting BLAS helper threads beside the service
    lowest_priority()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pipeline.monitoring.inferencelog import InferenceLog

    pacing = None
    if len(args) == 5:
        pacing = Pacing(os.getppid(), default_yield_cores(), Path(args[3]), int(args[4]))
    log = InferenceLog.for_model(Path(args[0]), args[1], args[2])
    return serve(log, sys.stdin.fileno(), sys.stdout.buffer, pacing)


if __name__ == "__main__":
    sys.exit(main())
