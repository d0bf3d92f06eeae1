"""The ``lesionflow`` command line: a thin front over the flow, the registry and inference.

    lesionflow run                      # the retraining flow (validate ... evaluate, gates, package)
    lesionflow status                   # the stores in use, champion, last run and its verdict
    lesionflow env                      # shell exports of the same settings for prefect/bentoml/dvc
    lesionflow trace TAG                # data md5, git commit, params, metrics, gates + restore commands
    lesionflow predict PATH... [--model DIR_OR_TAG] [--out predictions.csv]
    lesionflow serve                    # the champion's Bento over HTTP (127.0.0.1:3000)
    lesionflow schedule --cron "0 3 * * 1"   # serve the scheduled retraining deployment
    lesionflow monitor [PATH] [--metadata CSV]   # drift check (docs/monitoring.md)

Runs from the project root or any folder below it, from a plain shell: every command first
configures itself (:func:`pipeline.core.project.configure`: the project root, its BentoML store
and Prefect home under ``.lesionflow/``, telemetry off), and paths a user gives are taken relative
to the working directory, as typed. Output to a terminal wraps at its width; output to a log, a
pipe or CI is never hard-wrapped (long paths stay on one line). Heavy imports (torch, Prefect,
BentoML) happen inside the commands, so ``lesionflow --help`` is instant. Predictions are
research output, not for clinical use.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.core import project

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


def make_console(stderr: bool = False) -> Console:
    """A rich console for stdout (or stderr): on a terminal it wraps at the terminal's width; to a
    log, a pipe or CI it never hard-wraps text (``soft_wrap``) and lays tables out at
    :data:`LOG_WIDTH`, so that a path is never split across lines."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    return Console(stderr=stderr, highlight=False, soft_wrap=True, width=LOG_WIDTH)


out = make_console()
err = make_console(stderr=True)
#: The project root found by the callback (None outside a project).
ROOT: Path | None = None


@app.callback()
def _configure() -> None:
    """Configure the environment (project root, stores, telemetry off) before any command."""
    global out, err, ROOT
    out, err = make_console(), make_console(stderr=True)
    ROOT = project.configure()


def _root() -> Path:
    """The project root, or exit with a message saying how to get into one."""
    if ROOT is None:
        raise _fail(str(project.ProjectNotFound(Path.cwd())))
    return ROOT

DISCLAIMER = "Research prototype: not a medical device, not for clinical use."
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-" if x is None else str(x)


# ----------------------------------------------------------------------------------------------
# run / schedule


@app.command()
def run(
    retries: int = typer.Option(2, min=0, help="Retries per stage, for transient failures only (e.g. DVC lock contention)."),
    retry_delay: float = typer.Option(30.0, min=0, help="Seconds between retries."),
    lock_timeout: float = typer.Option(0.0, min=0, help="Seconds to wait for another retraining flow in this workspace (0: refuse at once)."),
    package: bool = typer.Option(True, help="Package the model and build a Bento when every gate passes."),
) -> None:
    """Run the retraining flow once: validate, split, eda, train, evaluate (gates), package."""
    root = _root()
    from flows import retrain as flow

    state = flow.retrain(retries=retries, retry_delay_seconds=retry_delay, lock_timeout_seconds=lock_timeout,
                         package=package, project_root=str(root), return_state=True)
    out.print()
    colour = "green" if state.is_completed() else "red"
    out.print(f"[bold {colour}]{state.name}[/]: {state.message}")
    summary = _read_json(root / flow.LAST_RUN) if state.name != "WorkspaceBusy" else None
    if summary and summary.get("stages"):
        out.print("Stages: " + ", ".join(
            f"{s['stage']} {'FAILED' if s.get('error') else 'ran' if s.get('ran') else 'skipped'}"
            for s in summary["stages"]))
    _print_champion()
    reports = (summary or {}).get("reports") or {}
    if reports:
        out.print("Reports: " + ", ".join(reports.values()))
    out.print(f"Details: lesionflow status; run record {root / flow.LAST_RUN}")
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
    root = _root()
    from flows import retrain as flow

    if not os.environ.get("PREFECT_API_URL"):
        err.print("[yellow]PREFECT_API_URL is not set: the deployment lives only as long as this process's "
                  "temporary server. Start `prefect server start --host 127.0.0.1` and set "
                  "PREFECT_API_URL=http://127.0.0.1:4200/api (docs/operations.md).[/]")
    flow.serve_scheduled(name, cron, timezone, {"retries": retries, "lock_timeout_seconds": lock_timeout},
                         project_root=root)


