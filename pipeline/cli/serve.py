"""``lesionflow serve`` and ``lesionflow monitor``: the champion over HTTP, and the drift check."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from pipeline.cli.base import DISCLAIMER, app, err, fail, out, root, safe
from pipeline.core.layout import Layout


def serve_env(env: dict[str, str], project_root: Path) -> dict[str, str]:
    """The served process's environment, with the inference log's location of this project
    (:func:`pipeline.monitoring.logstore.location` from the project's params.yaml, a local path made
    absolute) set explicitly: a Bento's own params.yaml is the one it was built with, and the
    project's may have changed since; the monitor reads the project's. An operator's
    ``$LESIONFLOW_INFERENCE_LOG`` is kept."""
    from pipeline.monitoring import logstore

    env = dict(env)
    location = logstore.location(project_root, environ=env)
    env[logstore.LOCATION_ENV] = "off" if location is None else location
    return env


#: Addresses only this machine reaches.
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def auth_env(env: dict[str, str], project_root: Path, host: str, no_auth: bool) -> tuple[dict[str, str], str]:
    """The served process's authentication, and a line saying which: the tokens file
    (``$LESIONFLOW_API_TOKENS_FILE``, else the project's ``.lesionflow/api-tokens`` when it holds
    a token); without one, open only on a loopback address or with ``--no-auth``; else refused."""
    from pipeline.serving import auth

    env = dict(env)
    tokens = Path(env.get(auth.TOKENS_ENV) or auth.project_tokens_file(Layout(project_root).state_dir))
    if tokens.is_file() and auth.read_entries(tokens):
        env[auth.TOKENS_ENV] = str(tokens)
        env.pop(auth.AUTH_ENV, None)
        return env, f"API tokens required ({tokens}; lesionflow token list)"
    if host in LOOPBACK or no_auth:
        env[auth.AUTH_ENV] = "off"
        reach = "this machine only" if host in LOOPBACK else f"ANYONE WHO REACHES {host} (--no-auth)"
        return env, f"no API tokens: open to {reach}"
    raise fail(
        f"serving on {host} makes the service reachable from other machines, and no API token exists: "
        "create one with `lesionflow token add NAME` (clients send it as 'Authorization: Bearer ...'), "
        "or pass --no-auth to serve without authentication"
    )


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(3000, min=1, max=65535, help="Port."),
    bento: str | None = typer.Option(None, help="Bento tag to serve (default: the latest lesionflow bento)."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve a non-loopback address without API tokens."),
) -> None:
    """Serve the champion over HTTP (the latest lesionflow Bento, else the project's service). API
    tokens (lesionflow token add) are required on any address but 127.0.0.1 unless --no-auth."""
    base = root()
    from pipeline.serving.auth import TokenError

    try:
        env, access = auth_env(dict(os.environ), base, host, no_auth)
    except TokenError as exc:
        raise fail(str(exc)) from None
    from pipeline.registry import bento as bentos
    from pipeline.registry.champions import champion

    target = bento or bentos.latest_bento()
    if target is None:
        champ = champion()
        if champ is None:
            raise fail("nothing to serve: no champion yet (run `lesionflow run`)")
        import yaml

        bentofile = base / "bentofile.yaml"
        service = (yaml.safe_load(bentofile.read_text()) or {}).get("service") if bentofile.exists() else None
        if not service:
            raise fail(
                "no Bento built and no bentofile.yaml with a `service:` here: run from the project "
                "root, or `lesionflow run`"
            )
        target = service
        env.setdefault("LESIONFLOW_MODEL_TAG", champ["tag"])
        err.print(f"[yellow]no Bento built yet: serving the project's service with champion {champ['tag']}[/]")
    env = serve_env(env, base)
    cmd = bentos.serve_command(target, host, port)
    out.print(f"$ {' '.join(cmd)}")
    out.print(f"inference log (read by `lesionflow monitor` and flows/monitor.py): {env['LESIONFLOW_INFERENCE_LOG']}")
    out.print(f"access: {access}")
    out.print(f"{DISCLAIMER} Listening on http://{host}:{port} (Ctrl-C to stop).")
    sys.stdout.flush()
    sys.stderr.flush()
    # become the server: signals (Ctrl-C, SIGTERM from a supervisor) reach BentoML directly; from
    # the project root, where `bentoml serve` finds the service module of bentofile.yaml
    os.chdir(base)
    os.execve(sys.executable, cmd, env)


def _from_cwd(path: Path | None) -> str | None:
    """A folder a user typed, as an absolute path (flows take folders relative to the project root)."""
    return str(path.resolve()) if path is not None else None


# ----------------------------------------------------------------------------------------------
# monitor


@app.command()
def monitor(
    path: Path | None = typer.Argument(
        None, help="Folder of new images (JPEG/PNG, any size). Omit to check the service's inference log."
    ),
    metadata: Path | None = typer.Option(
        None, "--metadata", help="CSV: image_id + optional age, sex, localization, dx (labels)."
    ),
    hours: float | None = typer.Option(
        None, min=0, help="Log window in hours (default monitor.window_hours); without PATH."
    ),
    model_dir: Path | None = typer.Option(None, help="Model directory (default artifacts/model)."),
    reference_dir: Path | None = typer.Option(
        None, help="Reference profile (default <model-dir>/reference, else artifacts/reference)."
    ),
    retrain: bool = typer.Option(
        True, help="On confirmed drift with a new data version, trigger the retraining deployment."
    ),
) -> None:
    """Drift check: compare new images (or the inference log) with the training reference (Evidently)."""
    base = root()
    from pipeline.core.errors import LesionflowError
    from pipeline.monitoring.check import preflight

    try:  # the inputs read before the flow starts: a user's mistake is one line, not a failed run
        preflight(base, str(path) if path else None, str(metadata) if metadata else None,
                  _from_cwd(model_dir), _from_cwd(reference_dir))  # fmt: skip
    except LesionflowError as exc:
        raise fail(str(exc)) from None
    from flows import monitor as flow

    state = flow.monitor(
        folder=str(path.resolve()) if path else None,
        metadata_csv=str(metadata.resolve()) if metadata else None,
        hours=hours,
        project_root=str(base),
        model_dir=_from_cwd(model_dir),
        reference_dir=_from_cwd(reference_dir),
        retrain_on_drift=retrain,
        return_state=True,
    )
    colour = {"NoDrift": "green", "NotEnoughData": "yellow", "RetrainingTriggered": "yellow"}.get(state.name, "red")
    out.print(f"[bold {colour}]{state.name}[/]: {state.message}")
    _say_coverage(state)
    raise typer.Exit(0 if state.is_completed() else 1)


def _say_coverage(state: Any) -> None:
    """How many of the checked answers got no risk estimate, and why; for a check of the inference
    log, how many of the service's answers its window holds, and a warning when that (or the share
    with image statistics) is below 99%."""
    from pipeline.monitoring.decision import refusals_text

    try:
        summary = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a state without a result: nothing to say
        return
    if isinstance(summary, dict) and summary.get("refused"):
        out.print(f"Not judged: {refusals_text(summary['refused'])}.")
    cov = summary.get("coverage") if isinstance(summary, dict) else None
    if not cov:
        return
    answered = "an unknown number of" if cov.get("answered") is None else cov["answered"]
    out.print(
        f"Log window: {cov['records']} answer record(s) of {answered} answer(s) given, "
        f"{cov['with_statistics']} with image statistics."
    )
    if summary.get("coverage_warning"):
        err.print(f"[yellow]warning[/]: {safe(summary['coverage_warning'])}")
