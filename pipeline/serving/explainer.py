"""Grad-CAM overlays in a process of their own (the service's ``/gradcam``).

A Grad-CAM overlay (a forward pass, the heatmap, the blend and its PNG) is computed in one child
process of the worker, one image at a time, at the lowest CPU priority
(:func:`pipeline.core.priority.lowest_priority`): it uses the CPU classification leaves idle. In a
thread of the worker, even a low-priority one, it held the worker's interpreter lock between its
native calls, and whenever the scheduler parked it holding the lock, the threads answering
``/classify`` waited for it (a priority inversion): a burst of ``/gradcam`` calls stretched the
tail of ``/classify``'s latency (``test_gradcam_bursts_do_not_stall_classification``).

The worker decodes the upload first (its :class:`~pipeline.serving.limits.PixelGate` bounds that
memory) and sends the child the image at its working size; the child answers the PNG and the class
it explains. The child loads the packaged model itself (:func:`pipeline.model.engines.load_predictor`
on one thread: the ONNX graph's class activation maps, or torch's Grad-CAM for a model packaged
without them). It starts on the first call (``spawn``: the worker has threads, which ``fork`` would
not copy safely), from the calling thread, whose priority it inherits until it lowers its own; one
that dies is replaced on the next call. No pickle from a user crosses the boundary: the worker sends
an array it decoded and metadata it validated.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.priority import lowest_priority
from pipeline.serving.limits import GRADCAM_TIMEOUT_S, busy
from pipeline.serving.requests import ApiError

logger = logging.getLogger("lesionflow.service")


class Explainer:
    """The worker's Grad-CAM process for the packaged model at ``model_path`` (see the module docstring)."""

    def __init__(self, model_path: Path | str, engine: str = "auto", timeout_s: float = GRADCAM_TIMEOUT_S):
        self.model_path, self.engine, self.timeout_s = str(model_path), engine, float(timeout_s)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.restarts = 0

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start,
                    initargs=(self.model_path, self.engine),
                )
            return self._pool

    def overlay(self, rgb: np.ndarray, columns: dict[str, list[Any]]) -> tuple[bytes, int]:
        """The PNG of ``rgb`` (an (H, W, 3) uint8 image) blended with the Grad-CAM heatmap of its
        predicted native-level class, and that class's index. ApiError 503 (with ``Retry-After``)
        when the child has not answered within ``timeout_s`` (it only gets CPU nothing else wants)
        or has died (the next call starts a new one)."""
        try:
            future = self._executor().submit(_overlay, rgb, columns)
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            future.cancel()  # not started yet: dropped; started: its answer is dropped
            raise busy(f"Grad-CAM found no idle CPU within {self.timeout_s:g} s") from None
        except BrokenProcessPool:
            self._replace()
            raise ApiError(503, "request", "the Grad-CAM process ended; try again", retry_after=1) from None

    def _replace(self) -> None:
        """Forget a child that died (a kill, running out of memory); the next call starts another."""
        with self._lock:
            pool, self._pool = self._pool, None
            self.restarts += 1
        logger.warning("Grad-CAM: its process ended; a new one starts on the next request")
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def pids(self) -> list[int]:
        """The child's process id, once started (for tests and operators)."""
        pool = self._pool
        return sorted(getattr(pool, "_processes", None) or {}) if pool is not None else []

    def close(self) -> None:
        """End the child (the service's shutdown); a call after this starts a new one."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# -- in the child -----------------------------------------------------------------------------
_MODEL: dict[str, Any] = {}


def _start(model_path: str, engine: str) -> None:
    """Child initializer: the lowest CPU priority, then the model on one thread."""
    from pipeline.core.workers import one_thread_per_worker
    from pipeline.model.engines import load_predictor

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker's Ctrl-C ends it through the worker
    lowest_priority()
    one_thread_per_worker()
    predictor = load_predictor(Path(model_path), engine, "cpu", threads=1)
    if predictor.engine != "torch" and not getattr(predictor, "explains", False):  # no class activation maps
        from pipeline.model.inference import load_model

        predictor = load_model(Path(model_path), device="cpu", engine="torch")  # torch's Grad-CAM instead
    _MODEL["predictor"] = predictor
    lowest_priority()  # threads the libraries started while loading


def _overlay(rgb: np.ndarray, columns: dict[str, list[Any]]) -> tuple[bytes, int]:
    """The overlay PNG and the explained class of one image (in the child)."""
    from PIL import Image

    from pipeline.model.cam import overlay

    predictor = _MODEL["predictor"]
    if predictor.engine == "torch":
        from pipeline.model import explain

        target = int(np.argmax(predictor.predict([rgb], metadata=columns)["native_probs"][0]))
        heat = explain.gradcam(predictor, rgb, target_class=target, metadata=columns)
    else:
        heat, target = predictor.explain(rgb, metadata=columns)
    buf = io.BytesIO()
    Image.fromarray(overlay(rgb, heat)).save(buf, format="PNG")
    return buf.getvalue(), int(target)
