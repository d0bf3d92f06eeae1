"""The retraining flow: a data version in, a gated, packaged, traceable champion out - or a clear
stop that says why.

    python -m flows.retrain                               # one run, ephemeral Prefect (no server)
    lesionflow run                                        # the same, with a summary at the end
    python -m flows.retrain --serve --cron "0 3 * * 1"    # a scheduled deployment (see docs/operations.md)

Tasks, in order: every stage of ``dvc.yaml``, in its order (:func:`pipeline.core.stages.names`;
each is ``dvc repro --single-item <stage>`` in a subprocess, its output streamed line by line into
the Prefect log, its exit code checked; DVC decides what is up to date, so a re-run after a crash
resumes at the stage that failed and skips what had finished), with the champion exported just
before the gate stage, then packaging::

    validate -> split -> eda -> train -> retrieval -> reference -> export-champion -> evaluate
        -> package -> build-bento

* **Retries** only for transient failures (:func:`flows.stages.retry_on_transient`: DVC's repository lock held
  by another process, a busy or temporarily unavailable resource, a failure to start ``dvc``);
  a data-contract violation, a bad parameter or a bug fails at once.
* **validate** failing ends the flow in a ``ValidationFailed`` state (type FAILED) whose message
  names the failed checks and points to ``reports/validation/report.md``.
* **champion**: before ``evaluate``, the registry's champion is exported to
  ``artifacts/champion`` for the no-regression gates. That directory is *not* a DVC dependency
  of ``evaluate`` (a second run would never skip); instead, when the champion recorded in the last
  verdict (``reports/evaluate/gates.json``) is not the current one, ``evaluate`` is forced.
* **gates**: a failing verdict ends the flow in a ``GateFailed`` state (type FAILED) naming each
  failing metric, its value and its threshold; nothing is packaged and the champion is unchanged.
  When every gate passes and the candidate is not already the champion (same weights, config and
  OOD statistics: :func:`pipeline.model.bundle.fingerprint`), the model is
  packaged into the BentoML store (:func:`pipeline.registry.package.package`) and a Bento is built.
* **one flow per workspace**: an exclusive lock on ``.lesionflow/retrain.lock`` (``fcntl``; the OS
  releases it if the process dies). A second flow waits up to ``lock_timeout_seconds`` and then
  ends in a ``WorkspaceBusy`` state naming the holder, without touching anything.
* **artifacts**: a markdown artifact with the stages, the gate table and the key metrics, and
  link artifacts to the reports. ``.lesionflow/last_run.json`` records the run for
  ``lesionflow status``.

This module only orchestrates: the ML is in ``pipeline/`` (stages, gates, registry).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context
from prefect.states import Completed, Failed, State

from flows import entry
from flows.lock import WorkspaceBusy, workspace_lock
from flows.messages import (
    failed_gates_message,
    key_metrics,
    needs_forced_evaluate,
    summary_markdown,
    validation_failure_message,
)
from flows.stages import retry_on_transient, run_stage
from pipeline.core import fsutil, lineage, stages
from pipeline.core.errors import EXIT_USER_ERROR
from pipeline.core.fsutil import read_json
from pipeline.core.layout import LAYOUT, Layout
from pipeline.model import bundle

FLOW_NAME = "lesionflow-retrain"
DEPLOYMENT_NAME = "lesionflow-retrain-scheduled"
DEFAULT_CRON = "0 3 * * 1"  # Mondays 03:00 (in DEFAULT_TIMEZONE)
DEFAULT_TIMEZONE = "UTC"

VERDICT = LAYOUT.reports("evaluate") / bundle.GATES_FILE


@task(name="export-champion", cache_policy=NO_CACHE, persist_result=False)
def export_champion(dest: str) -> str | None:
    """Copy the registry's champion to ``dest`` (removed when there is none); return its tag."""
    from pipeline.registry.history import export_champion as export

    tag = export(Path(dest))
    get_run_logger().info("champion: %s", f"{tag} exported to {dest}" if tag else "none yet (absolute gates only)")
    return tag


