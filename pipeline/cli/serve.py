"""``lesionflow serve`` and ``lesionflow monitor``: the champion over HTTP, and the drift check."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from pipeline.cli.base import DISCLAIMER, app, err, fail, out, root
from pipeline.core.layout import Layout


def serve_env(env: dict[str, str], project_root: Path) -> dict[str, str]:
    """The served process's environment: unless ``$LESIONFLOW_INFERENCE_LOG`` is set, the
    inference log goes to the project's ``monitor.log_url`` (params.yaml; default logs/inference),
    a local path made absolute: a Bento runs from its own folder in the BentoML store, where a
    relative path would hide the log from the monitoring flow. An object-store URL is kept."""
    env = dict(env)
    if not env.get("LESIONFLOW_INFERENCE_LOG"):
        from pipeline.monitoring import logstore

        location = "logs/inference"
        params_file = Layout(project_root).params_file
        if params_file.exists():
            from pipeline.core import params

            location = params.load_section("monitor", params_file).log_url
        env["LESIONFLOW_INFERENCE_LOG"] = logstore.resolve(location, project_root)
    return env


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(3000, min=1, max=65535, help="Port."),
    bento: str | None = typer.Option(None, help="Bento tag to serve (default: the latest lesionflow bento)."),
) -> None:
    """Serve the champion over HTTP (the latest lesionflow Bento, else the project's service)."""
    base = root()
    from pipeline.serving import bento as bentos
    from pipeline.serving import registry

    target = bento or bentos.latest_bento()
    env = dict(os.environ)
    if target is None:
        champ = registry.champion()
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
    if path is not None and not path.is_dir():
        raise fail(f"{path}: not a folder of images")
    if metadata is not None and not metadata.is_file():
        raise fail(f"{metadata}: metadata CSV not found")
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
    raise typer.Exit(0 if state.is_completed() else 1)
