"""Erasure requests of an object-store inference log: how ``lesionflow logs forget`` reaches the
records it cannot see yet.

An answer record of an object-store log first waits in its replica's local spool (up to
``LESIONFLOW_LOG_ROLL_SECONDS``, and as long as the store is down), on a machine that ``forget``
cannot reach. So :func:`pipeline.monitoring.logcare.forget` also leaves an erasure request in the
store, ``<log>/erasures/<day>/<request_id>`` (:func:`request`), and every replica's uploader puts a
segment through :func:`put_without`: the records of every request are dropped before the PUT, and
the requests are listed again once it has succeeded, so that a ``forget`` which listed the objects
just before that PUT (and found nothing) is still honoured. Requests are kept as long as the log's
records (:func:`prune`, with ``monitor.log_retention_days``).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import UTC, date, datetime
from typing import Any

#: The folder of erasure requests, beside the log's day folders.
FOLDER = "erasures"


def without(text: str, ids: Collection[str]) -> tuple[str, int]:
    """The lines of ``text`` but the records of the request ids ``ids`` (and the ``<id>-<k>`` of a
    batch), and how many were dropped; a line that is not a record is kept as it is."""
    kept, dropped = [], 0
    for line in text.splitlines(keepends=True):
        if any(i in line for i in ids):
            try:
                rid = str(json.loads(line).get("request_id", ""))
            except (ValueError, AttributeError):
                rid = ""
            if any(rid == i or rid.startswith(f"{i}-") for i in ids):
                dropped += 1
                continue
        kept.append(line)
    return "".join(kept), dropped


def request(fs: Any, root: str, request_id: str, when: datetime | None = None) -> str:
    """Leave the erasure request of ``request_id`` in the store (file system ``fs``, log at ``root``);
    returns its name."""
    when = when or datetime.now(UTC)
    name = f"{root}/{FOLDER}/{when.date().isoformat()}/{request_id}"
    fs.pipe_file(name, json.dumps({"request_id": request_id, "requested_at": when.isoformat()}).encode())
    return name


def requested(fs: Any, root: str) -> frozenset[str]:
    """The request ids whose erasure was requested in the log at ``root`` (listed afresh: a file
    system that caches listings, as s3fs does, would not see another process's new request)."""
    folder = f"{root}/{FOLDER}"
    fs.invalidate_cache(folder)
    try:
        names = fs.find(folder)
    except FileNotFoundError:
        return frozenset()
    return frozenset(str(name).rstrip("/").rsplit("/", 1)[-1] for name in names)


def _dropped(data: bytes, ids: Collection[str]) -> bytes:
    if not ids or not any(i.encode() in data for i in ids):
        return data
    return without(data.decode("utf-8"), ids)[0].encode("utf-8")


def put_without(fs: Any, root: str, name: str, data: bytes) -> bytes:
    """Put ``data`` (a segment's lines) at ``name`` without the records whose erasure was requested,
    before the PUT and after it (see the module docstring); nothing is put when nothing is left.
    Returns what the object holds. Store errors propagate (the uploader retries)."""
    before = requested(fs, root)
    kept = _dropped(data, before)
    if not kept:
        return kept
    fs.pipe_file(name, kept)
    late = requested(fs, root) - before
    again = _dropped(kept, late)
    if again != kept:
        if again:
            fs.pipe_file(name, again)
        else:
            fs.rm_file(name)
    return again


def prune(fs: Any, root: str, last: date) -> list[str]:
    """Delete the erasure requests of the days up to ``last``; returns the day folders deleted."""
    folder = f"{root}/{FOLDER}"
    removed = []
    for entry in sorted(fs.ls(folder, detail=False)) if fs.exists(folder) else []:
        try:
            day = date.fromisoformat(str(entry).rstrip("/").rsplit("/", 1)[-1])
        except ValueError:
            continue
        if day <= last:
            fs.rm(entry, recursive=True)
            removed.append(str(entry))
    return removed
