"""Work over many files on every core: the one process-pool map of lesionflow (the data contract's
file checks, the EDA statistics, drift monitoring's batches), with a progress bar."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any


def resolve_workers(workers: int) -> int:
    """``workers`` processes, 0 meaning every core this process may use."""
    if workers > 0:
        return workers
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def one_thread_per_worker() -> None:
    """Pool initializer: one BLAS/OpenMP thread per worker process (the pool uses every core)."""
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def return_freed_memory(mmap_above: int = 1 << 20, arenas: int = 2) -> bool:
    """Make this process give memory back to the system once it is freed (glibc; elsewhere a
    no-op returning False). A long-running server that decodes large images in many threads
    otherwise keeps every freed buffer: glibc raises its mmap threshold after the first large
    free (so later image buffers of 1-32 MB come from the heap) and gives each thread an arena of
    its own, and the process grows by hundreds of MB under a burst of large uploads that it has
    long finished with. Allocations of ``mmap_above`` bytes or more are mapped (and unmapped when
    freed), at most ``arenas`` arenas are used, and free heap tops are trimmed."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_above)) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, int(mmap_above)) == 1
    ok &= mallopt(_M_ARENA_MAX, int(arenas)) == 1
    return bool(ok)


def map_chunks(
    fn: Callable[[list[Any]], list[Any]],
    items: Sequence[Any],
    *,
    chunk_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    desc: str = "",
    unit: str = "img",
) -> list[Any]:
    """``fn`` over ``items`` cut into chunks of ``chunk_size``, on ``workers`` processes (0: every
    core; 1, or a single chunk: in this process); ``fn(chunk)`` returns one result per item. The
    results come back flat, in the order of ``items``. ``fn`` must be picklable (a module-level
    function, or a ``functools.partial`` of one)."""
    from tqdm.auto import tqdm

    chunks = [list(items[i : i + chunk_size]) for i in range(0, len(items), chunk_size)]
    n_workers = min(resolve_workers(workers), max(1, len(chunks)))
    results: dict[int, list[Any]] = {}
    with tqdm(total=len(items), desc=desc, unit=unit, disable=not progress) as bar:
        if n_workers == 1:
            for i, chunk in enumerate(chunks):
                results[i] = fn(chunk)
                bar.update(len(chunk))
        else:
            with ProcessPoolExecutor(max_workers=n_workers, initializer=one_thread_per_worker) as pool:
                futures = {pool.submit(fn, chunk): i for i, chunk in enumerate(chunks)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(len(chunks[futures[fut]]))
    return [r for i in range(len(chunks)) for r in results[i]]
