"""Adaptive batching of model calls inside the service's worker."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio


class QueueFull(Exception):
    """The model's queue holds as many items as it may: the request is refused, not queued."""


class Batcher:
    """Adaptive (greedy) batching of model calls inside the worker: while the model is busy,
    requests queue up; as soon as it is free it takes everything queued (at most ``max_batch``)
    in one call. Under low load a request runs alone with no added wait; under high load the
    batches grow with the backlog, up to ``max_queued`` waiting items: beyond that
    :meth:`reserve` refuses (:class:`QueueFull`), so the wait stays bounded. ``fn`` (run in a
    thread) maps a list of items to a list of results; an exception fails only the requests of
    that batch."""

    def __init__(self, fn: Any, max_batch: int, max_queued: int = 1 << 30):
        self.fn, self.max_batch, self.max_queued = fn, max_batch, max_queued
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0
        self.largest = 0
        self.refused = 0
        self._reserved = 0

    def reserve(self, n: int) -> None:
        """Take ``n`` places in the queue for a request about to submit ``n`` items (call before its
        decoding work, so a refused request costs nothing); :class:`QueueFull` when they do not fit.
        Each :meth:`submit` gives one place back."""
        if self._reserved + n > self.max_queued:
            self.refused += 1
            raise QueueFull(f"{self._reserved} images waiting for the model (at most {self.max_queued})")
        self._reserved += n

    def release(self, n: int) -> None:
        """Give back places reserved for items that will not be submitted (a refused request)."""
        self._reserved = max(0, self._reserved - n)

    async def submit(self, item: Any) -> Any:
        """The result of ``item`` (one place reserved with :meth:`reserve`, given back here)."""
        loop = asyncio.get_running_loop()
        if self.queue is None or self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run())
        fut = loop.create_future()
        try:
            await self.queue.put((item, fut))
            return await fut
        finally:
            self.release(1)

    async def _run(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            batch = [(item, fut) for item, fut in batch if not fut.done()]  # drop cancelled requests
            if not batch:
                continue
            self.batches += 1
            self.items += len(batch)
            self.largest = max(self.largest, len(batch))
            try:
                results = await anyio.to_thread.run_sync(self.fn, [item for item, _ in batch])
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)

    def stats(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "images": self.items,
            "largest_batch": self.largest,
            "mean_batch_size": round(self.items / self.batches, 2) if self.batches else None,
            "max_batch_size": self.max_batch,
            "queued": self._reserved,
            "max_queued": self.max_queued,
            "refused": self.refused,
        }
