"""The drift-monitoring flow: check new images against the training reference, publish the verdict,
and on confirmed drift retrain (when new labelled data exist) or raise an alert.

    python -m flows.monitor --folder PATH [--metadata CSV]   # a folder of new images (labels optional)
    python -m flows.monitor                                  # the last monitor.window_hours of the service log
    python -m flows.monitor --serve --cron "0 * * * *"       # a scheduled deployment (see docs/monitoring.md)
    lesionflow monitor PATH                                  # the CLI (same flow)

Tasks: ``check`` (:mod:`pipeline.monitoring.check`: statistics, predictions, Evidently reports and the
decision, written to ``reports/monitoring/<UTC timestamp>/``) -> ``publish`` (the summary as a
Prefect markdown artifact plus a link to the report folder) -> on a ``drift`` decision:

* the workspace's data version (md5 in ``data.dvc``) differs from the champion's (its
  ``data_md5`` label in the BentoML store): new labelled data were added as a new DVC data version,
  so the retraining deployment (``monitor.retrain_deployment``) is triggered with
  ``run_deployment(..., timeout=0)`` (fire and forget) and the flow completes
  (``RetrainingTriggered``);
* otherwise the flow ends in a ``DriftDetected`` state (type FAILED: it shows red in the UI and
  fires any Prefect automation on failed runs) whose message carries the report's path.

``not_enough_data`` and ``no_drift`` complete normally. The flow only orchestrates; the ML and the
retraining rule are in :mod:`pipeline.monitoring` (check, drift, decision).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.states import Completed, Failed, State

from flows import entry
from pipeline.core import lineage, params
from pipeline.core.errors import EXIT_USER_ERROR, LesionflowError
from pipeline.core.layout import Layout
from pipeline.monitoring import decision
from pipeline.monitoring.check import check_workspace

FLOW_NAME = "lesionflow-monitor"
DEPLOYMENT_NAME = "lesionflow-monitor-scheduled"
DEFAULT_CRON = "0 * * * *"  # hourly
DEFAULT_TIMEZONE = "UTC"


def champion_data_md5() -> str | None:
    """The data md5 the champion was trained on (BentoML store label), or None without a champion."""
    from pipeline.registry.champions import champion

    champ = champion()
    return None if champ is None else (champ.get("labels") or {}).get("data_md5")


@task(name="check", cache_policy=NO_CACHE)
def check(
    root: str,
    folder: str | None,
    metadata_csv: str | None,
    hours: float | None,
    model_dir: str | None,
    reference_dir: str | None,
) -> dict[str, Any]:
    """Build the current batch (folder or log window) and run the check (pipeline.monitoring.check);
    a user's error (a missing profile, a bad table) is the summary's ``error``, not a traceback."""
    try:
        summary = check_workspace(Path(root), folder, metadata_csv, hours, model_dir, reference_dir)
    except LesionflowError as exc:
        get_run_logger().error("%s", exc)
        return {"error": str(exc)}
    get_run_logger().info("%s", summary["reason"])
    if summary.get("coverage_warning"):
        get_run_logger().warning("%s", summary["coverage_warning"])
    return summary


@task(name="apply-retention", cache_policy=NO_CACHE)
def apply_retention(root: str) -> list[str]:
    """Delete the inference log's days older than ``monitor.log_retention_days``
    (:func:`pipeline.monitoring.logcare.prune`); a failure is a warning, never the check's end."""
    from pipeline.monitoring import logcare, logstore

    try:
        location = logstore.location(Path(root))
        if location is None:
            return []
        days = params.load_section("monitor", Layout(Path(root)).params_file).log_retention_days
        removed = logcare.prune(location, days)
    except Exception as exc:  # noqa: BLE001 - retention is maintenance, not the check
        get_run_logger().warning("inference log retention not applied: %s", exc)
        return []
    if removed:
        get_run_logger().info("inference log: %d day(s) older than %g days deleted", len(removed), days)
    return removed


@task(name="publish", cache_policy=NO_CACHE)
def publish(summary: dict[str, Any]) -> None:
    """The summary as Prefect artifacts, and the check kept with the stored model(s) it ran against."""
    from pipeline.registry.trace import record_drift_check

    for path in record_drift_check(summary):
        get_run_logger().info("drift check recorded with the stored model: %s", path)
    create_markdown_artifact(
        key="lesionflow-monitor",
        markdown=decision.summary_markdown(summary),
        description=f"drift check: {summary['decision']}",
    )
    report_dir = Path(summary["report_dir"]).resolve()
    create_link_artifact(
        key="lesionflow-monitor-report",
        link=report_dir.as_uri(),
        link_text=str(report_dir),
        description="Evidently reports of the last drift check",
    )


@task(name="trigger-retraining", cache_policy=NO_CACHE)
def trigger_retraining(deployment: str, root: str) -> str:
    run = run_deployment(name=deployment, timeout=0, parameters={"project_root": root})
    return str(getattr(run, "id", run))


