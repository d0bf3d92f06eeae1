"""The drift-monitoring flow: check new images against the training reference, publish the verdict,
and on confirmed drift retrain (when new labelled data exist) or raise an alert.

    python -m flows.monitor --folder PATH [--metadata CSV]   # a folder of new images (labels optional)
    python -m flows.monitor                                  # the last monitor.window_hours of the service log
    python -m flows.monitor --serve --cron "0 * * * *"       # a scheduled deployment (see docs/monitoring.md)
    lesionflow monitor PATH                                  # the CLI (same flow)

Tasks: ``check`` (:mod:`pipeline.monitoring`: statistics, predictions, Evidently reports and the
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
retraining rule are in :mod:`pipeline.monitoring`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.states import Completed, Failed, State

from pipeline import lineage, monitoring, params
from pipeline.core import project

FLOW_NAME = "lesionflow-monitor"
DEPLOYMENT_NAME = "lesionflow-monitor-scheduled"
DEFAULT_CRON = "0 * * * *"  # hourly
DEFAULT_TIMEZONE = "UTC"
DEFAULT_REFERENCE = Path("artifacts/reference")


def resolve_reference(root: Path, model_dir: Path, reference_dir: str | None) -> Path:
    """The profile to compare with: the given one, else the one packaged with the model
    (``<model_dir>/reference``), else ``artifacts/reference``."""
    if reference_dir:
        return root / reference_dir
    packaged = root / model_dir / "reference"
    return packaged if packaged.exists() else root / DEFAULT_REFERENCE


def champion_data_md5() -> str | None:
    """The data md5 the champion was trained on (BentoML store label), or None without a champion."""
    from pipeline import registry

    champ = registry.champion()
    return None if champ is None else (champ.get("labels") or {}).get("data_md5")


@task(name="check", cache_policy=NO_CACHE)
def check(root: str, folder: str | None, metadata_csv: str | None, hours: float | None,
          model_dir: str | None, reference_dir: str | None) -> dict[str, Any]:
    """Build the current batch (folder or log window) and run the check."""
    from pipeline.inference import load_model

    logger = get_run_logger()
    rootp = Path(root)
    p = params.load_section("monitor", rootp / params.DEFAULT_PARAMS)
    mdir = Path(model_dir or p.model_dir)
    ref = monitoring.load_reference(resolve_reference(rootp, mdir, reference_dir))
    out_root = rootp / p.reports_dir
    if folder is not None:
        monitoring.check_model_matches(ref, rootp / mdir)
        predictor = load_model(rootp / mdir, device="cpu")
        taxonomy = params.load_taxonomy(rootp / params.DEFAULT_PARAMS)
        current, skipped = monitoring.current_from_folder(
            folder, ref, predictor, metadata_csv=metadata_csv, taxonomy=taxonomy, workers=p.workers,
            chunk_size=p.chunk_size, batch_size=p.batch_size, progress=True)
        source = {"kind": "folder", "path": str(folder), "metadata_csv": metadata_csv}
    else:
        from pipeline import inferencelog

        start, end = inferencelog.window(hours or p.window_hours)
        current, skipped = monitoring.current_from_log(rootp / p.log_dir, start, end), []
        source = {"kind": "log", "path": str(rootp / p.log_dir), "window": [start.isoformat(), end.isoformat()]}
    logger.info("checking %d current images against %d reference images (%s)", len(current), len(ref.frame),
                ref.path)
    summary = monitoring.run_check(ref, current, p, out_root, source, skipped_images=skipped)
    logger.info("%s", summary["reason"])
    return summary


@task(name="publish", cache_policy=NO_CACHE)
def publish(summary: dict[str, Any]) -> None:
    create_markdown_artifact(key="lesionflow-monitor", markdown=monitoring.summary_markdown(summary),
                             description=f"drift check: {summary['decision']}")
    report_dir = Path(summary["report_dir"]).resolve()
    create_link_artifact(key="lesionflow-monitor-report", link=report_dir.as_uri(),
                         link_text=str(report_dir), description="Evidently reports of the last drift check")


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
    logger = get_run_logger()
    root = str(Path(project_root).resolve())
    summary = check(root, folder, metadata_csv, hours, model_dir, reference_dir)
    publish(summary)
    report = summary["report_dir"]
    if summary["decision"] != monitoring.DRIFT:
        return Completed(name="NoDrift" if summary["decision"] == monitoring.NO_DRIFT else "NotEnoughData",
                         message=f"{summary['reason']} (report: {report})", data=summary)
    data_md5 = lineage.data_version(Path(root) / "data.dvc").get("md5")
    try:
        champ_md5 = champion_data_md5()
    except Exception as exc:  # noqa: BLE001 - no registry: never retrain blindly
        logger.warning("champion unknown (%s): not retraining", exc)
        champ_md5 = data_md5
    action = monitoring.retrain_decision(summary, data_md5, champ_md5)
    p = params.load_section("monitor", Path(root) / params.DEFAULT_PARAMS)
    if action["action"] == "retrain" and retrain_on_drift:
        triggered = trigger_retraining(p.retrain_deployment, root, return_state=True)
        if not triggered.is_completed():  # e.g. the deployment is not served: alert instead
            return Failed(name="DriftDetected",
                          message=f"{summary['reason']}. {action['reason']}, but triggering {p.retrain_deployment} "
                                  f"failed ({triggered.message}; serve it with `python -m flows.retrain --serve`). "
                                  f"Report: {report}", data=summary)
        run_id = triggered.result()
        return Completed(name="RetrainingTriggered",
                         message=f"{summary['reason']}. {action['reason']}: triggered {p.retrain_deployment} "
                                 f"(flow run {run_id}). Report: {report}", data=summary)
    return Failed(name="DriftDetected", message=f"{summary['reason']}. {action['reason']}. Report: {report}",
                  data=summary)


def serve_scheduled(name: str = DEPLOYMENT_NAME, cron: str = DEFAULT_CRON, timezone_name: str = DEFAULT_TIMEZONE,
                    parameters: dict[str, Any] | None = None, project_root: Path | None = None) -> None:
    """Register the scheduled deployment (the latest log window on ``cron``) with the Prefect
    server (``PREFECT_API_URL``) and execute its runs in this process until stopped."""
    from prefect.schedules import Cron

    monitor.serve(
        name=name,
        schedules=[Cron(cron, timezone=timezone_name)],
        parameters={"project_root": str(project_root or project.require_root()), **(parameters or {})},
        tags=["lesionflow", "monitoring"],
        description="Scheduled drift check of the service's inference log against the training reference.",
        limit=1,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.monitor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", help="a folder of new images (default: the inference log's latest window)")
    ap.add_argument("--metadata", help="CSV with image_id and optional age, sex, localization, dx (labels)")
    ap.add_argument("--hours", type=float, help="log window in hours (default monitor.window_hours)")
    ap.add_argument("--model-dir", help="model directory (default monitor.model_dir)")
    ap.add_argument("--reference-dir", help="reference profile (default <model-dir>/reference or artifacts/reference)")
    ap.add_argument("--no-retrain", action="store_true", help="never trigger retraining, only alert")
    ap.add_argument("--serve", action="store_true", help="serve the scheduled deployment instead of running once")
    ap.add_argument("--name", default=DEPLOYMENT_NAME, help="deployment name (with --serve)")
    ap.add_argument("--cron", default=DEFAULT_CRON, help="cron schedule (with --serve)")
    ap.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="time zone of the cron schedule (with --serve)")
    a = ap.parse_args(argv)
    flow_params = {"folder": a.folder, "metadata_csv": a.metadata, "hours": a.hours, "model_dir": a.model_dir,
                   "reference_dir": a.reference_dir, "retrain_on_drift": not a.no_retrain}
    try:
        root = project.require_root()
    except project.ProjectNotFound as exc:
        print(f"flows.monitor: {exc}", file=sys.stderr)
        return 2
    for key in ("folder", "metadata_csv", "model_dir", "reference_dir"):  # as typed, from the working directory
        if flow_params[key] is not None:
            flow_params[key] = str(Path(flow_params[key]).resolve())
    if a.serve:
        serve_scheduled(a.name, a.cron, a.timezone, {k: v for k, v in flow_params.items() if v is not None},
                        project_root=root)
        return 0
    state = monitor(**flow_params, project_root=str(root), return_state=True)
    print(f"{state.name}: {state.message}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
