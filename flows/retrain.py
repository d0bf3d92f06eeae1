"""The retraining flow: a data version in, a gated, packaged, traceable champion out - or a clear
stop that says why.

    python -m flows.retrain                               # one run, ephemeral Prefect (no server)
    lesionflow run                                        # the same, with a summary at the end
    python -m flows.retrain --serve --cron "0 3 * * 1"    # a scheduled deployment (see docs/operations.md)

Tasks, in order (each DVC stage is ``dvc repro --single-item <stage>`` in a subprocess, its output
streamed line by line into the Prefect log, its exit code checked; DVC decides what is up to date,
so a re-run after a crash resumes at the stage that failed and skips what had finished)::

    validate -> split -> eda -> train -> export-champion -> evaluate -> package -> build-bento

* **Retries** only for transient failures (:func:`retry_on_transient`: DVC's repository lock held
  by another process, a busy or temporarily unavailable resource, a failure to start ``dvc``);
  a data-contract violation, a bad parameter or a bug fails at once.
* **validate** failing ends the flow in a ``ValidationFailed`` state (type FAILED) whose message
  names the failed checks and points to ``reports/validation/report.md``.
* **champion**: before ``evaluate``, the registry's champion is exported to
  ``evaluate.champion_dir`` for the no-regression gates. That directory is *not* a DVC dependency
  of ``evaluate`` (a second run would never skip); instead, when the champion recorded in the last
  verdict (``reports/evaluate/gates.json``) is not the current one, ``evaluate`` is forced.
* **gates**: a failing verdict ends the flow in a ``GateFailed`` state (type FAILED) naming each
  failing metric, its value and its threshold; nothing is packaged and the champion is unchanged.
  When every gate passes and the candidate is not already the champion (model md5), the model is
  packaged into the BentoML store (:func:`pipeline.registry.package`) and a Bento is built.
* **one flow per workspace**: an exclusive lock on ``.lesionflow/retrain.lock`` (``fcntl``; the OS
  releases it if the process dies). A second flow waits up to ``lock_timeout_seconds`` and then
  ends in a ``WorkspaceBusy`` state naming the holder, without touching anything.
* **artifacts**: a markdown artifact with the stages, the gate table and the key metrics, and
  link artifacts to the reports. ``.lesionflow/last_run.json`` records the run for
  ``lesionflow status``.

This module only orchestrates: the ML is in ``pipeline/`` (stages, gates, registry).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.states import Completed, Failed, State

from pipeline import fsutil, gates, lineage, params
from pipeline.core import project

FLOW_NAME = "lesionflow-retrain"
DEPLOYMENT_NAME = "lesionflow-retrain-scheduled"
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00 (in DEFAULT_TIMEZONE)
DEFAULT_TIMEZONE = "UTC"

STAGES = ("validate", "split", "eda", "train", "reference", "evaluate")
STATE_DIR = Path(".lesionflow")
LOCK_FILE = STATE_DIR / "retrain.lock"
LAST_RUN = STATE_DIR / "last_run.json"

# stage outputs the flow reads (written by pipeline.validate / pipeline.evaluate)
VALIDATION_SUMMARY = Path("reports/validation/summary.json")
VALIDATION_REPORT = Path("reports/validation/report.md")
EVALUATE_ARTIFACTS = Path("artifacts/evaluate")
EVALUATE_REPORTS = Path("reports/evaluate")
VERDICT = EVALUATE_REPORTS / "gates.json"
TEST_METRICS = EVALUATE_REPORTS / "metrics.json"
#: Reports linked from the flow run (those that exist), for people.
REPORTS = {
    "validation": Path("reports/validation/report.md"),
    "split": Path("reports/split/report.md"),
    "eda": Path("reports/eda/report.md"),
    "training-curves": Path("reports/train/curves.png"),
    "gates": EVALUATE_REPORTS / "gates.md",
    "model-card": EVALUATE_REPORTS / "model_card.html",
}
REPORT_STAGE = {"validation": "validate", "split": "split", "eda": "eda", "training-curves": "train",
                "gates": "evaluate", "model-card": "evaluate"}
KEY_METRICS = (
    "dx.accuracy", "dx.balanced_accuracy", "dx.roc_auc_macro", "risk.balanced_accuracy",
    "binary.roc_auc", "binary.pr_auc", "binary.sensitivity_at_operating_point",
    "binary.specificity_at_operating_point", "operating_point.threshold",
)

#: Output of a failed ``dvc repro`` that means "try again later", not "this is broken".
TRANSIENT_PATTERNS = (
    "Unable to acquire lock",            # dvc.lock.FAILED_TO_LOCK_MESSAGE: another DVC process
    "LockError",
    "Resource temporarily unavailable",  # EAGAIN
    "Device or resource busy",           # EBUSY
    "Text file busy",                    # ETXTBSY
    "Stale file handle",                 # ESTALE (network file systems)
    "Interrupted system call",           # EINTR
    "Connection reset by peer",
    "Connection timed out",
)
TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EBUSY, errno.ETXTBSY, errno.ESTALE, errno.EINTR, errno.ENOMEM}
_PROGRESS = re.compile(r"\d+%\|")  # a tqdm progress line
#: DVC's hints for interactive users (git add dvc.lock, autostage, dvc push): debug level in a flow.
_DVC_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
              "Use `dvc push`")


# ----------------------------------------------------------------------------------------------
# errors


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage failed; ``transient`` says whether retrying may help."""

    def __init__(self, stage: str, returncode: int | None, tail: list[str], transient: bool, reason: str = ""):
        self.stage = stage
        self.returncode = returncode
        self.tail = tail
        self.transient = transient
        what = reason or f"`dvc repro --single-item {stage}` exited with {returncode}"
        last = "\n".join(tail[-12:])
        super().__init__(f"stage {stage!r} failed: {what}" + (f"\n{last}" if last else ""))


