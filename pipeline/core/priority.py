"""The CPU priority of the service's helpers: what they take only when the requests do not want it.

* :func:`lowest_priority`: a whole process in Linux's ``SCHED_IDLE`` class (the inference log's
  writer, :mod:`pipeline.serving.logworker`; the Grad-CAM process, :mod:`pipeline.serving.explainer`);
* :func:`lower_this_thread`: one thread's nice value raised (the Grad-CAM lane's thread,
  :class:`pipeline.serving.limits.Lane`).
"""

from __future__ import annotations

import contextlib
import os
import threading


def _threads() -> list[int]:
    """This process's thread ids (Linux's /proc; the class is set per thread there)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def lowest_priority() -> str:
    """Run this process only on CPU nothing else wants: Linux's ``SCHED_IDLE`` class for every
    thread it has (a thread a library started at import keeps its class otherwise), else nice 19
    (which still takes a share of a busy core). Returns which it got."""
    with contextlib.suppress(AttributeError, OSError):
        for tid in _threads():
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: best effort
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        return "nice 19"
    return "normal"


def lower_this_thread(niceness: int) -> None:
    """This thread's nice value raised by ``niceness`` (Linux: nice applies per thread), so that
    the scheduler serves the other threads first; a thread initializer."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux: best effort
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