@flow(name=FLOW_NAME, log_prints=True)
def monitor(
    folder: str | None = None,
    metadata_csv: str | None = None,
    hours: float | None = None,
    project_root: str = ".",
    model_dir: str | None = None,
    reference_dir: str | None = None,
    retrain_on_drift: bool = True,
) -> State:
    """One drift check of ``folder`` (or of the inference log's last ``hours``) and what follows
    from it (see the module docstring)."""
    root = str(Path(project_root).resolve())
    apply_retention(root)
    summary = check(root, folder, metadata_csv, hours, model_dir, reference_dir)
    if "error" in summary:
        return Failed(name="CheckFailed", message=summary["error"])
    publish(summary)
    report = summary["report_dir"]
    if summary["decision"] != decision.DRIFT:
        return Completed(
            name="NoDrift" if summary["decision"] == decision.NO_DRIFT else "NotEnoughData",
            message=f"{summary['reason']} (report: {report})",
            data=summary,
        )
    return act_on_drift(summary, root, retrain_on_drift)


def act_on_drift(summary: dict[str, Any], root: str, retrain_on_drift: bool) -> State:
    """Confirmed drift: trigger the retraining deployment when the data changed since the champion
    was trained (and ``retrain_on_drift``), else fail the run as an alert."""
    logger = get_run_logger()
    report = summary["report_dir"]
    data_md5 = lineage.data_version(Layout(Path(root)).data_pointer).get("md5")
    try:
        champ_md5 = champion_data_md5()
    except Exception as exc:  # noqa: BLE001 - no registry: never retrain blindly
        logger.warning("champion unknown (%s): not retraining", exc)
        champ_md5 = data_md5
    action = decision.retrain_decision(summary, data_md5, champ_md5)
    p = params.load_section("monitor", Layout(Path(root)).params_file)
    if action["action"] == "retrain" and retrain_on_drift:
        triggered = trigger_retraining(p.retrain_deployment, root, return_state=True)
        if not triggered.is_completed():  # e.g. the deployment is not served: alert instead
            return Failed(
                name="DriftDetected",
                message=f"{summary['reason']}. {action['reason']}, but triggering {p.retrain_deployment} "
                f"failed ({triggered.message}; serve it with `python -m flows.retrain --serve`). "
                f"Report: {report}",
                data=summary,
            )
        run_id = triggered.result()
        return Completed(
            name="RetrainingTriggered",
            message=f"{summary['reason']}. {action['reason']}: triggered {p.retrain_deployment} "
            f"(flow run {run_id}). Report: {report}",
            data=summary,
        )
    return Failed(
        name="DriftDetected", message=f"{summary['reason']}. {action['reason']}. Report: {report}", data=summary
    )


def serve_scheduled(
    name: str = DEPLOYMENT_NAME,
    cron: str = DEFAULT_CRON,
    timezone_name: str = DEFAULT_TIMEZONE,
    parameters: dict[str, Any] | None = None,
    project_root: Path | None = None,
) -> None:
    """Serve the scheduled monitoring deployment: the latest log window checked on ``cron``."""
    entry.serve_on_cron(
        monitor,
        name=name,
        cron=cron,
        timezone_name=timezone_name,
        parameters=parameters,
        project_root=project_root,
        tags=["lesionflow", "monitoring"],
        description="Scheduled drift check of the service's inference log against the training reference.",
    )


def main(argv: list[str] | None = None) -> int:
    ap = entry.parser("python -m flows.monitor", __doc__, DEPLOYMENT_NAME, DEFAULT_CRON, DEFAULT_TIMEZONE)
    ap.add_argument("--folder", help="a folder of new images (default: the inference log's latest window)")
    ap.add_argument("--metadata", help="CSV with image_id and optional age, sex, localization, dx (labels)")
    ap.add_argument("--hours", type=float, help="log window in hours (default monitor.window_hours)")
    ap.add_argument("--model-dir", help="model directory (default artifacts/model)")
    ap.add_argument("--reference-dir", help="reference profile (default <model-dir>/reference or artifacts/reference)")
    ap.add_argument("--no-retrain", action="store_true", help="never trigger retraining, only alert")
    a = ap.parse_args(argv)
    flow_params = {
        "folder": a.folder,
        "metadata_csv": a.metadata,
        "hours": a.hours,
        "model_dir": a.model_dir,
        "reference_dir": a.reference_dir,
        "retrain_on_drift": not a.no_retrain,
    }
    root = entry.root_or_none("flows.monitor")
    if root is None:
        return EXIT_USER_ERROR
    for key in ("folder", "metadata_csv", "model_dir", "reference_dir"):  # as typed, from the working directory
        if flow_params[key] is not None:
            flow_params[key] = str(Path(flow_params[key]).resolve())
    if a.serve:
        serve_scheduled(
            a.name, a.cron, a.timezone, {k: v for k, v in flow_params.items() if v is not None}, project_root=root
        )
        return 0
    return entry.exit_code(monitor(**flow_params, project_root=str(root), return_state=True))


if __name__ == "__main__":
    sys.exit(main())