# ----------------------------------------------------------------------------------------------
# status / trace


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _latest_bento() -> str | None:
    """Tag of the newest lesionflow Bento, or None when none is built."""
    from pipeline import registry

    try:
        return registry.describe(f"{registry.BENTO_NAME}:latest").get("bento_tag")
    except registry.RegistryError:
        return None


def _print_champion() -> dict[str, Any] | None:
    from pipeline import registry

    champ = registry.champion()
    if champ is None:
        out.print("Champion: [yellow]none yet[/] (no model has passed the gates)")
        return None
    labels = champ["labels"]
    out.print(f"Champion: [bold]{champ['tag']}[/] (packaged {champ['created_at']}; data md5 "
              f"{labels.get('data_md5')}; git {str(labels.get('git_commit'))[:12]}; threshold "
              f"{labels.get('threshold')})")
    bento = _latest_bento()
    out.print(f"Bento: {bento or 'none built'}" + ("   (lesionflow serve)" if bento else ""))
    return champ


@app.command()
def status() -> None:
    """Where the stores are, the champion, the last retraining run and its verdict."""
    root = _root()
    from flows import retrain as flow

    out.print(f"Project: {root}")
    for var, what in (("BENTOML_HOME", "BentoML store (models, bentos)"), ("PREFECT_HOME", "Prefect home")):
        source = project.store_source(var, root)
        origin = {"project": "the project's default", "environment": f"from ${var}"}.get(source, "not set")
        out.print(f"{what}: {os.environ.get(var, '-')} ({origin})")
    _print_champion()
    last = _read_json(root / flow.LAST_RUN)
    if last is None:
        out.print("Last run: none recorded in this workspace (lesionflow run)")
        return
    colour = "green" if last.get("state_type") == "COMPLETED" else "red"
    out.print(f"Last run: {last.get('flow_run_name')} finished {last.get('finished_at')}: "
              f"[bold {colour}]{last.get('state')}[/] - {last.get('message')}")
    if last.get("stages"):
        t = Table("stage", "result", "seconds", title="Stages of the last run")
        for s in last["stages"]:
            t.add_row(s["stage"], "[red]failed[/]" if s.get("error") else "ran" if s.get("ran") else "up to date",
                      _fmt(s.get("seconds"), 1))
        out.print(t)
    verdict = _read_json(root / flow.VERDICT)
    if verdict is not None:
        _print_gates(verdict, f"Gate verdict ({flow.VERDICT})")
    if last.get("metrics"):
        out.print("Key test metrics: " + ", ".join(f"{k} {_fmt(v)}" for k, v in last["metrics"].items()))
    if last.get("reports"):
        out.print("Reports: " + ", ".join(last["reports"].values()))


@app.command()
def env() -> None:
    """Shell exports of this project's settings, for Prefect's, BentoML's and DVC's own commands:
    eval "$(.venv/bin/lesionflow env)"."""
    import shlex

    root = _root()
    names = [*project.OFFLINE_ENV, *project.HOMES]
    for name in names:
        print(f"export {name}={shlex.quote(os.environ[name])}")
    venv_bin = Path(sys.executable).parent
    print(f"export PATH={shlex.quote(str(venv_bin))}:\"$PATH\"   # the project's python, dvc, prefect, bentoml")
    print(f"# project root: {root}")


def _print_gates(verdict: dict[str, Any], title: str) -> None:
    t = Table("gate", "metric", "value", "rule", "champion", "result", title=title)
    for g in verdict.get("gates") or []:
        op = "<=" if g.get("direction") == "max" else ">="
        rule = f"{op} {_fmt(g.get('threshold'))}" if g.get("threshold") is not None else (g.get("note") or "")
        t.add_row(g.get("gate", ""), g.get("metric", ""), _fmt(g.get("value")), rule,
                  _fmt(g.get("champion_value")), "pass" if g.get("passed") else "[bold red]FAIL[/]")
    out.print(t)
    passed = verdict.get("passed")
    out.print(f"Verdict: [bold {'green' if passed else 'red'}]{'PASSED' if passed else 'FAILED'}[/]"
              + (f" ({', '.join(verdict.get('failed') or [])})" if not passed else "")
              + (f"  {verdict['note']}" if verdict.get("note") else ""))


