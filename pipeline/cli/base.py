"""The ``lesionflow`` command line: the Typer app, its consoles and what every command shares.

Every command first configures itself (:func:`pipeline.core.project.configure`: the project root,
its BentoML store and Prefect home under ``.lesionflow/``, telemetry off); paths a user gives are
taken relative to the working directory, as typed. Output to a terminal wraps at its width; output
to a log, a pipe or CI is never hard-wrapped (long paths stay on one line). Heavy imports (torch,
Prefect, BentoML) happen inside the commands, so ``lesionflow --help`` is instant. Predictions are
research output, not for clinical use. The commands are in the sibling modules
(``pipeline/cli/*.py``), registered on :data:`app`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from pipeline.core import project
from pipeline.core.errors import EXIT_USER_ERROR
from pipeline.core.reporting import fmt

app = typer.Typer(
    name="lesionflow",
    help="Train, gate, package, trace and serve the lesionflow skin-lesion classifier. Not for clinical use.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # usage errors in rich's boxed panels on a terminal; plain one-line click messages in a log or a
    # pipe, where a panel would hard-wrap a long value (a path) at 80 columns
    rich_markup_mode="rich" if sys.stderr.isatty() else None,
)
#: Width of output that does not go to a terminal: wide enough that tables never wrap a cell.
LOG_WIDTH = 1000
DISCLAIMER = "Research prototype: not a medical device, not for clinical use."


def make_console(stderr: bool = False) -> Console:
    """A rich console for stdout (or stderr): on a terminal it wraps at the terminal's width; to a
    log, a pipe or CI it never hard-wraps text (``soft_wrap``) and lays tables out at
    :data:`LOG_WIDTH`, so that a path is never split across lines."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=LOG_WIDTH)


class _CurrentConsole:
    """The console of the stream as it is when a command runs (tests swap the streams)."""

    def __init__(self, stderr: bool):
        self.stderr = stderr
        self.console = make_console(stderr)

    def reset(self) -> None:
        self.console = make_console(self.stderr)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


out = _CurrentConsole(stderr=False)
err = _CurrentConsole(stderr=True)
#: The project root found by the callback (None outside a project).
ROOT: Path | None = None


@app.callback()
def _configure() -> None:
    """Configure the environment (project root, stores, telemetry off) before any command."""
    global ROOT
    out.reset()
    err.reset()
    ROOT = project.configure()


def safe(value: Any) -> str:
    """``value`` as text for a console line or table cell, shown verbatim: what a user typed or a
    file is called (``[/]``, ``[bold]``, ``x[1].jpg``) is never read as console markup."""
    from rich.markup import escape

    return escape(str(value))


def fail(message: str, code: int = EXIT_USER_ERROR) -> typer.Exit:
    """Print ``error: message`` (verbatim) on stderr; the exit to raise."""
    err.print(f"[bold red]error:[/] {safe(message)}")
    return typer.Exit(code)


def root() -> Path:
    """The project root, or exit with a message saying how to get into one."""
    if ROOT is None:
        raise fail(str(project.ProjectNotFound(Path.cwd())))
    return ROOT


def resolve_model(model: str | None) -> Any:
    """The model a ``--model`` option means (:func:`pipeline.registry.resolve.resolve_model`: the
    champion, a model or Bento tag, or a folder), or exit naming what exists."""
    from pipeline.registry.resolve import resolve_model as resolve
    from pipeline.registry.store import RegistryError

    try:
        return resolve(model, ROOT)
    except RegistryError as exc:
        raise fail(str(exc)) from None


def show(x: Any, digits: int = 4) -> str:
    """A value for a table cell (:func:`pipeline.core.reporting.fmt`)."""
    return fmt(x, digits)
