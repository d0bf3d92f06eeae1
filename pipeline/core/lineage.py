"""Lineage: what every artefact carries so that an auditor can trace it back.

:func:`lineage` returns the git commit (and whether the tracked code differs from it:
:func:`git_state`, the one rule), the data version (the directory md5 recorded in ``data.dvc``),
the parameters used, the md5 of the input files and the versions of the libraries that matter.
Works without git or DVC installed (e.g. on a bare GPU machine): the commit then
comes from ``LESIONFLOW_GIT_COMMIT`` or is ``"unknown"``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

DEFAULT_LIBRARIES = ("lesionflow", "torch", "torchvision", "numpy", "pandas", "scikit-learn", "pillow")


#: Tracked files a pipeline run rewrites itself: their changes do not make the code differ from the
#: commit (a packaged model stores dvc.lock's stage hashes itself).
RUN_RECORDS = ("dvc.lock",)


def git_state(root: Path | str = ".") -> dict[str, Any]:
    """The commit the code at ``root`` comes from: ``commit``; ``dirty``, whether tracked files other
    than :data:`RUN_RECORDS` differ from it; ``modified``, those files; ``run_records_modified``,
    e.g. ``dvc.lock`` rewritten by the run that is being recorded. Untracked files do not count.
    Without git (a bare GPU machine): the commit from ``$LESIONFLOW_GIT_COMMIT`` or ``unknown``,
    ``dirty`` None."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": os.environ.get("LESIONFLOW_GIT_COMMIT") or "unknown", "dirty": None}
    changed = sorted({line[3:].strip().split(" -> ")[-1] for line in status.splitlines() if line.strip()})
    modified = [f for f in changed if f not in RUN_RECORDS]
    return {
        "commit": sha,
        "dirty": bool(modified),
        "modified": modified,
        "run_records_modified": [f for f in changed if f in RUN_RECORDS],
    }


def data_version(dvc_file: Path | str = "data.dvc") -> dict[str, Any]:
    """The data version recorded in a ``.dvc`` pointer file: md5, size and file count."""
    path = Path(dvc_file)
    if not path.exists():
        return {"md5": os.environ.get("LESIONFLOW_DATA_MD5", "unknown"), "source": str(path)}
    doc = yaml.safe_load(path.read_text()) or {}
    outs = doc.get("outs") or [{}]
    out = outs[0]
    return {
        "md5": out.get("md5", "unknown"),
        "size": out.get("size"),
        "nfiles": out.get("nfiles"),
        "path": out.get("path"),
        "source": str(path),
    }


def file_md5(path: Path | str, chunk: int = 1 << 20) -> str:
    """The md5 of a file's bytes (hex), read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions(names: Iterable[str] = DEFAULT_LIBRARIES) -> dict[str, str]:
    """The installed version of each distribution (``not installed`` when absent) and Python's."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def lineage(
    params: dict[str, Any] | None = None,
    files: Iterable[Path | str] = (),
    root: Path | str = ".",
    dvc_file: Path | str = "data.dvc",
    libraries: Iterable[str] = DEFAULT_LIBRARIES,
) -> dict[str, Any]:
    """Everything needed to trace an artefact: code, data, params, input files, libraries."""
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git": git_state(root),
        "data": data_version(Path(root) / dvc_file),
        "params": params or {},
        "files": {str(f): file_md5(f) for f in files},
        "libraries": library_versions(libraries),
        "host": platform.node(),
    }