@task(name="package", cache_policy=NO_CACHE, persist_result=False)
def package_model(project_root: str, model_dir: str) -> str:
    """Save the gated model into the BentoML model store (it becomes the champion)."""
    from pipeline.registry.package import package

    root = Path(project_root)
    layout = Layout(root)
    tag = package(root / model_dir, layout.evaluate_dir, layout.reports("evaluate"), project_root=root)
    get_run_logger().info("packaged %s: the new champion", tag)
    return tag


@task(name="build-bento", cache_policy=NO_CACHE, persist_result=False)
def build_bento(project_root: str) -> str:
    """``bentoml build`` of bentofile.yaml around the champion."""
    from pipeline.registry import bento as bentos

    tag = bentos.build_bento(project_root=Path(project_root))
    get_run_logger().info("built bento %s", tag)
    return tag


# ----------------------------------------------------------------------------------------------
# helpers (reading what the stages wrote; no ML here)


def reports_reached(root: Path, reached: list[str]) -> dict[str, str]:
    """The reports of the stages a run got to that exist (linked from the flow run, for people):
    ``<stage>-<file name>`` (a Prefect artifact key: lower case, dashes) -> path
    (:func:`pipeline.core.stages.report_files`)."""
    found = {}
    for stage in reached:
        for path in stages.report_files(stage, root):
            if (root / path).exists():
                found[re.sub(r"[^a-z0-9]+", "-", f"{stage}-{path.name}".lower())] = str(path)
    return found


def _publish(root: Path, summary: dict[str, Any], verdict: dict[str, Any] | None) -> None:
    """Prefect artifacts: the summary markdown and links to the reports that exist."""
    logger = get_run_logger()
    try:
        create_markdown_artifact(
            key="lesionflow-retrain",
            markdown=summary_markdown(summary, verdict),
            description=f"retraining run: {summary['state']}",
        )
        for name, rel in summary["reports"].items():
            create_link_artifact(
                key=f"lesionflow-report-{name}",
                link=(root / rel).resolve().as_uri(),
                link_text=rel,
                description=f"{name} report of the last retraining run",
            )
    except Exception as exc:  # artifacts are a convenience; never fail the run over them
        logger.warning("could not publish Prefect artifacts: %s", exc)


def _data_diff(root: Path, summary: dict[str, Any]) -> None:
    """When the data version differs from the champion's: what it adds (pipeline.audit.datadiff),
    written to reports/data_diff/ and linked as a Prefect artifact. Never fails the run."""
    from pipeline.audit import datadiff
    from pipeline.registry.champions import champion

    logger = get_run_logger()
    try:
        champ = champion()
        labels = (champ or {}).get("labels") or {}
        data_md5 = lineage.data_version(Layout(root).data_pointer).get("md5")
        if champ is None or labels.get("data_md5") in (None, data_md5) or labels.get("git_commit") in (None, "unknown"):
            return
        d = datadiff.diff(Layout(root), labels["git_commit"], datadiff.WORKSPACE)
        _, md_path = datadiff.write(d, Layout(root).reports("data_diff"))
        summary["data_diff"] = {"against": champ["tag"], **d["images"], "report": str(md_path.relative_to(root))}
        create_markdown_artifact(
            key="lesionflow-data-diff",
            markdown=datadiff.render_markdown(d),
            description=f"data version {data_md5} vs the champion's {labels['data_md5']}",
        )
        logger.info("Data changed since the champion: +%d/-%d images (%s)", d["images"]["added"],
                    d["images"]["removed"], md_path)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - a report, not a gate
        logger.warning("could not diff the data against the champion's: %s", exc)


