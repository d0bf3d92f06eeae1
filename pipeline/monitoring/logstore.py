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
  ``<prefix>/inference-YYYY-MM-DD/<writer>-<seq>.jsonl``. A record is first appended to a segment
  file in a local spool (:class:`Spool`, :func:`spool_folder`), rolled when ``roll_records``
  records are in it or the oldest is ``roll_seconds`` old (and on flush and at exit), then put by
  an :class:`Uploader`, which retries with backoff while the store is down and deletes a segment
  only once its PUT succeeded. A writer killed mid-segment leaves its records in the spool; the
  next writer to start on it rolls them (:func:`adopt_orphans`). Nothing is overwritten: two
  writers never write the same name.

Readers (:func:`iter_lines`) list every object or file of the days of a time window, whoever wrote
it. fsspec is imported only for a URL, so the local default needs nothing beyond the standard
library.
"""

from __future__ import annotations

import contextlib
import hashlib
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

from pipeline.monitoring import erasures

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


_checked: set[str] = set()  # log folders this process made sure of (private_folder)


def append_local(folder: Path | str, day: date, line: bytes) -> Path:
    """Append one line to the day file: a single ``write`` on an ``O_APPEND`` descriptor under an
    exclusive ``flock``; returns the file. Files are 0600 in a 0700 folder; neither is reached
    through a symbolic link."""
    if str(folder) not in _checked:  # once per process: the request path appends here
        private_folder(folder)
        _checked.add(str(folder))
    path = day_file(folder, day)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:  # the folder was removed meanwhile (an operator's cleanup): made again
        fd = os.open(day_file(private_folder(folder), day), flags, 0o600)
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


def filesystem(url: str) -> tuple[Any, str]:
    """The file system of ``url``: a new instance (fsspec caches them, and a cached one keeps the
    endpoint and credentials of the environment it was made in)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    return fs, root.rstrip("/")


#: Where an object-store log's records wait for their upload (``$LESIONFLOW_LOG_SPOOL``; default:
#: a folder per log URL under the temporary folder, an emptyDir in Kubernetes, which outlives a
#: container's restart).
SPOOL_ENV = "LESIONFLOW_LOG_SPOOL"
PART_SUFFIX = ".part"


def spool_base(environ: dict[str, str] | None = None) -> Path:
    """The folder holding this host's local log files: ``$LESIONFLOW_LOG_SPOOL`` (:data:`SPOOL_ENV`),
    else ``<tmp>/lesionflow-log-spool``."""
    import tempfile

    env = os.environ if environ is None else environ
    return Path(env[SPOOL_ENV]) if env.get(SPOOL_ENV) else Path(tempfile.gettempdir()) / "lesionflow-log-spool"


def spool_folder(url: str, environ: dict[str, str] | None = None) -> Path:
    """The local spool of the object-store log at ``url`` (in :func:`spool_base`)."""
    return spool_base(environ) / hashlib.sha256(url.encode()).hexdigest()[:16]


