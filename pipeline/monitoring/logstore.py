"""Where the inference log lives: a local folder, or object storage shared by every replica.

:func:`location` is the one answer, for the service's writer and the monitor's reader alike:
``$LESIONFLOW_INFERENCE_LOG`` when set (``off`` turns logging off), else ``monitor.log_url`` of
params.yaml, else :data:`pipeline.core.layout.INFERENCE_LOG`. The params.yaml is the one that
ships beside the ``pipeline`` package (a Bento's own ``src/params.yaml``, so ``bentoml serve`` and a
container honour it; in a checkout, the project's), else the project's found from the working
directory. A relative path is taken relative to the folder of that params.yaml. The location is a
path or a URL:

* a **local path** (the default, ``logs/inference``): one file per UTC day,
  ``inference-YYYY-MM-DD.jsonl``, appended one line per record under an exclusive ``flock``, so
  several workers (threads, processes, hosts on one shared file system) never interleave;
* an **object-store URL** (``s3://bucket/prefix``, ``gs://``, ``az://``, ``memory://``: any
  fsspec file system; S3 through s3fs, which reads the usual ``AWS_*`` variables, e.g.
  ``AWS_ENDPOINT_URL`` for an S3-compatible server). Object stores do not append, so each writer
  (replica) buffers its records and puts **its own append-only objects**:
  ``<prefix>/inference-YYYY-MM-DD/<host>-<pid>-<token>-<seq>.jsonl``, rolled when
  ``roll_records`` records are buffered or the oldest is ``roll_seconds`` old (and on flush and at
  exit). Nothing is overwritten: two replicas never write the same name.

Readers (:func:`iter_lines`) list every object or file of the days of a time window, whoever wrote
it. fsspec is imported only for a URL, so the local default needs nothing beyond the standard
library.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path
from typing import Any

try:  # POSIX; on other systems appends rely on O_APPEND alone
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FILE_PREFIX = "inference-"
FILE_SUFFIX = ".jsonl"
_DAY_FILE = re.compile(r"^inference-(\d{4}-\d{2}-\d{2})\.jsonl$")
_DAY_DIR = re.compile(r"^inference-(\d{4}-\d{2}-\d{2})$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names an fsspec file system other than the local one."""
    text = str(location)
    return bool(_URL.match(text)) and not text.startswith("file://")


def _local(location: str | Path) -> Path:
    text = str(location)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def resolve(location: str | Path, root: Path) -> str:
    """``location`` as the service and the monitor use it: a URL as given, a relative local path
    under the project ``root`` (absolute)."""
    if is_url(location):
        return str(location)
    path = _local(location)
    return str(path if path.is_absolute() else (Path(root) / path).resolve())


#: The variable that overrides ``monitor.log_url`` (``off`` disables the log).
LOCATION_ENV = "LESIONFLOW_INFERENCE_LOG"
_OFF = ("off", "0", "false", "none")


#: Set to 1 to keep the uploaded files in the log (:func:`images_kept`).
IMAGES_ENV = "LESIONFLOW_LOG_IMAGES"


def location(root: Path | str | None = None, environ: dict[str, str] | None = None) -> str | None:
    """Where the inference log is written and read (see the module docstring): a URL as given, a
    local folder as an absolute path, or None when ``$LESIONFLOW_INFERENCE_LOG`` turns it off.
    ``root``: the project whose params.yaml decides (``lesionflow serve``, the monitor); relative
    paths, the default included, are then taken relative to it."""
    from pipeline.core import params, project
    from pipeline.core.layout import INFERENCE_LOG

    env = os.environ if environ is None else environ
    explicit = env.get(LOCATION_ENV, "").strip()
    if explicit:
        return None if explicit.lower() in _OFF else resolve(explicit, Path.cwd())
    found = project.params_file(root)
    if found is None:
        return resolve(INFERENCE_LOG, Path(root) if root is not None else Path.cwd())
    return resolve(params.load_section("monitor", found).log_url, found.parent)


def images_kept(environ: dict[str, str] | None = None) -> bool:
    """Whether the log keeps each answer's uploaded file (``$LESIONFLOW_LOG_IMAGES=1``; without its
    EXIF and other embedded metadata); off by default."""
    return (os.environ if environ is None else environ).get(IMAGES_ENV, "0").strip() == "1"


def day_file(folder: Path | str, day: date) -> Path:
    """The local day file of ``day``."""
    return Path(folder) / f"{FILE_PREFIX}{day.isoformat()}{FILE_SUFFIX}"


