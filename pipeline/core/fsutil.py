"""Files: atomic writes, so that a crash or a bad input never leaves a half-written artefact
behind, and reading JSON records.

A file is written to a temporary sibling and renamed into place; a directory is built beside its
destination and swapped in only when complete (:func:`staged_dir`). The previous version stays in
place until the new one is whole. :func:`read_json` reads a record that may be missing;
:func:`require_json` one that must be there, with an error naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core.errors import LesionflowError


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: Any, sort_keys: bool = True) -> Path:
    """Write JSON atomically, with a trailing newline; sorted keys (stable diffs) unless
    ``sort_keys=False`` (DVC metrics files, whose key order is the order of DVC's columns)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def read_json(path: Path | str) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when the file is missing, unreadable or not an object."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def require_json(path: Path | str, what: str, hint: str = "") -> dict[str, Any]:
    """A JSON object that must exist at ``path``; a :class:`LesionflowError` names the file and
    ``what`` it should hold (plus ``hint``, how to get it) otherwise."""
    path = Path(path)
    if not path.exists():
        raise LesionflowError(f"{path}: {what} not found{f' ({hint})' if hint else ''}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LesionflowError(f"{path}: {what} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise LesionflowError(f"{path}: {what} must be a JSON object")
    return doc


#: The file that marks a folder outside the project's output trees as lesionflow's own output.
OUTPUT_MARKER = ".lesionflow-output"
#: The project's output trees (``artifacts/``, ``reports/`` beside ``dvc.yaml``): lesionflow's own.
OUTPUT_TREES = ("artifacts", "reports")


class OutputError(LesionflowError, FileExistsError):
    """An output that would replace something lesionflow did not write; nothing was changed."""


def _in_output_tree(path: Path) -> bool:
    """Whether ``path`` lies in a project's ``artifacts/`` or ``reports/``."""
    return any(p.name in OUTPUT_TREES and (p.parent / "dvc.yaml").is_file() for p in path.resolve().parents)


def _own_folder(folder: Path) -> bool:
    """Whether lesionflow wrote ``folder``: it carries the marker, or lies in a project's output tree."""
    return (folder / OUTPUT_MARKER).exists() or _in_output_tree(folder)


def claim_folder(final: Path | str) -> Path:
    """``final`` as an output folder that may be replaced: missing, empty, or lesionflow's own earlier
    output; else :class:`OutputError` naming it (a folder of someone's files is never replaced)."""
    final = Path(final)
    if not final.exists():
        return final
    if not final.is_dir():
        raise OutputError(f"{final}: exists and is not a folder; choose another output folder (nothing was changed)")
    if any(final.iterdir()) and not _own_folder(final):
        raise OutputError(
            f"{final}: holds files lesionflow did not write; choose a new or empty output folder (nothing was changed)"
        )
    return final


def claim_file(path: Path | str, ours: Any) -> Path:
    """``path`` as an output file that may be replaced: missing, or one ``ours(path)`` recognises as
    lesionflow's earlier output; else :class:`OutputError` naming it."""
    path = Path(path)
    if path.exists() and (not path.is_file() or not ours(path)):
        raise OutputError(
            f"{path}: exists and was not written by lesionflow; choose another file name (nothing was changed)"
        )
    return path


@contextlib.contextmanager
def staged_dir(final: Path | str) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``final`` in one rename.

    ``final`` must be missing, empty or lesionflow's own earlier output (:func:`claim_folder`),
    checked before anything is done. A folder outside the project's output trees gets the
    :data:`OUTPUT_MARKER`, so the next run may replace it. On an exception the staging directory
    is removed and ``final`` is left exactly as it was.
    """
    final = claim_folder(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-"))
    try:
        yield stage
        if not _in_output_tree(final):  # elsewhere: marked as ours, so the next run may replace it
            (stage / OUTPUT_MARKER).write_text("written by lesionflow; replaced whole by its next run\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