class Spool:
    """One writer's segments of an object-store log, written to a local spool folder first (see the
    module docstring). :meth:`append` adds a line to the open segment (``<day>/<writer>-<seq>.jsonl.part``,
    held under an exclusive ``flock`` while open) and rolls it (renamed to ``.jsonl``) at
    ``roll_records`` lines or when its oldest line is ``roll_seconds`` old; an :class:`Uploader` puts
    the rolled segments. At most ``max_bytes`` wait in the spool: beyond that :meth:`append` refuses
    (returns False) and the caller counts the record dropped. Thread-safe."""

    def __init__(
        self,
        folder: Path | str,
        writer: str,
        roll_records: int = 500,
        roll_seconds: float = 60.0,
        max_bytes: int = 512 << 20,
    ):
        self.folder = private_folder(folder)
        self.writer = writer
        self.roll_records, self.roll_seconds, self.max_bytes = int(roll_records), float(roll_seconds), int(max_bytes)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._day: date | None = None
        self._lines = 0
        self._since = 0.0
        self._seq = 0
        self._spooled, self._measured = 0, -1.0

    def append(self, day: date, line: bytes) -> bool:
        """Write one line of ``day`` to the open segment; False when the spool is full."""
        with self._lock:
            if self._day is not None and day != self._day:
                self._roll_locked()
            now = time.monotonic()
            if now - self._measured >= 1.0:  # the uploads shrink it: measure at most once a second
                self._spooled, self._measured = spooled_bytes(self.folder), now
            if self._spooled + len(line) > self.max_bytes:
                return False
            self._spooled += len(line)
            if self._fd is None:
                self._open_locked(day)
            assert self._fd is not None
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view) :]
            self._lines += 1
            if self._lines >= self.roll_records or time.monotonic() - self._since >= self.roll_seconds:
                self._roll_locked()
            return True

    def tick(self) -> None:
        """Roll the open segment if its oldest line is ``roll_seconds`` old."""
        with self._lock:
            if self._fd is not None and time.monotonic() - self._since >= self.roll_seconds:
                self._roll_locked()

    def roll(self) -> None:
        """Roll the open segment now (flush, shutdown)."""
        with self._lock:
            self._roll_locked()

    def _open_locked(self, day: date) -> None:
        folder = private_folder(self.folder / day.isoformat())
        self._path = folder / f"{self.writer}-{self._seq:06d}{FILE_SUFFIX}{PART_SUFFIX}"
        hidden = folder / f".{self._path.name}"  # locked before it gets the name orphans are looked up by
        self._fd = os.open(hidden, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.replace(hidden, self._path)
        self._day, self._lines, self._since = day, 0, time.monotonic()
        self._seq += 1

    def _roll_locked(self) -> None:
        if self._fd is None or self._path is None:
            return
        if self._lines:
            os.replace(self._path, self._path.with_suffix(""))  # drop .part: ready for the upload
        else:
            self._path.unlink(missing_ok=True)
        os.close(self._fd)  # after the rename: the lock is held until the segment is complete
        self._fd, self._path = None, None


#: Lines a spool segment holds before it is rolled, and its oldest line's age at most.
ROLL_RECORDS = int(os.environ.get("LESIONFLOW_LOG_ROLL_RECORDS", "500"))
ROLL_SECONDS = float(os.environ.get("LESIONFLOW_LOG_ROLL_SECONDS", "60"))
#: Bytes an object-store log's spool holds at most while the store is unreachable.
SPOOL_MB = float(os.environ.get("LESIONFLOW_LOG_SPOOL_MB", "512"))
_spools: dict[str, tuple[Spool, Uploader]] = {}


class SpoolFull(OSError):
    """The spool of an object-store log holds its maximum: a record was not kept."""


def writer_name() -> str:
    """A name no other writer of the log has: host, process and a random token."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def spool(url: str) -> tuple[Spool, Uploader]:
    """This process's spool of the object-store log at ``url`` and the uploader of its folder; the
    first call also rolls what writers killed earlier left open there (:func:`adopt_orphans`)."""
    if url not in _spools:
        folder = spool_folder(url)
        sp = Spool(folder, writer_name(), ROLL_RECORDS, ROLL_SECONDS, int(SPOOL_MB * (1 << 20)))
        adopt_orphans(folder)
        _spools[url] = (sp, Uploader(url, folder))
    return _spools[url]


def append_line(location: Path | str, day: date, line: bytes) -> str:
    """Append one line of ``day`` at ``location``: a local folder's day file (:func:`append_local`),
    or this process's spool of an object-store log; returns the file or the spool folder. An
    ``OSError`` when it could not be kept (a full spool included)."""
    if not is_url(location):
        return str(append_local(location, day, line))
    sp, _ = spool(str(location))
    if not sp.append(day, line):
        raise SpoolFull(f"{sp.folder}: the spool is full ({SPOOL_MB:g} MB); record not kept")
    return str(sp.folder)


def flush(location: Path | str, attempts: int = 3) -> bool:
    """Roll this process's open spool segment of an object-store log and put every segment waiting in
    its folder (a few attempts); True when none is left waiting (always for a local log)."""
    if not is_url(location) or str(location) not in _spools:
        return True
    sp, up = _spools[str(location)]
    sp.roll()
    for attempt in range(attempts):
        up.upload(force=True)
        if not up.pending():
            return True
        time.sleep(0.5 * (attempt + 1))
    return False


def spooled_bytes(folder: Path) -> int:
    """Bytes waiting in a spool folder."""
    total = 0
    for day in _spool_days(folder):
        for entry in os.scandir(day):
            with contextlib.suppress(FileNotFoundError):
                total += entry.stat().st_size
    return total


def _spool_days(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())


def lock_free(path: Path) -> bool:
    """Whether nobody holds the file's lock (its writer ended, killed or not): a spool segment, a
    statistics backlog chunk (:mod:`pipeline.serving.backlog`)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the lock


def adopt_orphans(folder: Path) -> int:
    """Roll the open segments of writers that ended without rolling them (SIGKILL, OOM kill): cut
    at the last complete line and ready for upload. Returns how many were adopted."""
    adopted = 0
    for day in _spool_days(folder):
        for part in sorted(day.glob(f"*{FILE_SUFFIX}{PART_SUFFIX}")):
            if not lock_free(part):
                continue
            data = part.read_bytes()
            keep = data[: data.rfind(b"\n") + 1]
            if keep:
                done = part.with_suffix("")
                fd = os.open(done, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(keep)
            part.unlink(missing_ok=True)
            adopted += 1
    return adopted


class Uploader:
    """Puts the rolled segments of a spool folder to the object store at ``url``, oldest first, each
    under its own name (never overwriting another writer's), without the records whose erasure was
    requested (:func:`pipeline.monitoring.erasures.put_without`), deleting a segment only after its
    PUT succeeded. A failed PUT is retried with exponential backoff (1 s doubling to ``max_backoff``);
    nothing is lost while the store is down: the segments wait in the spool."""

    def __init__(self, url: str, folder: Path | str, max_backoff: float = 30.0):
        self.url = url.rstrip("/")
        self.folder = Path(folder)
        self.max_backoff = float(max_backoff)
        self._fs: Any = None
        self._root = ""
        self._failures = 0
        self._next_try = 0.0
        self.last_error: str | None = None

    def object_name(self, segment: Path) -> str:
        """Where ``segment`` (``<spool>/<day>/<name>``) goes: ``<prefix>/inference-<day>/<name>``."""
        return f"{self._root}/{FILE_PREFIX}{segment.parent.name}/{segment.name}"

    def pending(self) -> list[Path]:
        """The rolled segments waiting, oldest day first."""
        return [p for day in _spool_days(self.folder) for p in sorted(day.glob(f"*{FILE_SUFFIX}"))]

    def upload(self, force: bool = False) -> tuple[int, int]:
        """Put what is waiting (unless backing off after a failure, or ``force``); returns
        ``(segments put, answer lines put)``. Raises nothing: a failure is remembered in
        :attr:`last_error` and retried later."""
        now = time.monotonic()
        if now < self._next_try and not force:
            return 0, 0
        put = answers = 0
        for segment in self.pending():
            try:
                fd = os.open(segment, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:  # put by another uploader meanwhile
                continue
            try:
                if fcntl is not None:  # one uploader per segment (threads and workers alike)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        continue
                if not segment.exists():  # put and removed while this one waited
                    continue
                with os.fdopen(os.dup(fd), "rb") as fh:
                    data = fh.read()
                try:
                    if self._fs is None:
                        self._fs, self._root = filesystem(self.url)
                    erasures.put_without(self._fs, self._root, self.object_name(segment), data)
                except Exception as exc:  # noqa: BLE001 - any store or network error: back off, retry
                    self._failures += 1
                    self._next_try = now + min(self.max_backoff, 2.0 ** (self._failures - 1))
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    return put, answers
                segment.unlink(missing_ok=True)
            finally:
                os.close(fd)
            self._failures, self.last_error = 0, None
            put += 1
            answers += data.count(ANSWER_MARK)
        return put, answers


#: How an answer record's line is recognised without parsing it (``json.dumps`` with compact separators).
ANSWER_MARK = b'"kind":"answer"'


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
    fs, root = filesystem(url)
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
