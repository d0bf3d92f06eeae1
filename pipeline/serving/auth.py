"""API tokens: who may call the service. Only the tokens' sha256 hashes are stored.

The tokens file (``$LESIONFLOW_API_TOKENS_FILE``; ``lesionflow token`` keeps the project's in
``.lesionflow/api-tokens``, created 0600; in Kubernetes a Secret mounted as a file) holds one token
per line::

    # name  sha256 of the token                                                created (UTC)
    ci      9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08   2026-12-06T03:00:00Z

A client sends ``Authorization: Bearer <token>``. The service re-reads the file when it changes
(a revoked token stops working within a second, without a restart). Without a tokens file the
service answers only its probes, unless ``$LESIONFLOW_AUTH=off`` says it is reachable from this
machine alone (what ``lesionflow serve`` sets on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.core.errors import LesionflowError

TOKENS_ENV = "LESIONFLOW_API_TOKENS_FILE"
AUTH_ENV = "LESIONFLOW_AUTH"
TOKEN_PREFIX = "lf_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX = re.compile(r"[0-9a-f]{64}")


class TokenError(LesionflowError, ValueError):
    """A tokens file or a token name that cannot be used; the message names it."""


def digest(token: str) -> str:
    """The stored form of a token: its sha256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Entry:
    name: str
    sha256: str
    created: str = ""


def read_entries(path: Path) -> list[Entry]:
    """The entries of a tokens file; :class:`TokenError` naming the file and line of a bad one."""
    entries = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) not in (2, 3) or not _NAME.fullmatch(parts[0]) or not _HEX.fullmatch(parts[1]):
            raise TokenError(f"{path}: line {lineno}: expected '<name> <sha256 hex> [created]'")
        entries.append(Entry(*parts))
    return entries


def _write(path: Path, entries: list[Entry]) -> None:
    """The file, replaced atomically, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    lines = ["# lesionflow API tokens: name, sha256 of the token, created (lesionflow token add|list|revoke)"]
    lines += [f"{e.name} {e.sha256} {e.created}".rstrip() for e in entries]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)


def add(path: Path, name: str) -> str:
    """A new token named ``name``: its hash stored in ``path``, the token returned (shown once)."""
    if not _NAME.fullmatch(name):
        raise TokenError(f"token name {name!r}: letters, digits, '.', '_' and '-' only (at most 64)")
    entries = read_entries(path) if path.exists() else []
    if any(e.name == name for e in entries):
        raise TokenError(f"{path}: a token named {name!r} exists (lesionflow token revoke {name} first)")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    _write(path, [*entries, Entry(name, digest(token), created)])
    return token


def revoke(path: Path, name: str) -> None:
    """Remove the token named ``name``; :class:`TokenError` when there is none."""
    entries = read_entries(path) if path.exists() else []
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        raise TokenError(f"{path}: no token named {name!r} (lesionflow token list)")
    _write(path, kept)


class Gatekeeper:
    """What the service checks each request against: the tokens file, re-read when it changes."""

    def __init__(self, tokens_file: Path | None, open_access: bool = False):
        self.tokens_file, self.open_access = tokens_file, open_access
        self._entries: list[Entry] = []
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.error: str | None = None

    @classmethod
    def from_env(cls) -> Gatekeeper:
        path = os.environ.get(TOKENS_ENV, "").strip()
        return cls(Path(path) if path else None, os.environ.get(AUTH_ENV, "").strip().lower() == "off")

    def _refresh(self) -> None:
        now = time.monotonic()
        if self.tokens_file is None or now - self._checked < 1.0:
            return
        self._checked = now
        try:
            st = self.tokens_file.stat()
            if self._stamp != (st.st_mtime_ns, st.st_size):
                self._entries, self._stamp, self.error = (
                    read_entries(self.tokens_file),
                    (st.st_mtime_ns, st.st_size),
                    None,
                )
        except (OSError, TokenError) as exc:
            self._entries, self._stamp, self.error = [], None, str(exc)  # refuse everyone rather than guess

    def who(self, authorization: str | None) -> str | None:
        """The name of the token in an ``Authorization`` header, or None when it is not a valid one."""
        self._refresh()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        hashed = digest(token.strip())
        found = None
        for e in self._entries:  # every entry compared, in constant time
            if hmac.compare_digest(e.sha256, hashed):
                found = e.name
        return found

    def refusal(self) -> str:
        """Why a request without a valid token is refused (for the 401's message)."""
        if self.tokens_file is None:
            return (
                f"no API tokens are configured: set ${TOKENS_ENV} (lesionflow token add NAME), or "
                f"${AUTH_ENV}=off for a service only this machine can reach"
            )
        self._refresh()
        if self.error:
            return f"the tokens file cannot be read ({self.error})"
        return "missing or unknown API token: send 'Authorization: Bearer <token>'"


def project_tokens_file(state_dir: Path) -> Path:
    """Where ``lesionflow token`` keeps the project's tokens (``.lesionflow/api-tokens``)."""
    return Path(state_dir) / "api-tokens"
