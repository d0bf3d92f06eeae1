"""The inference log's writer process, and the frames the service sends it.

The service (:class:`pipeline.serving.logqueue.BackgroundLog`) starts ``python -m
pipeline.serving.logworker MODEL_PATH LOCATION METADATA`` once per worker and writes one frame per answer
(:class:`pipeline.monitoring.logrecord.Answer`, with the image's small statistics copy) to its
standard input; this process computes each answer's features record
(:meth:`pipeline.monitoring.inferencelog.InferenceLog.log_features`: the image statistics, about
4 ms of Python per image) at the lowest CPU priority
(:func:`pipeline.core.priority.lowest_priority`) and appends it, in order (the service wrote the
answer record itself). Being a process of its own, it never holds the service's interpreter lock:
in a thread, the statistics slowed every answer in flight (``benchmarks/serve_load.py``).

A frame: 4-byte big-endian length of a JSON header, the header, then the raw bytes it announces
(the statistics copy, the float32 embedding if any, the uploaded file when images are logged). No pickle:
the header is JSON, the arrays are rebuilt from their shape. A frame ``{"op": "flush"}`` asks for
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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.core.priority import lowest_priority
from pipeline.core.workers import one_thread_per_worker
from pipeline.monitoring.logrecord import Answer, as_utc

if TYPE_CHECKING:  # imported by the writer process only (pandas, SciPy): the service imports this module
    from pipeline.monitoring.inferencelog import InferenceLog

HEADER = struct.Struct(">I")
WRITTEN, FAILED, FLUSHED = b"W", b"F", b"S"
#: What a service's process group gets at shutdown; the writer ignores them.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
#: Seconds without a frame after which a due object-store segment is put.
IDLE_TICK_S = 1.0

logger = logging.getLogger("lesionflow.inference_log")


def _plain(value: Any) -> Any:
    """JSON for NumPy scalars and arrays (the response dicts carry a few)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def encode(answer: Answer) -> bytes:
    """One log frame of ``answer``, which :func:`decode` gives back."""
    emb_raw = b"" if answer.embedding is None else np.ascontiguousarray(answer.embedding, dtype=np.float32).tobytes()
    img = np.ascontiguousarray(answer.rgb)
    header = {
        "op": "log",
        "timestamp": answer.timestamp.isoformat(),
        "request_id": answer.request_id,
        "metadata": None if answer.metadata is None else dict(answer.metadata),
        "prediction": dict(answer.prediction),
        "model_tag": str(answer.model_tag),
        "source": answer.source,
        "shape": list(img.shape),
        "dtype": str(img.dtype),
        "sizes": [img.nbytes, len(emb_raw), -1 if answer.image_bytes is None else len(answer.image_bytes)],
        "size": None if answer.size is None else [int(v) for v in answer.size],
    }
    head = json.dumps(header, separators=(",", ":"), default=_plain).encode("utf-8")
    return b"".join((HEADER.pack(len(head)), head, img.tobytes(), emb_raw, answer.image_bytes or b""))


def encode_flush() -> bytes:
    """The frame asking for the buffered object-store segment to be put."""
    head = b'{"op":"flush"}'
    return HEADER.pack(len(head)) + head


def decode(header: Mapping[str, Any], payload: bytes) -> Answer:
    """The :class:`Answer` of a frame's header and payload."""
    n_rgb, n_emb, n_img = header["sizes"]
    rgb = np.frombuffer(payload[:n_rgb], dtype=np.dtype(header["dtype"])).reshape(header["shape"])
    return Answer(
        rgb=rgb,
        prediction=header["prediction"],
        model_tag=header["model_tag"],
        metadata=header["metadata"],
        embedding=np.frombuffer(payload[n_rgb : n_rgb + n_emb], dtype=np.float32) if n_emb else None,
        timestamp=as_utc(header["timestamp"]),
        request_id=header["request_id"],
        source=header["source"],
        image_bytes=None if n_img < 0 else payload[n_rgb + n_emb : n_rgb + n_emb + n_img],
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
        sizes = header.get("sizes", [0, 0, -1])
        total = sizes[0] + sizes[1] + max(sizes[2], 0)
        if not self._fill(total):
            return None
        payload = bytes(self.buf[:total])
        del self.buf[:total]
        return header, payload


def serve(log: InferenceLog, fd_in: int, out: Any) -> int:
    """Write the records of the frames read from ``fd_in`` to ``log``, answering on ``out``; returns
    at the end of the input (after putting any buffered segment)."""
    frames = FrameReader(fd_in)
    while True:
        if not frames.ready(IDLE_TICK_S):
            log.tick()  # idle: an object-store segment may be due
            continue
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
                answer = WRITTEN if log.log_features(decode(header, payload)) is not None else FAILED
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
    """``python -m pipeline.serving.logworker MODEL_PATH LOCATION METADATA`` (started by the service)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m pipeline.serving.logworker MODEL_PATH LOCATION METADATA", file=sys.stderr)
        return 2
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by the service since the start: now ignored
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    one_thread_per_worker()  # no busy-waiting BLAS helper threads beside the service
    lowest_priority()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pipeline.monitoring.inferencelog import InferenceLog

    return serve(InferenceLog.for_model(Path(args[0]), args[1], args[2]), sys.stdin.fileno(), sys.stdout.buffer)


if __name__ == "__main__":
    sys.exit(main())