def private_folder(folder: Path | str) -> Path:
    """``folder``, created readable by its owner only (0700) when missing; an ``OSError`` when it is a
    symbolic link (a log of patients' answers is never written where a link points)."""
    folder = Path(folder)
    if folder.is_symlink():
        raise OSError(f"{folder}: is a symbolic link; the inference log is not written through links")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    return folder


def append_local(folder: Path | str, day: date, line: bytes) -> Path:
    """Append one line to the day file: a single ``write`` on an ``O_APPEND`` descriptor under an
    exclusive ``flock``; returns the file. Files are 0600 in a 0700 folder; neither is reached
    through a symbolic link."""
    path = day_file(private_folder(folder), day)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:  # a file made before this rule: owner only from now on
            os.fchmod(fd, 0o600)
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            view = view[n:]
    finally:
        if fcntl is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    return path


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


class SegmentWriter:
    """One writer's buffered, append-only segment objects on an object store (see the module
    docstring). Thread-safe; :meth:`flush` writes what is buffered."""

    def __init__(self, url: str, roll_records: int = 500, roll_seconds: float = 60.0):
        self.url = url.rstrip("/")
        self.fs, self.root = _filesystem(url)
        self.roll_records, self.roll_seconds = int(roll_records), float(roll_seconds)
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._day: date | None = None
        self._lines: list[bytes] = []
        self._since = 0.0
        self._seq = 0
        atexit.register(self.flush)

    def append(self, day: date, line: bytes) -> str:
        """Buffer one line of ``day``; roll the segment when due. Returns the segment's name."""
        with self._lock:
            if self._day is not None and day != self._day:
                self._write_locked()
            if not self._lines:
                self._since = time.monotonic()
            self._day = day
            self._lines.append(line)
            name = self._name(self._seq)
            if len(self._lines) >= self.roll_records or time.monotonic() - self._since >= self.roll_seconds:
                self._write_locked()
            return name

    def tick(self) -> None:
        """Write the buffered segment if its oldest record is ``roll_seconds`` old."""
        with self._lock:
            if self._lines and time.monotonic() - self._since >= self.roll_seconds:
                self._write_locked()

    def flush(self) -> None:
        with self._lock:
            self._write_locked()

    def _name(self, seq: int) -> str:
        return f"{self.root}/{FILE_PREFIX}{self._day.isoformat()}/{self.writer}-{seq:06d}{FILE_SUFFIX}"

    def _write_locked(self) -> None:
        if not self._lines or self._day is None:
            return
        name = self._name(self._seq)
        self.fs.pipe_file(name, b"".join(self._lines))
        self._lines, self._seq = [], self._seq + 1


def local_files(folder: Path, first: date | None, last: date | None) -> list[Path]:
    """The local day files of the days ``first`` to ``last`` (either optional), oldest first."""
    out = []
    for p in sorted(folder.glob(f"{FILE_PREFIX}*{FILE_SUFFIX}")):
        m = _DAY_FILE.match(p.name)
        day = date.fromisoformat(m.group(1)) if m else None
        if day is not None and (first is None or day >= first) and (last is None or day <= last):
            out.append(p)
    return out


def remote_objects(url: str, first: date | None, last: date | None) -> tuple[Any, list[str]]:
    """The file system and the objects of the days ``first`` to ``last`` (either optional), of every writer."""
    fs, root = _filesystem(url)
    if not fs.exists(root):
        return fs, []
    out = []
    for entry in sorted(fs.ls(root, detail=False)):
        m = _DAY_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if not m:
            continue
        day = date.fromisoformat(m.group(1))
        if (first is None or day >= first) and (last is None or day <= last):
            out += sorted(f for f in fs.ls(entry, detail=False) if f.endswith(FILE_SUFFIX))
    return fs, out


def iter_lines(
    location: str | Path, start: datetime | None = None, end: datetime | None = None
) -> Iterator[tuple[str, int, str]]:
    """``(file or object, line number, line)`` of every record file of the days ``start`` to
    ``end`` (UTC; either optional) at ``location``, from every writer."""
    first, last = (start.date() if start else None), (end.date() if end else None)
    if not is_url(location):
        folder = _local(location)
        if not folder.is_dir():
            return
        for path in local_files(folder, first, last):
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    yield str(path), lineno, line
        return
    fs, names = remote_objects(str(location), first, last)
    for name in names:
        for lineno, line in enumerate(fs.cat_file(name).decode("utf-8").splitlines(), 1):
            yield name, lineno, line
