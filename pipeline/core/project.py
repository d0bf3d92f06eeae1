"""The project: where its root is, and the environment every entry point runs in.

Every entry point (the ``lesionflow`` CLI, ``python -m pipeline.…``, ``python -m flows.…``) calls
:func:`configure` before Prefect, BentoML or DVC are imported, so that it needs nothing from the
shell (no Makefile variables, no sourced files):

* the **project root** is the nearest folder, from the working directory upwards, that holds both
  ``dvc.yaml`` and ``params.yaml`` (as git finds ``.git`` and DVC finds ``.dvc``); paths in
  ``dvc.yaml`` and ``params.yaml`` are relative to it;
* the project's own stores: ``BENTOML_HOME`` = ``<root>/.lesionflow/bentoml`` (the model store
  and the Bentos) and ``PREFECT_HOME`` = ``<root>/.lesionflow/prefect`` (the ephemeral Prefect
  server's database), created when missing (Prefect does not create a missing parent folder and
  its ephemeral server then fails with "unable to open database file");
* offline and quiet: Prefect's, DVC's and BentoML's telemetry off, and a Prefect ephemeral-server
  start-up timeout that a first start (database migrations, 11-17 s on 2 cores) fits in. With
  Prefect's analytics on, its ephemeral server also runs a telemetry service that writes a
  ``TELEMETRY_SESSION`` row into the same SQLite database as the flow run, which now and then
  fails with ``database is locked`` (a traceback in the log) and then fails to send its heartbeat
  offline; with analytics off that service does not start at all.

A variable that is already set always wins (an operator's ``BENTOML_HOME``, a test's temporary
``PREFECT_HOME``). Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Files that mark the project root (both must be present).
ROOT_MARKERS: tuple[str, ...] = ("dvc.yaml", "params.yaml")
#: The project's local state folder (git-ignored).
STATE_DIR = ".lesionflow"

#: Offline/quiet settings, applied unless already set.
OFFLINE_ENV: dict[str, str] = {
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "BENTOML_DO_NOT_TRACK": "true",
}
#: Store variables and their folder under ``<root>/.lesionflow``.
HOMES: dict[str, str] = {"BENTOML_HOME": "bentoml", "PREFECT_HOME": "prefect"}


class ProjectNotFound(RuntimeError):
    """No lesionflow project at or above a folder."""

    def __init__(self, start: Path):
        self.start = start
        super().__init__(
            f"not inside a lesionflow project: no folder holding {' and '.join(ROOT_MARKERS)} at or "
            f"above {start} (run from the project or one of its subfolders)"
        )


#: The folder holding the ``pipeline`` package: a Bento's ``src/``, or a checkout's root.
PACKAGE_HOME = Path(__file__).resolve().parents[2]


def params_file(root: Path | str | None = None) -> Path | None:
    """The ``params.yaml`` that applies to code running from this installation: ``root``'s when a
    project root is given; else the one beside the ``pipeline`` package (a Bento ships the
    project's in its ``src/``, so a Bento honours it wherever it runs; in a checkout it is the
    project's own); else the project's found from the working directory; None when there is none."""
    if root is not None:
        candidate = Path(root) / "params.yaml"
        return candidate if candidate.is_file() else None
    if (PACKAGE_HOME / "params.yaml").is_file():
        return PACKAGE_HOME / "params.yaml"
    found = find_root()
    return None if found is None else found / "params.yaml"


def find_root(start: Path | str | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) that holds every
    file of :data:`ROOT_MARKERS`, or None."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / marker).is_file() for marker in ROOT_MARKERS):
            return folder
    return None


def require_root(start: Path | str | None = None) -> Path:
    """:func:`find_root`, or :class:`ProjectNotFound`."""
    root = find_root(start)
    if root is None:
        raise ProjectNotFound(Path(start if start is not None else Path.cwd()).resolve())
    return root


def default_homes(root: Path) -> dict[str, Path]:
    """The project's default store folders (``BENTOML_HOME``, ``PREFECT_HOME``)."""
    return {var: Path(root) / STATE_DIR / sub for var, sub in HOMES.items()}


def configure(root: Path | str | None = None, *, environ: dict[str, str] | None = None) -> Path | None:
    """Set up ``environ`` (default ``os.environ``) for lesionflow and return the project root.

    ``root``: the project root (default: :func:`find_root` from the working directory). The
    offline settings are applied in any case; the store variables only inside a project, and only
    when not already set. The store folders named by the variables are created when missing.
    Idempotent; call it before importing Prefect or BentoML.
    """
    env = os.environ if environ is None else environ
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
    root_path = Path(root).resolve() if root is not None else find_root()
    if root_path is not None:
        for var, folder in default_homes(root_path).items():
            env.setdefault(var, str(folder))
    for var in HOMES:
        if env.get(var):
            Path(env[var]).expanduser().mkdir(parents=True, exist_ok=True)
    return root_path


def store_source(var: str, root: Path | None, environ: dict[str, str] | None = None) -> str:
    """Where ``var``'s value comes from: ``project`` (the project's default folder), ``environment``
    (set by the user or a caller to something else) or ``unset``."""
    env = os.environ if environ is None else environ
    value = env.get(var)
    if not value:
        return "unset"
    if root is not None and Path(value).expanduser().resolve() == default_homes(root)[var].resolve():
        return "project"
    return "environment"


def enter(start: Path | str | None = None) -> Path | None:
    """:func:`configure`, then make the project root the working directory, as DVC does for a
    stage's command (the paths in ``dvc.yaml`` and ``params.yaml`` are relative to the root), so a
    stage runs the same from any subfolder. Outside a project only the offline settings apply and
    the working directory stays. Returns the root (or None)."""
    root = configure(find_root(start))
    if root is not None and Path.cwd().resolve() != root:
        os.chdir(root)
    return root