@app.command()
def trace(
    tag: str = typer.Argument(..., help="A model tag (lesionflow-classifier:VERSION) or a Bento tag (lesionflow:VERSION)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full record as JSON."),
) -> None:
    """Trace a model or Bento: data md5, git commit, params, metrics, gates, restore commands."""
    import yaml

    from pipeline import gates, registry

    try:
        d = registry.describe(tag)
    except registry.RegistryError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        out.print_json(json.dumps(d, default=str))
        return
    out.print(f"[bold]{d['tag']}[/]" + (f"  (in bento {d['bento_tag']})" if d.get("bento_tag") else ""))
    out.print(f"  packaged:    {d.get('created_at')}   store path: {d.get('path')}")
    out.print(f"  data md5:    [bold]{d.get('data_md5')}[/]   ({(d.get('data') or {}).get('nfiles')} files, data.dvc)")
    dirty = "  [yellow](working tree was dirty)[/]" if d.get("git_dirty") else ""
    out.print(f"  git commit:  [bold]{d.get('git_commit')}[/]{dirty}")
    out.print(f"  model md5:   {d.get('model_md5')}   threshold: {_fmt(d.get('threshold'))}")
    model = d.get("model") or {}
    out.print(f"  model:       {model.get('backbone')} at {model.get('input_size')}, target {model.get('target_level')}")
    flat = gates.flatten(d.get("metrics") or {})
    t = Table("metric", "value", "95% CI", title="Test metrics")
    for k, v in flat.items():
        if ".ci." in k or k.startswith(("n.", "gates.")):
            continue
        level, _, name = k.partition(".")
        low, high = flat.get(f"{level}.ci.{name}.low"), flat.get(f"{level}.ci.{name}.high")
        t.add_row(k, _fmt(v), f"{_fmt(low)} - {_fmt(high)}" if low is not None else "")
    out.print(t)
    if d.get("gates"):
        _print_gates(d["gates"], "Gate verdict")
    out.print("[bold]Params[/] (params.yaml at packaging time):")
    out.print(yaml.safe_dump(d.get("params") or {}, sort_keys=False, default_flow_style=None).rstrip(), markup=False)
    if d.get("dvc_lock"):
        out.print("[bold]DVC stage hashes[/] (dvc.lock):")
        for stage, entry in d["dvc_lock"].items():
            outs = ", ".join(f"{p}={str(m)[:12]}" for p, m in (entry.get("outs") or {}).items())
            out.print(f"  {stage}: {outs}", markup=False)
    out.print("[bold]Restore its code and data[/] (in a clone of the repository):")
    for cmd in d.get("restore") or []:
        out.print(f"  {cmd}", markup=False)
    for note in d.get("notes") or []:
        out.print(f"[yellow]note:[/] {note}")


# ----------------------------------------------------------------------------------------------
# predict


