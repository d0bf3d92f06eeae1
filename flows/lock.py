"""One retraining flow per workspace: an exclusive ``fcntl`` lock on ``.lesionflow/retrain.lock``.
The OS releases it when its process dies, so a crashed flow never leaves a stale lock behind."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core.layout import Layout


class WorkspaceBusy(RuntimeError):
    """Another retraining flow holds the workspace lock."""


@contextlib.contextmanager
def workspace_lock(root: Path, timeout: float = 0.0, poll: float = 2.0) -> Iterator[Path]:
    """Hold an exclusive lock on ``root/.lesionflow/retrain.lock`` for one flow.

    Waits up to ``timeout`` seconds (0: do not wait) for another holder, then raises
    :class:`WorkspaceBusy` naming it. An ``flock`` is released by the OS when its process dies,
    so a crashed flow never leaves a stale lock behind.
    """
    path = Layout(root).workspace_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = ""
                    with contextlib.suppress(OSError, ValueError):
                        holder = json.loads(path.read_text() or "{}")
                        holder = ", ".join(f"{k} {v}" for k, v in holder.items())
                    raise WorkspaceBusy(
                        f"another retraining flow is running in {root} ({holder or 'holder unknown'}); "
                        f"it holds {path}. Wait for it to finish"
                        + (f" (waited {timeout:.0f} s)" if timeout > 0 else "")
                        + " or raise the lock timeout (lesionflow run --lock-timeout SECONDS)."
                    ) from None
                time.sleep(min(poll, max(deadline - time.monotonic(), 0.05)))
        info = {
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with contextlib.suppress(Exception):
            from prefect.context import get_run_context

            info["flow_run"] = str(get_run_context().flow_run.name)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