def _finish(root: Path, summary: dict[str, Any], verdict: dict[str, Any] | None, state: State) -> State:
    summary["state"] = state.name
    summary["state_type"] = state.type.value
    summary["message"] = state.message
    summary["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    summary["reports"] = reports_reached(root, [s["stage"] for s in summary["stages"]])
    _publish(root, summary, verdict)
    fsutil.write_json(Layout(root).last_run, summary)
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
            fsutil.write_json(
                Layout(root).last_run,
                {
                    "flow_run_name": get_run_context().flow_run.name,
                    "state": "Crashed",
                    "state_type": "FAILED",
                    "message": f"{type(exc).__name__}: {exc}",
                    "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                },
            )
        raise
    finally:
        lock.__exit__(None, None, None)


class _Run:
    """One run's record (``summary``) and how it runs a stage (retries on transient failures)."""

    def __init__(self, root: Path, retries: int, retry_delay_seconds: float):
        from pipeline.registry.champions import champion

        ctx = get_run_context()
        self.root, self.started = root, time.time()
        self.layout = Layout(root)
        champ = champion()
        self.summary: dict[str, Any] = {
            "flow_run_id": str(ctx.flow_run.id),
            "flow_run_name": ctx.flow_run.name,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "project_root": str(root),
            "data_md5": lineage.data_version(self.layout.data_pointer).get("md5"),
            "git": lineage.git_state(root),
            "stages": [],
            "packaged": None,
            "bento": None,
            "champion_before": champ["tag"] if champ else None,
            "champion_after": champ["tag"] if champ else None,
        }
        self.stage_task = run_stage.with_options(
            retries=retries, retry_delay_seconds=retry_delay_seconds, retry_condition_fn=retry_on_transient
        )

    def stage(self, name: str, force: bool = False) -> State | None:
        """Run one stage; None when it completed, else the flow's final state."""
        st = self.stage_task(name, str(self.root), force, return_state=True)
        if st.is_completed():
            self.summary["stages"].append(st.result())
            return None
        err: Any = st.message or st.name
        try:
            st.result()
        except Exception as exc:  # noqa: BLE001 - reported below
            err = exc
        self.summary["stages"].append({"stage": name, "ran": True, "forced": force, "error": str(err)})
        msg = validation_failure_message(self.root, self.started) if name == "validate" else None
        if msg:
            return Failed(name="ValidationFailed", message=msg)
        return Failed(name="StageFailed", message=f"{err} (the next run resumes here: finished stages are skipped)")

    def finish(self, state: State, verdict: dict[str, Any] | None = None) -> State:
        return _finish(self.root, self.summary, verdict, state)


def _evaluate_against_champion(run: _Run) -> tuple[State | None, str | None, str | None, str | None]:
    """Export the champion, then evaluate (forced when the champion changed since the last
    verdict); returns (a final state on failure, champion tag, champion md5, candidate md5)."""
    from pipeline.registry.history import exported_champion_md5

    champion_tag = export_champion(str(run.layout.champion_dir))
    candidate_md5 = bundle.model_md5(run.layout.model_dir, missing_ok=True)
    champion_md5 = exported_champion_md5(run.layout.champion_dir) if champion_tag else None
    force = needs_forced_evaluate(read_json(run.root / VERDICT), champion_md5, candidate_md5)
    return run.stage(stages.GATE_STAGE, force=force), champion_tag, champion_md5, candidate_md5


def _built(run: _Run, verdict: dict[str, Any], failure: str) -> State | None:
    """Build the Bento; None when built (recorded in the summary), else a PackagingFailed state."""
    bento_state = build_bento(str(run.root), return_state=True)
    if not bento_state.is_completed():
        return run.finish(Failed(name="PackagingFailed", message=f"{failure}: {bento_state.message}"), verdict)
    run.summary["bento"] = bento_state.result()
    return None


def _package(run: _Run, verdict: dict[str, Any]) -> State:
    """Package the gated candidate as the new champion and build its Bento."""
    tag_state = package_model(str(run.root), str(LAYOUT.model_dir), return_state=True)
    if not tag_state.is_completed():
        return run.finish(Failed(name="PackagingFailed", message=str(tag_state.message)), verdict)
    run.summary["packaged"] = run.summary["champion_after"] = tag = tag_state.result()
    failed = _built(run, verdict, f"model packaged as {tag} (the new champion) but the Bento build failed")
    if failed is not None:
        return failed
    get_run_logger().info("new champion %s, bento %s", tag, run.summary["bento"])
    return run.finish(
        Completed(message=f"Gates passed; packaged {tag} (the new champion) and built bento {run.summary['bento']}."),
        verdict,
    )


def _retrain_locked(root: Path, retries: int, retry_delay_seconds: float, package: bool) -> State:
    from pipeline.registry import bento as bentos

    run = _Run(root, retries, retry_delay_seconds)
    _data_diff(root, run.summary)
    champion_tag = champion_md5 = candidate_md5 = None
    for name in stages.names(root):  # dvc.yaml's order; the gate stage is judged against the champion
        if name == stages.GATE_STAGE:
            failed, champion_tag, champion_md5, candidate_md5 = _evaluate_against_champion(run)
        else:
            failed = run.stage(name)
        if failed is not None:
            return run.finish(failed)
    verdict = read_json(root / VERDICT)
    run.summary["metrics"] = key_metrics(read_json(run.layout.reports("evaluate") / "metrics.json"))
    if verdict is None:
        return run.finish(Failed(name="StageFailed", message=f"evaluate wrote no readable verdict at {VERDICT}"))
    run.summary["verdict"] = {
        "passed": verdict.get("passed"),
        "failed": verdict.get("failed"),
        "champion": (verdict.get("champion") or {}).get("md5"),
        "model_md5": verdict.get("model_md5"),
    }
    if not verdict.get("passed"):
        reports = LAYOUT.reports("evaluate")
        return run.finish(
            Failed(
                name="GateFailed",
                message=(
                    f"Gates failed: {failed_gates_message(verdict)}. Nothing was packaged; the champion stays "
                    f"{champion_tag or 'none'}. See {reports / 'gates.md'} and {reports / 'model_card.md'}."
                ),
            ),
            verdict,
        )
    # the same weights, calibration, OOD detector and lineage as the champion: nothing new to serve
    same = bundle.fingerprint(run.layout.model_dir) == bundle.fingerprint(run.layout.champion_dir)
    if candidate_md5 is not None and candidate_md5 == champion_md5 and same:
        message = f"Gates passed; the candidate is already the champion {champion_tag}: nothing new to package."
        if package and bentos.latest_bento_model() != champion_tag:  # e.g. the last run crashed while building it
            failed = _built(run, verdict, f"the Bento build for champion {champion_tag} failed")
            if failed is not None:
                return failed
            message += f" Built the missing Bento {run.summary['bento']} for it."
        return run.finish(Completed(name="Completed", message=message), verdict)
    if not package:
        return run.finish(Completed(message="Gates passed; packaging skipped (package=False)."), verdict)
    return _package(run, verdict)


# ----------------------------------------------------------------------------------------------
# scheduling


def serve_scheduled(
    name: str = DEPLOYMENT_NAME,
    cron: str = DEFAULT_CRON,
    timezone_name: str = DEFAULT_TIMEZONE,
    parameters: dict[str, Any] | None = None,
    project_root: Path | None = None,
) -> None:
    """Serve the scheduled retraining deployment (see docs/operations.md). At most one run of it at
    a time (in this process and, ``global_limit=1``, on the server), on top of the workspace lock
    every run takes."""
    entry.serve_on_cron(
        retrain,
        name=name,
        cron=cron,
        timezone_name=timezone_name,
        parameters=parameters,
        project_root=project_root,
        tags=["lesionflow", "retrain"],
        description="Scheduled retraining of the lesionflow classifier on the workspace's data version.",
        global_limit=1,
    )


def main(argv: list[str] | None = None) -> int:
    ap = entry.parser("python -m flows.retrain", __doc__, DEPLOYMENT_NAME, DEFAULT_CRON, DEFAULT_TIMEZONE)
    ap.add_argument("--retries", type=int, default=2, help="retries per stage, transient failures only")
    ap.add_argument("--retry-delay", type=float, default=30.0, help="seconds between retries")
    ap.add_argument("--lock-timeout", type=float, default=0.0, help="seconds to wait for another running flow")
    ap.add_argument("--no-package", action="store_true", help="stop after the verdict")
    a = ap.parse_args(argv)
    flow_params = {
        "retries": a.retries,
        "retry_delay_seconds": a.retry_delay,
        "lock_timeout_seconds": a.lock_timeout,
        "package": not a.no_package,
    }
    root = entry.root_or_none("flows.retrain")
    if root is None:
        return EXIT_USER_ERROR
    entry.exit_on_sigterm()
    if a.serve:
        serve_scheduled(a.name, a.cron, a.timezone, flow_params, project_root=root)
        return 0
    return entry.exit_code(retrain(**flow_params, project_root=str(root), return_state=True))


if __name__ == "__main__":
    sys.exit(main())
