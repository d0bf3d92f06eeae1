"""``lesionflow run | schedule | status | env``: the retraining flow, its schedule, where things
stand, and the project's settings for Prefect's/BentoML's/DVC's own commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.table import Table

from pipeline.cli.base import app, err, out, root, show
from pipeline.cli.registry_views import print_champion, print_gates
from pipeline.core import project
from pipeline.core.fsutil import read_json
from pipeline.core.layout import Layout


@app.command()
def run(
    retries: int = typer.Option(
        2, min=0, help="Retries per stage, for transient failures only (e.g. DVC lock contention)."
    ),
    retry_delay: float = typer.Option(30.0, min=0, help="Seconds between retries."),
    lock_timeout: float = typer.Option(
        0.0, min=0, help="Seconds to wait for another retraining flow in this workspace (0: refuse at once)."
    ),
    package: bool = typer.Option(True, help="Package the model and build a Bento when every gate passes."),
) -> None:
    """Run the retraining flow once: validate, split, eda, train, evaluate (gates), package."""
    base = root()
    from flows import entry
    from flows import retrain as flow

    entry.exit_on_sigterm()
    state = flow.retrain(
        retries=retries,
        retry_delay_seconds=retry_delay,
        lock_timeout_seconds=lock_timeout,
        package=package,
        project_root=str(base),
        return_state=True,
    )
    out.print()
    colour = "green" if state.is_completed() else "red"
    out.print(f"[bold {colour}]{state.name}[/]: {state.message}")
    summary = read_json(Layout(base).last_run) if state.name != "WorkspaceBusy" else None
    if summary and summary.get("stages"):
        out.print(
            "Stages: "
            + ", ".join(
                f"{s['stage']} {'FAILED' if s.get('error') else 'ran' if s.get('ran') else 'skipped'}"
                for s in summary["stages"]
            )
        )
    print_champion()
    reports = (summary or {}).get("reports") or {}
    if reports:
        out.print("Reports: " + ", ".join(reports.values()))
    out.print(f"Details: lesionflow status; run record {Layout(base).last_run}")
    raise typer.Exit(0 if state.is_completed() else 1)


@app.command()
def schedule(
    cron: str = typer.Option("0 3 * * 1", help="Cron schedule of the retraining runs."),
    timezone: str = typer.Option("UTC", help="IANA time zone of the cron schedule."),
    name: str = typer.Option("lesionflow-retrain-scheduled", help="Deployment name."),
    retries: int = typer.Option(2, min=0, help="Retries per stage, transient failures only."),
    lock_timeout: float = typer.Option(3600.0, min=0, help="Seconds a scheduled run waits for a running flow."),
) -> None:
    """Serve the scheduled retraining deployment (needs a Prefect server: see docs/operations.md)."""
    base = root()
    from flows import retrain as flow

    if not os.environ.get("PREFECT_API_URL"):
        err.print(
            "[yellow]PREFECT_API_URL is not set: the deployment lives only as long as this process's "
            "temporary server. Start `prefect server start --host 127.0.0.1` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api (docs/operations.md).[/]"
        )
    flow.serve_scheduled(
        name, cron, timezone, {"retries": retries, "lock_timeout_seconds": lock_timeout}, project_root=base
    )


@app.command()
def status() -> None:
    """Where the stores are, the champion, the last retraining run and its verdict."""
    base = root()
    from flows import retrain as flow

    out.print(f"Project: {base}")
    for var, what in (("BENTOML_HOME", "BentoML store (models, bentos)"), ("PREFECT_HOME", "Prefect home")):
        source = project.store_source(var, base)
        origin = {"project": "the project's default", "environment": f"from ${var}"}.get(source, "not set")
        out.print(f"{what}: {os.environ.get(var, '-')} ({origin})")
    print_champion()
    last = read_json(Layout(base).last_run)
    if last is None:
        out.print("Last run: none recorded in this workspace (lesionflow run)")
        return
    colour = "green" if last.get("state_type") == "COMPLETED" else "red"
    out.print(
        f"Last run: {last.get('flow_run_name')} finished {last.get('finished_at')}: "
        f"[bold {colour}]{last.get('state')}[/] - {last.get('message')}"
    )
    if last.get("stages"):
        t = Table("stage", "result", "seconds", title="Stages of the last run")
        for s in last["stages"]:
            t.add_row(
                s["stage"],
                "[red]failed[/]" if s.get("error") else "ran" if s.get("ran") else "up to date",
                show(s.get("seconds"), 1),
            )
        out.print(t)
    verdict = read_json(base / flow.VERDICT)
    if verdict is not None:
        print_gates(verdict, f"Gate verdict ({flow.VERDICT})")
    if last.get("metrics"):
        out.print("Key test metrics: " + ", ".join(f"{k} {show(v)}" for k, v in last["metrics"].items()))
    if last.get("reports"):
        out.print("Reports: " + ", ".join(last["reports"].values()))


@app.command()
def env() -> None:
    """Shell exports of this project's settings, for Prefect's, BentoML's and DVC's own commands:
    eval "$(.venv/bin/lesionflow env)"."""
    import shlex

    base = root()
    names = [*project.OFFLINE_ENV, *project.HOMES]
    for name in names:
        print(f"export {name}={shlex.quote(os.environ[name])}")
    venv_bin = Path(sys.executable).parent
    print(f'export PATH={shlex.quote(str(venv_bin))}:"$PATH"   # the project\'s python, dvc, prefect, bentoml')
    print(f"# project root: {base}")


@app.command(
    "dvc",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def dvc(ctx: typer.Context) -> None:
    """DVC's own command line (dvc repro, exp run, metrics show, ...) with this project's
    interpreter first on PATH, so that dvc.yaml's `python -m pipeline.stages.<stage>` runs the
    project's environment from any shell: lesionflow dvc exp run -S evaluate.bootstrap=200."""
    import subprocess

    root()  # in a project (else a clear error); DVC finds the repository from the working directory
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run([sys.executable, "-m", "dvc", *ctx.args], env=env)
    raise typer.Exit(proc.returncode)
