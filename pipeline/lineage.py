"""Lineage: what every artefact carries so that an auditor can trace it back.

:func:`lineage` returns the git commit (and whether the tree was dirty), the data version (the
directory md5 recorded in ``data.dvc``), the parameters used and the versions of the libraries
that matter. Works without git or DVC installed (e.g. on a bare GPU machine): the commit then
comes from ``LESIONFLOW_GIT_COMMIT`` or is ``"unknown"``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import yaml

DEFAULT_LIBRARIES = ("lesionflow", "torch", "torchvision", "numpy", "pandas", "scikit-learn", "pillow")


def git_commit(root: Path | str = ".") -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the repository at ``root``."""
    env_commit = os.environ.get("LESIONFLOW_GIT_COMMIT")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
        return {"commit": sha, "dirty": bool(status)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": env_commit or "unknown", "dirty": None}


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
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def library_versions(names: Iterable[str] = DEFAULT_LIBRARIES) -> dict[str, str]:
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
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(root),
        "data": data_version(Path(root) / dvc_file),
        "params": params or {},
        "files": {str(f): file_md5(f) for f in files},
        "libraries": library_versions(libraries),
        "host": platform.node(),
    }