def collect_images(paths: list[Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to predict: given files as they are, folders searched recursively for image files.
    Returns (files, problems) with problems as (path, reason)."""
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append((str(p), f"folder holds no image files ({', '.join(IMAGE_SUFFIXES)})"))
            files.extend(found)
        elif p.exists():
            files.append(p)
        else:
            problems.append((str(p), "no such file or folder"))
    return files, problems


def _resolve_model(model: str | None) -> tuple[Path, str, float | None]:
    """(directory with model.pt + config.json, label, threshold or None) of the champion, a
    directory or a registry tag."""
    from pipeline import lineage, registry

    if model is None:
        champ = registry.champion()
        if champ is None:
            raise _fail("no champion yet: run `lesionflow run` first, or pass --model DIR_OR_TAG")
        return Path(champ["path"]), champ["tag"], champ["metadata"].get("threshold")
    if Path(model).is_dir():
        d = Path(model)
        op = _read_json(d / "operating_point.json")
        if op is None and ROOT is not None:  # an unpackaged model: evaluate's operating point if it judged it
            cand = _read_json(ROOT / "artifacts/evaluate/operating_point.json")
            if cand and (d / "model.pt").exists() and cand.get("model_md5") == lineage.file_md5(d / "model.pt"):
                op = cand
        return d, str(d), (op or {}).get("threshold")
    try:
        d = registry.describe(model)
    except registry.RegistryError as exc:
        raise _fail(f"--model {model}: not a directory, and {exc}") from None
    return Path(d["path"]), d["tag"], d.get("threshold")


@app.command()
def predict(
    paths: list[Path] = typer.Argument(..., help="Image files (JPEG/PNG) or folders searched recursively."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory or registry tag (default: the champion)."),
    out_csv: Optional[Path] = typer.Option(None, "--out", "-o", help="Write every class probability and the decision per image to this CSV."),
    threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Override the model's operating threshold on p(malignant)."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Flip test-time augmentation (default: the model's setting)."),
    batch_size: int = typer.Option(32, min=1, help="Images per forward pass."),
    show: int = typer.Option(50, min=0, help="Rows shown on screen (the CSV has them all)."),
) -> None:
    """Classify local images with the champion or --model; unreadable files are skipped."""
    import pandas as pd
    from tqdm.auto import tqdm

    from pipeline import fsutil, images, inference

    model_dir, label, thr = _resolve_model(model)
    thr = threshold if threshold is not None else thr
    if thr is None:
        raise _fail(f"{model_dir}: no operating threshold known for this model (no operating_point.json); "
                    "pass --threshold or use a packaged model")
    files, problems = collect_images(paths)
    try:
        predictor = inference.load_model(model_dir)
    except inference.ModelLoadError as exc:
        raise _fail(str(exc)) from None
    tax = predictor.taxonomy
    pos = tax.binary_positive
    neg = [c for c in tax.classes("binary") if c != pos][0]
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(files), batch_size), desc="predict", unit="batch", disable=len(files) <= batch_size):
        chunk, arrays = [], []
        for f in files[start:start + batch_size]:
            try:
                arrays.append(images.decode_rgb(f, str(f)))
                chunk.append(f)
            except images.ImageError as exc:
                problems.append((str(f), exc.reason))
        if not arrays:
            continue
        res = predictor.predict(arrays, tta=tta, batch_size=batch_size)
        for i, f in enumerate(chunk):
            row: dict[str, Any] = {"file": str(f)}
            for level in ("dx", "risk", "binary"):
                probs = res[f"{level}_probs"]
                if probs is None:
                    continue
                for j, c in enumerate(res["classes"][level]):
                    row[f"p_{level}_{c}"] = float(probs[i, j])
                row[f"{level}_class"] = res["classes"][level][int(probs[i].argmax())]
            p_mal = float(res["p_malignant"][i])
            row.update(p_malignant=p_mal, threshold=float(thr), decision=pos if p_mal >= thr else neg, model=label)
            rows.append(row)
    for path, reason in problems:
        err.print(f"[yellow]skipped[/] {path}: {reason}")
    if rows:
        table = Table("file", "diagnosis", "p", "risk class", f"p({pos})", "decision",
                      title=f"{len(rows)} image(s), model {label}, threshold {thr:.4f}", caption=DISCLAIMER)
        for r in rows[:show]:
            dx = r.get("dx_class")
            table.add_row(Path(r["file"]).name, dx or "-", _fmt(r.get(f"p_dx_{dx}") if dx else None, 3),
                          r.get("risk_class", "-"), _fmt(r["p_malignant"], 3),
                          f"[bold red]{r['decision']}[/]" if r["decision"] == pos else r["decision"])
        out.print(table)
        if len(rows) > show:
            out.print(f"... {len(rows) - show} more rows" + (f" in {out_csv}" if out_csv else " (use --out FILE.csv)"))
    if out_csv is not None:
        frame = pd.DataFrame(rows)
        fsutil.atomic_write_text(out_csv, frame.to_csv(index=False))
        out.print(f"Wrote {len(rows)} row(s) to {out_csv}")
    out.print(f"{len(rows)} predicted, {len(problems)} skipped.")
    if not rows:
        raise _fail("no image could be read", code=1)


# ----------------------------------------------------------------------------------------------
# serve


def serve_env(env: dict[str, str], project_root: Path) -> dict[str, str]:
    """The served process's environment: unless ``$LESIONFLOW_INFERENCE_LOG`` is set, the
    inference log goes to the project's ``monitor.log_dir`` (params.yaml; default logs/inference)
    as an absolute path: a Bento runs from its own folder in the BentoML store, where a relative
    path would hide the log from the monitoring flow."""
    env = dict(env)
    if not env.get("LESIONFLOW_INFERENCE_LOG"):
        log_dir = Path("logs/inference")
        if (project_root / "params.yaml").exists():
            from pipeline import params

            log_dir = Path(params.load_section("monitor", project_root / "params.yaml").log_dir)
        env["LESIONFLOW_INFERENCE_LOG"] = str(log_dir if log_dir.is_absolute() else (project_root / log_dir).resolve())
    return env


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(3000, min=1, max=65535, help="Port."),
    bento: Optional[str] = typer.Option(None, help="Bento tag to serve (default: the latest lesionflow bento)."),
) -> None:
    """Serve the champion over HTTP (the latest lesionflow Bento, else the project's service)."""
    root = _root()
    from pipeline import registry

    target = bento or _latest_bento()
    env = dict(os.environ)
    if target is None:
        champ = registry.champion()
        if champ is None:
            raise _fail("nothing to serve: no champion yet (run `lesionflow run`)")
        import yaml

        bentofile = root / "bentofile.yaml"
        service = (yaml.safe_load(bentofile.read_text()) or {}).get("service") if bentofile.exists() else None
        if not service:
            raise _fail("no Bento built and no bentofile.yaml with a `service:` here: run from the project "
                        "root, or `lesionflow run`")
        target = service
        env.setdefault("LESIONFLOW_MODEL_TAG", champ["tag"])
        err.print(f"[yellow]no Bento built yet: serving the project's service with champion {champ['tag']}[/]")
    env = serve_env(env, root)
    cmd = [sys.executable, "-m", "bentoml", "serve", target, "--host", host, "--port", str(port)]
    out.print(f"$ {' '.join(cmd)}")
    out.print(f"inference log (read by `lesionflow monitor` and flows/monitor.py): {env['LESIONFLOW_INFERENCE_LOG']}")
    out.print(f"{DISCLAIMER} Listening on http://{host}:{port} (Ctrl-C to stop).")
    sys.stdout.flush()
    sys.stderr.flush()
    # become the server: signals (Ctrl-C, SIGTERM from a supervisor) reach BentoML directly; from
    # the project root, where `bentoml serve` finds the service module of bentofile.yaml
    os.chdir(root)
    os.execve(sys.executable, cmd, env)


def _from_cwd(path: Path | None) -> str | None:
    """A folder a user typed, as an absolute path (flows take folders relative to the project root)."""
    return str(path.resolve()) if path is not None else None


def main() -> None:  # pragma: no cover - `python -m pipeline.cli`
    app()


# ----------------------------------------------------------------------------------------------
# monitor


@app.command()
def monitor(
    path: Optional[Path] = typer.Argument(None, help="Folder of new images (JPEG/PNG, any size). Omit to check the service's inference log."),
    metadata: Optional[Path] = typer.Option(None, "--metadata", help="CSV: image_id + optional age, sex, localization, dx (labels)."),
    hours: Optional[float] = typer.Option(None, min=0, help="Log window in hours (default monitor.window_hours); without PATH."),
    model_dir: Optional[Path] = typer.Option(None, help="Model directory (default monitor.model_dir)."),
    reference_dir: Optional[Path] = typer.Option(None, help="Reference profile (default <model-dir>/reference, else artifacts/reference)."),
    retrain: bool = typer.Option(True, help="On confirmed drift with a new data version, trigger the retraining deployment."),
) -> None:
    """Drift check: compare new images (or the inference log) with the training reference (Evidently)."""
    root = _root()
    if path is not None and not path.is_dir():
        raise _fail(f"{path}: not a folder of images")
    if metadata is not None and not metadata.is_file():
        raise _fail(f"{metadata}: metadata CSV not found")
    from flows import monitor as flow

    state = flow.monitor(folder=str(path.resolve()) if path else None,
                         metadata_csv=str(metadata.resolve()) if metadata else None, hours=hours,
                         project_root=str(root), model_dir=_from_cwd(model_dir), reference_dir=_from_cwd(reference_dir),
                         retrain_on_drift=retrain, return_state=True)
    colour = {"NoDrift": "green", "NotEnoughData": "yellow", "RetrainingTriggered": "yellow"}.get(state.name, "red")
    out.print(f"[bold {colour}]{state.name}[/]: {state.message}")
    raise typer.Exit(0 if state.is_completed() else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
