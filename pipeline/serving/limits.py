"""What one worker of the service takes on at once, whatever the requests declare: bounded memory
and bounded waiting, and a 503 with ``Retry-After`` rather than a growing queue.

* :class:`PixelGate`: at most ``$LESIONFLOW_DECODE_PIXELS`` pixels (as the images' headers declare
  them; default: one image of the largest size accepted) are being decoded at the same time. A
  decode is the one moment an upload exists at full size (:func:`pipeline.core.images.decode_rgb`
  then brings it to the working size), so this bounds the worker's memory under any mix of
  requests; small images pass side by side.
* the model's queue: at most ``$LESIONFLOW_MAX_QUEUED`` images wait for the model
  (:class:`pipeline.serving.batching.Batcher`); beyond, a request is refused at once.
* :class:`Lane`: Grad-CAM (a forward pass and a PNG, one image at a time) has a thread of its own
  at a low CPU priority with a short queue, off the threads that decode ``/classify``'s images; the
  thread decodes the upload and hands the rest to the Grad-CAM process
  (:mod:`pipeline.serving.explainer`), so a burst of ``/gradcam`` calls cannot stall
  classification. A request for which the lane has no place is refused by
  :class:`pipeline.serving.guard.Guard` before BentoML's middleware sees it (:func:`lane_for`):
  a refusal costs the event loop a few lines, not a request's worth of tracing and logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from pipeline.core.priority import lower_this_thread
from pipeline.serving.requests import MAX_IMAGE_PIXELS, ApiError

#: Pixels being decoded at once in a worker (declared sizes).
DECODE_PIXELS = int(os.environ.get("LESIONFLOW_DECODE_PIXELS", str(MAX_IMAGE_PIXELS)))
#: Seconds a decode waits for room before the request gets a 503.
DECODE_WAIT_S = float(os.environ.get("LESIONFLOW_DECODE_WAIT_S", "10"))
#: Images waiting for the model, at most.
MAX_QUEUED = int(os.environ.get("LESIONFLOW_MAX_QUEUED", "128"))
#: Grad-CAM requests waiting for their lane, at most (one runs).
GRADCAM_QUEUE = int(os.environ.get("LESIONFLOW_GRADCAM_QUEUE", "4"))
#: Seconds a Grad-CAM waits for its process (which only gets idle CPU) before the request gets a 503.
GRADCAM_TIMEOUT_S = float(os.environ.get("LESIONFLOW_GRADCAM_TIMEOUT_S", "30"))
#: What a client is told to wait before trying again.
RETRY_AFTER_S = 2


def busy(what: str) -> ApiError:
    """The 503 of a worker that has no room now."""
    return ApiError(503, "request", f"the service is busy ({what}); try again shortly", retry_after=RETRY_AFTER_S)


class PixelGate:
    """At most ``capacity`` declared pixels decoded at once, across threads (see the module docstring)."""

    def __init__(self, capacity: int = DECODE_PIXELS, wait_s: float = DECODE_WAIT_S):
        self.capacity, self.wait_s = int(capacity), float(wait_s)
        self._used = 0
        self._room = threading.Condition()
        self.refused = 0

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        """Room for decoding ``pixels`` (an image larger than the gate takes all of it), or a 503."""
        need = max(1, min(int(pixels), self.capacity))
        with self._room:
            if not self._room.wait_for(lambda: self._used + need <= self.capacity, self.wait_s):
                self.refused += 1
                raise busy("decoding other large images")
            self._used += need
        try:
            yield
        finally:
            with self._room:
                self._used -= need
                self._room.notify_all()

    @property
    def in_use(self) -> int:
        return self._used


#: How much less CPU priority (nice) a lane's thread has than the requests it must not stall.
LANE_NICENESS = 10


#: This worker's lanes by the route they serve (:func:`lane_for`).
_LANES: dict[str, Lane] = {}


def lane_for(path: str) -> Lane | None:
    """The lane of the route at ``path`` in this worker, if it has one."""
    return _LANES.get(path)


class Lane:
    """One call at a time, in a thread of its own at a lower CPU priority; at most ``queue`` more
    requests holding a place; a request for which there is no place is refused at once with a 503,
    before its body is read. With a ``route``, the worker's lane of that route (:func:`lane_for`)."""

    def __init__(self, what: str, queue: int = GRADCAM_QUEUE, route: str | None = None):
        self.what, self.queue = what, int(queue)
        self._thread = ThreadPoolExecutor(
            1, thread_name_prefix=f"lane-{what}", initializer=partial(lower_this_thread, LANE_NICENESS)
        )
        self._held = 0
        self.refused = 0
        if route is not None:
            _LANES[route] = self

    @property
    def full(self) -> bool:
        """Whether a new request would be refused now."""
        return self._held >= self.queue + 1

    def refusal(self) -> ApiError:
        """The 503 of a request for which there is no place (counted)."""
        self.refused += 1
        return busy(f"{self._held} {self.what} requests in progress")

    @contextlib.contextmanager
    def place(self) -> Iterator[None]:
        """A place in the lane for one request (from before its body is read until it is answered)."""
        if self.full:
            raise self.refusal()
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the lane's thread, one at a time (call within :meth:`place`)."""
        return await asyncio.wrap_future(self._thread.submit(fn, *args))
