"""Keeping the inference log no longer and no more exactly than needed: retention and erasure.

* :func:`prune`: delete every day of records older than ``monitor.log_retention_days`` (a local day
  file, or an object-store day's objects), as the monitoring flow does on each run and
  ``lesionflow logs prune`` does on demand;
* :func:`forget`: erase the record of one answer (its ``request_id``, returned to the client in the
  answer and its ``X-Request-ID`` header) wherever it is stored, the uploaded image it may carry
  included, and say what was removed (``lesionflow logs forget REQUEST_ID``); on object storage it
  first leaves an erasure request, which every replica's uploader honours for the records still in
  its spool (:mod:`pipeline.monitoring.erasures`).

A local day file is rewritten in place under the same exclusive lock the service appends with, so an
answer logged meanwhile is neither lost nor torn; an object is rewritten whole (objects are never
appended to) or deleted when nothing is left in it.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.monitoring import erasures, logstore


def _cutoff(days: float, now: datetime | None) -> date:
    """The first day kept: a day is deleted once all of it is older than ``days``."""
    return ((now or datetime.now(UTC)) - timedelta(days=days)).date()


def prune(location: str | Path, days: float, now: datetime | None = None) -> list[str]:
    """Delete the log's days before ``now - days`` (whole UTC days), and on object storage the
    erasure requests of those days; returns what was deleted."""
    last = _cutoff(days, now) - timedelta(days=1)
    removed: list[str] = []
    if not logstore.is_url(location):
        folder = Path(str(location))
        if folder.is_dir() and not folder.is_symlink():
            for path in logstore.local_files(folder, None, last):
                path.unlink()
                removed.append(str(path))
        return removed
    fs, names = logstore.remote_objects(str(location), None, last)
    for name in names:
        fs.rm_file(name)
        removed.append(name)
    return removed + erasures.prune(fs, logstore.filesystem(str(location))[1], last)


def _forget_local(path: Path, request_id: str) -> int:
    """Rewrite one day file without the records of ``request_id``, under the appenders' lock."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        if logstore.fcntl is not None:
            logstore.fcntl.flock(fd, logstore.fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r+", encoding="utf-8") as fh:
            text, dropped = erasures.without(fh.read(), (request_id,))
            if dropped:
                fh.seek(0)
                fh.write(text)
                fh.truncate()
                fh.flush()
                os.fsync(fh.fileno())
        return dropped
    finally:
        os.close(fd)  # closing releases the lock


def forget(location: str | Path, request_id: str) -> list[dict[str, Any]]:
    """Erase the records of ``request_id`` at ``location``; returns ``[{"where", "records"}]`` per
    file or object that held one (empty when none did)."""
    request_id = request_id.strip()
    if not request_id or len(request_id) > 128 or not request_id.replace("-", "").isalnum():
        raise ValueError(f"not a request id: {request_id[:40]!r}")
    found: list[dict[str, Any]] = []
    if not logstore.is_url(location):
        folder = Path(str(location))
        for path in logstore.local_files(folder, None, None) if folder.is_dir() else []:
            if (n := _forget_local(path, request_id)) > 0:
                found.append({"where": str(path), "records": n})
        return found
    fs, root = logstore.filesystem(str(location))
    erasures.request(fs, root, request_id)  # first: for the records still in a replica's spool
    fs, names = logstore.remote_objects(str(location), None, None)
    for name in names:
        text, dropped = erasures.without(fs.cat_file(name).decode("utf-8"), (request_id,))
        if not dropped:
            continue
        if text.strip():
            fs.pipe_file(name, text.encode("utf-8"))
        else:
            fs.rm_file(name)
        found.append({"where": name, "records": dropped})
    return found