class WorkspaceBusy(RuntimeError):
    """Another retraining flow holds the workspace lock."""


def is_transient(lines: list[str]) -> bool:
    """Whether a failed stage's output says the failure was transient (see TRANSIENT_PATTERNS)."""
    text = "\n".join(lines)
    return any(p in text for p in TRANSIENT_PATTERNS)


def retry_on_transient(task: Any, task_run: Any, state: State) -> bool:
    """Prefect ``retry_condition_fn``: retry a stage only when its failure was transient."""
    try:
        state.result()
    except StageFailed as exc:
        return exc.transient
    except OSError as exc:
        return exc.errno in TRANSIENT_ERRNOS
    except Exception:
        return False
    return False


# ----------------------------------------------------------------------------------------------
# the workspace lock


@contextlib.contextmanager
def workspace_lock(root: Path, timeout: float = 0.0, poll: float = 2.0) -> Iterator[Path]:
    """Hold an exclusive lock on ``root/.lesionflow/retrain.lock`` for one flow.

    Waits up to ``timeout`` seconds (0: do not wait) for another holder, then raises
    :class:`WorkspaceBusy` naming it. An ``flock`` is released by the OS when its process dies,
    so a crashed flow never leaves a stale lock behind.
    """
    path = root / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = ""
                    with contextlib.suppress(OSError, ValueError):
                        holder = json.loads(path.read_text() or "{}")
                        holder = ", ".join(f"{k} {v}" for k, v in holder.items())
                    raise WorkspaceBusy(
                        f"another retraining flow is running in {root} ({holder or 'holder unknown'}); "
                        f"it holds {path}. Wait for it to finish"
                        + (f" (waited {timeout:.0f} s)" if timeout > 0 else "")
                        + " or raise the lock timeout (lesionflow run --lock-timeout SECONDS)."
                    ) from None
                time.sleep(min(poll, max(deadline - time.monotonic(), 0.05)))
        info = {"pid": os.getpid(), "host": os.uname().nodename,
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        with contextlib.suppress(Exception):
            info["flow_run"] = str(get_run_context().flow_run.name)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# tasks


def _stage_env() -> dict[str, str]:
    env = dict(os.environ)
    # the stage's own prints reach the log as they happen; DVC stays offline
    env.update(PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1")
    env.setdefault("TQDM_MININTERVAL", "5")
    # `python` in dvc.yaml's commands: this interpreter's environment first
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, project_root: str = ".", force: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item [--force] <stage>``, streamed into the Prefect log.

    Returns ``{"stage", "ran", "forced", "seconds"}`` (``ran`` False: DVC found it up to date and
    skipped it). Raises :class:`StageFailed` on a non-zero exit.
    """
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    logger.info("$ %s%s", " ".join(cmd), "   (forced: the champion changed since the last verdict)" if force else "")
    t0 = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, cwd=project_root, env=_stage_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
    except FileNotFoundError:
        raise StageFailed(stage, None, [], transient=False,
                          reason="`dvc` not found on PATH (install the project: make install)") from None
    except OSError as exc:
        raise StageFailed(stage, None, [], transient=exc.errno in TRANSIENT_ERRNOS,
                          reason=f"cannot start dvc: {exc}") from None
    tail: deque[str] = deque(maxlen=60)
    ran = False
    last_progress = 0.0
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        if not line.strip():
            continue
        tail.append(line)
        if line.startswith(f"Running stage '{stage}'"):
            ran = True
        if _PROGRESS.search(line):  # tqdm redraws: keep the log readable
            now = time.monotonic()
            if now - last_progress < 5.0 and "100%|" not in line:
                continue
            last_progress = now
        if line.strip().startswith(_DVC_HINTS):
            logger.debug("%s | %s", stage, line)
            continue
        logger.info("%s | %s", stage, line)
    rc = proc.wait()
    seconds = round(time.monotonic() - t0, 1)
    if rc != 0:
        raise StageFailed(stage, rc, list(tail), transient=is_transient(list(tail)))
    logger.info("stage %s %s in %.1f s", stage, "ran" if ran else "was up to date (skipped)", seconds)
    return {"stage": stage, "ran": ran, "forced": force, "seconds": seconds}


@task(name="export-champion", cache_policy=NO_CACHE, persist_result=False)
def export_champion(dest: str) -> str | None:
    """Copy the registry's champion to ``dest`` (removed when there is none); return its tag."""
    from pipeline import registry

    tag = registry.export_champion(Path(dest))
    get_run_logger().info("champion: %s", f"{tag} exported to {dest}" if tag else "none yet (absolute gates only)")
    return tag


@task(name="package", cache_policy=NO_CACHE, persist_result=False)
def package_model(project_root: str, model_dir: str) -> str:
    """Save the gated model into the BentoML model store (it becomes the champion)."""
    from pipeline import registry

    root = Path(project_root)
    tag = registry.package(root / model_dir, root / EVALUATE_ARTIFACTS, root / EVALUATE_REPORTS, project_root=root)
    get_run_logger().info("packaged %s: the new champion", tag)
    return tag


@task(name="build-bento", cache_policy=NO_CACHE, persist_result=False)
def build_bento(project_root: str) -> str:
    """``bentoml build`` of bentofile.yaml around the champion."""
    from pipeline import registry

    tag = registry.build_bento(project_root=Path(project_root))
    get_run_logger().info("built bento %s", tag)
    return tag


# ----------------------------------------------------------------------------------------------
# helpers (reading what the stages wrote; no ML here)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _md5(path: Path) -> str | None:
    return lineage.file_md5(path) if path.exists() else None


def _champion_md5(champion_dir: Path) -> str | None:
    info = _read_json(champion_dir / "champion.json") or {}
    return info.get("model_md5") or _md5(champion_dir / "model.pt")


def latest_bento_model() -> str | None:
    """The model tag inside the newest lesionflow Bento (None when no Bento is built)."""
    from pipeline import registry

    try:
        return registry.describe(f"{registry.BENTO_NAME}:latest")["tag"]
    except registry.RegistryError:
        return None


def needs_forced_evaluate(verdict: dict[str, Any] | None, champion_md5: str | None,
                          candidate_md5: str | None) -> bool:
    """Whether the last verdict was judged against another champion than the current one.

    False when there is no verdict yet (DVC runs evaluate anyway) or when the candidate *is*
    the champion (it was judged before it was packaged; judging it against itself adds nothing).
    """
    if verdict is None or candidate_md5 is None or candidate_md5 == champion_md5:
        return False
    judged_against = (verdict.get("champion") or {}).get("md5")
    return judged_against != champion_md5


def _fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "n/a"


def failed_gates_message(verdict: dict[str, Any]) -> str:
    """``absolute:binary.roc_auc = 0.7100 (needs >= 0.8500); ...`` for every failing gate."""
    parts = []
    for g in verdict.get("gates") or []:
        if g.get("passed"):
            continue
        op = "<=" if g.get("direction") == "max" else ">="
        bound = g.get("threshold")
        rule = f"needs {op} {_fmt(bound)}" if bound is not None else g.get("note") or "not computable"
        if g.get("gate") == "regression" and g.get("champion_value") is not None:
            rule += f", champion {_fmt(g['champion_value'])} - margin {g.get('margin')}"
        if g.get("note") and bound is not None:
            rule += f"; {g['note']}"
        parts.append(f"{g.get('gate')}:{g.get('metric')} = {_fmt(g.get('value'))} ({rule})")
    return "; ".join(parts) or ", ".join(verdict.get("failed") or []) or "verdict not passed"


def validation_failure_message(root: Path, started: float) -> str | None:
    """The failed data-contract checks of this run, or None if validate failed otherwise."""
    path = root / VALIDATION_SUMMARY
    summary = _read_json(path)
    if summary is None or summary.get("passed", True) or path.stat().st_mtime < started - 1:
        return None
    failed = [c for c in summary.get("checks") or [] if not c.get("passed", True)]
    items = []
    for c in failed[:5]:
        ex = f" e.g. {c['examples'][0]}" if c.get("examples") else ""
        items.append(f"{c.get('description') or c.get('name')} ({c.get('failures', '?')} failure(s)){ex}")
    more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
    return (f"Data contract violated: {len(failed)} of {summary.get('checks_total', '?')} checks failed: "
            + "; ".join(items) + more + f". Nothing downstream ran. See {VALIDATION_REPORT} for every "
            "failed check with example rows and files.")


def key_metrics(metrics_doc: dict[str, Any] | None) -> dict[str, float]:
    flat = gates.flatten(metrics_doc or {})
    return {k: flat[k] for k in KEY_METRICS if k in flat}


def summary_markdown(summary: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    """The run as markdown: outcome, stages, gate table, key metrics."""
    lines = [f"# lesionflow retraining: {summary['state']}", "", summary.get("message") or "", ""]
    lines += ["| stage | result | seconds |", "|---|---|---:|"]
    for s in summary["stages"]:
        result = s.get("error") and "**failed**" or ("ran (forced)" if s.get("forced") and s.get("ran")
                                                     else "ran" if s.get("ran") else "up to date (skipped)")
        lines.append(f"| {s['stage']} | {result} | {s.get('seconds', '')} |")
    lines += ["", f"Champion before: `{summary.get('champion_before') or 'none'}`; "
                  f"after: `{summary.get('champion_after') or 'none'}`"
                  + (f"; bento `{summary['bento']}`" if summary.get("bento") else "")]
    if verdict is not None:
        lines += ["", "## Gates", "", gates.verdict_markdown(verdict)]
    if summary.get("metrics"):
        lines += ["## Key test metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in summary["metrics"].items()]
    return "\n".join(lines) + "\n"


def _publish(root: Path, summary: dict[str, Any], verdict: dict[str, Any] | None) -> None:
    """Prefect artifacts: the summary markdown and links to the reports that exist."""
    logger = get_run_logger()
    try:
        create_markdown_artifact(key="lesionflow-retrain", markdown=summary_markdown(summary, verdict),
                                 description=f"retraining run: {summary['state']}")
        for name, rel in summary["reports"].items():
            create_link_artifact(key=f"lesionflow-report-{name}", link=(root / rel).resolve().as_uri(),
                                 link_text=rel, description=f"{name} report of the last retraining run")
    except Exception as exc:  # artifacts are a convenience; never fail the run over them
        logger.warning("could not publish Prefect artifacts: %s", exc)


def _finish(root: Path, summary: dict[str, Any], verdict: dict[str, Any] | None, state: State) -> State:
    summary["state"] = state.name
    summary["state_type"] = state.type.value
    summary["message"] = state.message
    summary["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    reached = {s["stage"] for s in summary["stages"]}  # reports of the stages this run got to
    summary["reports"] = {k: str(v) for k, v in REPORTS.items() if REPORT_STAGE[k] in reached and (root / v).exists()}
    _publish(root, summary, verdict)
    fsutil.write_json(root / LAST_RUN, summary)
    (get_run_logger().error if state.is_failed() else get_run_logger().info)("%s: %s", state.name, state.message)
    return state


# ----------------------------------------------------------------------------------------------
# the flow


@flow(name=FLOW_NAME, description="Validate, split, EDA, train, evaluate (gates), package the champion.")
def retrain(
    retries: int = 2,
    retry_delay_seconds: float = 30.0,
    lock_timeout_seconds: float = 0.0,
    package: bool = True,
    project_root: str = ".",
) -> State:
    """One retraining run of the workspace at ``project_root``.

    ``retries``/``retry_delay_seconds``: per stage, for transient failures only.
    ``lock_timeout_seconds``: how long to wait for another running flow (0: refuse at once).
    ``package``: package and build a Bento when every gate passes (False: stop after the verdict).
    """
    root = Path(project_root).resolve()
    try:
        lock = workspace_lock(root, timeout=lock_timeout_seconds)
        lock.__enter__()
    except WorkspaceBusy as exc:
        get_run_logger().error("%s", exc)
        return Failed(name="WorkspaceBusy", message=str(exc))
    try:
        return _retrain_locked(root, retries, retry_delay_seconds, package)
    except Exception as exc:  # a bug or a broken environment: record it for `lesionflow status`
        with contextlib.suppress(Exception):
            fsutil.write_json(root / LAST_RUN, {
                "flow_run_name": get_run_context().flow_run.name, "state": "Crashed", "state_type": "FAILED",
                "message": f"{type(exc).__name__}: {exc}",
                "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        raise
    finally:
        lock.__exit__(None, None, None)


def _retrain_locked(root: Path, retries: int, retry_delay_seconds: float, package: bool) -> State:
    logger = get_run_logger()
    started = time.time()
    ctx = get_run_context()
    summary: dict[str, Any] = {
        "flow_run_id": str(ctx.flow_run.id), "flow_run_name": ctx.flow_run.name,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "project_root": str(root), "data_md5": lineage.data_version(root / "data.dvc").get("md5"),
        "git": lineage.git_commit(root), "stages": [], "packaged": None, "bento": None,
    }
    from pipeline import registry

    champ = registry.champion()
    summary["champion_before"] = summary["champion_after"] = champ["tag"] if champ else None
    stage_task = run_stage.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds,
                                        retry_condition_fn=retry_on_transient)

    def stage(name: str, force: bool = False) -> State | None:
        st = stage_task(name, str(root), force, return_state=True)
        if st.is_completed():
            summary["stages"].append(st.result())
            return None
        err: Any = st.message or st.name
        try:
            st.result()
        except Exception as exc:  # noqa: BLE001 - reported below
            err = exc
        summary["stages"].append({"stage": name, "ran": True, "forced": force, "error": str(err)})
        if name == "validate":
            msg = validation_failure_message(root, started)
            if msg:
                return Failed(name="ValidationFailed", message=msg)
        return Failed(name="StageFailed", message=f"{err} (the next run resumes here: finished stages are skipped)")

    for name in STAGES[:-1]:
        failed = stage(name)
        if failed is not None:
            return _finish(root, summary, None, failed)

    try:  # where evaluate reads the candidate and the champion
        evaluate_params = params.load_section("evaluate", root / params.DEFAULT_PARAMS)
    except params.ParamsError as exc:
        summary["stages"].append({"stage": "evaluate", "ran": False, "forced": False, "error": str(exc)})
        return _finish(root, summary, None, Failed(name="StageFailed", message=f"evaluate: {exc}"))
    champion_dir = root / evaluate_params.champion_dir
    model_dir = evaluate_params.model_dir
    champion_tag = export_champion(str(champion_dir))
    candidate_md5 = _md5(root / model_dir / "model.pt")
    champion_md5 = _champion_md5(champion_dir) if champion_tag else None
    force = needs_forced_evaluate(_read_json(root / VERDICT), champion_md5, candidate_md5)
    failed = stage("evaluate", force=force)
    if failed is not None:
        return _finish(root, summary, None, failed)

    verdict = _read_json(root / VERDICT)
    summary["metrics"] = key_metrics(_read_json(root / TEST_METRICS))
    if verdict is None:
        return _finish(root, summary, None, Failed(
            name="StageFailed", message=f"evaluate wrote no readable verdict at {VERDICT}"))
    summary["verdict"] = {"passed": verdict.get("passed"), "failed": verdict.get("failed"),
                          "champion": (verdict.get("champion") or {}).get("md5"),
                          "model_md5": verdict.get("model_md5")}
    if not verdict.get("passed"):
        return _finish(root, summary, verdict, Failed(
            name="GateFailed",
            message=f"Gates failed: {failed_gates_message(verdict)}. Nothing was packaged; the champion "
                    f"stays {champion_tag or 'none'}. See {EVALUATE_REPORTS / 'gates.md'} and "
                    f"{EVALUATE_REPORTS / 'model_card.md'}."))
    if candidate_md5 is not None and candidate_md5 == champion_md5:
        message = f"Gates passed; the candidate is already the champion {champion_tag}: nothing new to package."
        if package and latest_bento_model() != champion_tag:  # e.g. the last run crashed while building it
            bento_state = build_bento(str(root), return_state=True)
            if not bento_state.is_completed():
                return _finish(root, summary, verdict, Failed(
                    name="PackagingFailed", message=f"the Bento build for champion {champion_tag} failed: "
                                                    f"{bento_state.message}"))
            summary["bento"] = bento_state.result()
            message += f" Built the missing Bento {summary['bento']} for it."
        return _finish(root, summary, verdict, Completed(name="Completed", message=message))
    if not package:
        return _finish(root, summary, verdict, Completed(
            message="Gates passed; packaging skipped (package=False)."))
    tag_state = package_model(str(root), model_dir, return_state=True)
    if not tag_state.is_completed():
        return _finish(root, summary, verdict, Failed(name="PackagingFailed", message=str(tag_state.message)))
    summary["packaged"] = summary["champion_after"] = tag = tag_state.result()
    bento_state = build_bento(str(root), return_state=True)
    if not bento_state.is_completed():
        return _finish(root, summary, verdict, Failed(
            name="PackagingFailed", message=f"model packaged as {tag} (the new champion) but the Bento build "
                                            f"failed: {bento_state.message}"))
    summary["bento"] = bento_state.result()
    logger.info("new champion %s, bento %s", tag, summary["bento"])
    return _finish(root, summary, verdict, Completed(
        message=f"Gates passed; packaged {tag} (the new champion) and built bento {summary['bento']}."))


# ----------------------------------------------------------------------------------------------
# scheduling


def serve_scheduled(name: str = DEPLOYMENT_NAME, cron: str = DEFAULT_CRON, timezone_name: str = DEFAULT_TIMEZONE,
                    parameters: dict[str, Any] | None = None, project_root: Path | None = None) -> None:
    """Register the scheduled deployment with the Prefect server (``PREFECT_API_URL``) and execute
    its flow runs in this process until stopped (SIGTERM or Ctrl-C). See docs/operations.md.

    At most one run of the deployment at a time (``limit=1`` in this process, ``global_limit=1``
    on the server), on top of the workspace lock every run takes.
    """
    from prefect.schedules import Cron

    retrain.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone_name)],
        parameters={"project_root": str(project_root or project.require_root()), **(parameters or {})},
        tags=["lesionflow", "retrain"],
        description="Scheduled retraining of the lesionflow classifier on the workspace's data version.",
        limit=1,
        global_limit=1,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--retries", type=int, default=2, help="retries per stage, transient failures only")
    ap.add_argument("--retry-delay", type=float, default=30.0, help="seconds between retries")
    ap.add_argument("--lock-timeout", type=float, default=0.0, help="seconds to wait for another running flow")
    ap.add_argument("--no-package", action="store_true", help="stop after the verdict")
    ap.add_argument("--serve", action="store_true", help="serve the scheduled deployment instead of running once")
    ap.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name (with --serve)")
    ap.add_argument("--cron", default=DEFAULT_CRON, help="cron schedule (with --serve)")
    ap.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="time zone of the cron schedule (with --serve)")
    a = ap.parse_args(argv)
    flow_params = {"retries": a.retries, "retry_delay_seconds": a.retry_delay,
                   "lock_timeout_seconds": a.lock_timeout, "package": not a.no_package}
    try:
        root = project.require_root()
    except project.ProjectNotFound as exc:
        print(f"flows.retrain: {exc}", file=sys.stderr)
        return 2
    if a.serve:
        serve_scheduled(a.name, a.cron, a.timezone, flow_params, project_root=root)
        return 0
    state = retrain(**flow_params, project_root=str(root), return_state=True)
    print(f"{state.name}: {state.message}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
