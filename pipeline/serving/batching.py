"""Adaptive batching of model calls inside the service's worker."""

from __future__ import annotations

import asyncio
from typing import Any

import anyio


class Batcher:
    """Adaptive (greedy) batching of model calls inside the worker: while the model is busy,
    requests queue up; as soon as it is free it takes everything queued (at most ``max_batch``)
    in one call. Under low load a request runs alone with no added wait; under high load the
    batches grow with the backlog. ``fn`` (run in a thread) maps a list of items to a list of
    results; an exception fails only the requests of that batch."""

    def __init__(self, fn: Any, max_batch: int):
        self.fn, self.max_batch = fn, max_batch
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0
        self.largest = 0

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        if self.queue is None or self.task is None or self.task.done():
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run())
        fut = loop.create_future()
        await self.queue.put((item, fut))
        return await fut

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
        }
