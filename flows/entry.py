"""What the flows' command lines share: the schedule flags, the project root, serving a flow as a
deployment on a cron schedule, and turning a run's final state into an exit code.

    python -m flows.retrain --serve --cron "0 3 * * 1" --timezone UTC
    python -m flows.monitor --serve --cron "0 * * * *"
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from prefect.states import State

from pipeline.core import project
from pipeline.core.errors import EXIT_FAILED, EXIT_OK


def parser(prog: str, doc: str, name: str, cron: str, timezone: str) -> argparse.ArgumentParser:
    """A flow's parser with the ``--serve``, ``--name``, ``--cron`` and ``--timezone`` flags."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    ap.add_argument("--serve", action="store_true", help="serve the scheduled deployment instead of running once")
    ap.add_argument("--name", default=name, help="deployment name (with --serve)")
    ap.add_argument("--cron", default=cron, help="cron schedule (with --serve)")
    ap.add_argument("--timezone", default=timezone, help="time zone of the cron schedule (with --serve)")
    return ap


def exit_on_sigterm() -> None:
    """Make SIGTERM (``kill PID``, a supervisor, an eviction) and SIGINT (Ctrl-C) end this process
    the same way: ``SystemExit(128 + signal)`` in the main thread, so that every ``finally`` runs (a
    running stage's DVC process group is stopped: :func:`flows.stages.run_stage`), Prefect's exit
    handlers stop its temporary server, and the exit status says the run was stopped. SIGTERM's
    default action ended the process at once and left that server running; Python's
    KeyboardInterrupt for SIGINT could be taken for an ordinary error by the code it interrupted."""

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def root_or_none(prog: str) -> Path | None:
    """The project root, or None after printing why there is none."""
    try:
        return project.require_root()
    except project.ProjectNotFound as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None


def serve_on_cron(
    flow: Any,
    *,
    name: str,
    cron: str,
    timezone_name: str,
    parameters: dict[str, Any] | None,
    project_root: Path | None,
    tags: list[str],
    description: str,
    **limits: int,
) -> None:
    """Register ``flow`` as a deployment on ``cron`` with the Prefect server (``PREFECT_API_URL``)
    and execute its runs in this process until stopped (SIGTERM or Ctrl-C); at most one run at a
    time in this process (``limits`` may add e.g. ``global_limit=1`` on the server)."""
    from prefect.schedules import Cron

    flow.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone_name)],
        parameters={"project_root": str(project_root or project.require_root()), **(parameters or {})},
        tags=tags,
        description=description,
        limit=1,
        **limits,
    )


def exit_code(state: State) -> int:
    """Print a run's final state and message; 0 when it completed, else 1."""
    print(f"{state.name}: {state.message}")
    return EXIT_OK if state.is_completed() else EXIT_FAILED
