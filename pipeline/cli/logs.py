"""``lesionflow logs prune`` and ``lesionflow logs forget REQUEST_ID``: the inference log kept no
longer than its retention, and one answer's record erased on request
(:mod:`pipeline.monitoring.logcare`; the log's location: :func:`pipeline.monitoring.logstore.location`)."""

from __future__ import annotations

import typer

from pipeline.cli.base import app, fail, out, root
from pipeline.core.layout import Layout

logs_app = typer.Typer(help="The service's inference log: retention and erasure.", no_args_is_help=True)
app.add_typer(logs_app, name="logs")


def _location() -> str:
    from pipeline.monitoring import logstore

    location = logstore.location(root())
    if location is None:
        raise fail(f"the inference log is off (${logstore.LOCATION_ENV}=off)")
    return location


@logs_app.command("prune")
def prune(
    days: float | None = typer.Option(
        None, min=0.0, help="Keep this many days (default: monitor.log_retention_days of params.yaml)."
    ),
) -> None:
    """Delete the log's days older than the retention period (whole UTC days)."""
    from pipeline.core import params
    from pipeline.monitoring import logcare

    location = _location()
    keep = days if days is not None else params.load_section("monitor", Layout(root()).params_file).log_retention_days
    removed = logcare.prune(location, keep)
    for name in removed:
        out.print(f"deleted {name}")
    out.print(f"{len(removed)} day(s) older than {keep:g} days deleted from {location}")


@logs_app.command("forget")
def forget(request_id: str = typer.Argument(..., help="The answer's request_id (its X-Request-ID header).")) -> None:
    """Erase the record of one answer (and the image stored with it, if any) wherever it is stored;
    on object storage also the record still waiting in a replica's spool, before it is put."""
    from pipeline.monitoring import logcare, logstore

    location = _location()
    try:
        found = logcare.forget(location, request_id)
    except ValueError as exc:
        raise fail(str(exc)) from None
    for f in found:
        out.print(f"removed {f['records']} record(s) from {f['where']}")
    remote = logstore.is_url(location)
    if not found and not remote:
        raise fail(f"no record of request {request_id} in {location}", code=1)
    out.print(f"request {request_id}: {sum(f['records'] for f in found)} record(s) erased from {location}")
    if remote:  # forget left an erasure request there
        out.print("a record of it still waiting in a replica's spool is dropped before it is put")
