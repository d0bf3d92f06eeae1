"""Beyond one machine, on the real engines, every server on 127.0.0.1 started and stopped by pid
(the inference log of two replicas on object storage: ``tests/e2e/test_replicas.py``):

* a real Prefect worker: ``prefect server start``, the work pool, ``prefect deploy`` from
  prefect.yaml, ``prefect worker start --run-once`` and ``prefect deployment run --watch`` run the
  retraining flow in a tiny workspace (a copy of the shared first run: DVC finds every stage up to
  date) and package a champion;
* DVC on object storage: that workspace's data version and stage outputs are pushed to an S3
  remote and a fresh clone pulls them, after which ``dvc status`` is clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import project_env
from tests.s3_fixtures import BUCKET, s3_server
from tests.workspace_fixtures import copy_workspace

pytestmark = pytest.mark.e2e


def api_post(api_url: str, path: str, body: dict) -> list | dict:
    """POST to a Prefect server's API."""
    req = urllib.request.Request(
        f"{api_url}/{path}", data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def worked(first_run, prefect_api, tmp_path_factory):
    """A tiny workspace whose champion is packaged by a run of a real Prefect worker (the commands
    of docs/scale-out.md): the process work pool, ``prefect deploy`` from prefect.yaml, ``prefect
    worker start --run-once`` and ``prefect deployment run --watch``, against ``prefect server
    start`` (the shared ``prefect_api``). The workspace is a copy of the shared first run with a
    BentoML store of its own (``project_env``'s), so the stages are up to date and the run packages
    the model in that store."""
    tmp = tmp_path_factory.mktemp("worker")
    root = copy_workspace(first_run["snapshot"], tmp / "ws")
    prefect = [str(Path(sys.executable).parent / "prefect"), "--no-prompt"]
    api = prefect_api
    # PWD as a shell in the project root has it: prefect.yaml's pull step runs the flow there
    env = {**project_env(root), "PREFECT_API_URL": api, "PWD": str(root)}
    _run([*prefect, "work-pool", "create", "lesionflow", "--type", "process"], root, env)
    _run([*prefect, "deploy", "--all"], root, env)
    with urllib.request.urlopen(f"{api}/deployments/name/lesionflow-retrain/lesionflow-retrain-pool", timeout=30) as r:
        deployment = {"deployment_id": {"any_": [json.loads(r.read())["id"]]}}
    # the run is triggered and watched; a worker with --run-once picks it up, runs it and stops
    watch = subprocess.Popen(
        [*prefect, "deployment", "run", "lesionflow-retrain/lesionflow-retrain-pool", "--watch"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        soon = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
        due = {"flow_runs": {**deployment, "expected_start_time": {"before_": soon}}, "limit": 1}  # not the cron's
        while not api_post(api, "flow_runs/filter", due):
            assert time.monotonic() < deadline and watch.poll() is None, "the deployment run was not created"
            time.sleep(1)
        worker = _run([*prefect, "worker", "start", "--pool", "lesionflow", "--run-once"], root, env, timeout=1200)
        watched = watch.communicate(timeout=300)[0]
    finally:
        if watch.poll() is None:
            os.killpg(watch.pid, signal.SIGTERM)
            watch.wait(timeout=30)
    started = {"flow_runs": {**deployment, "start_time": {"is_null_": False}}, "sort": "START_TIME_DESC", "limit": 5}
    runs = api_post(api, "flow_runs/filter", started)
    return {"root": root, "watch": watch, "watched": watched, "runs": runs, "worker": worker}


def test_a_prefect_worker_runs_the_deployment_and_packages_a_champion(worked):
    assert worked["watch"].returncode == 0, worked["watched"][-3000:] + worked["worker"].stdout[-3000:]
    assert "Completed" in worked["watched"], worked["watched"][-2000:]
    flow_run = worked["runs"][0]
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    assert flow_run["deployment_id"] is not None, "the run came from the deployment, through the worker"
    from unittest import mock

    from pipeline.registry import champions

    with mock.patch.dict(os.environ, {"BENTOML_HOME": str(worked["root"] / ".bentoml")}):  # project_env's store
        champ = champions.champion()
    assert champ is not None and (worked["root"] / ".lesionflow" / "last_run.json").exists()
    last = json.loads((worked["root"] / ".lesionflow" / "last_run.json").read_text())
    assert last["flow_run_id"] == flow_run["id"], "the worker's run wrote the run summary"
    assert last["packaged"] == champ["tag"] and last["state"] == "Completed"
    assert not any(s["ran"] for s in last["stages"]), "the flow ran in the workspace, its stages up to date"


def test_dvc_pushes_to_an_s3_remote_and_a_fresh_clone_pulls_a_clean_workspace(worked, tmp_path):
    """The data version and every stage output go to an S3 remote; a fresh clone pulls them and
    DVC finds nothing to do (docs/scale-out.md, "DVC on object storage")."""
    root = worked["root"]
    with s3_server(tmp_path / "moto.log") as s3:
        env = {**project_env(root), **s3}
        dvc = [str(Path(sys.executable).parent / "dvc")]
        _run([*dvc, "remote", "add", "-d", "s3store", f"s3://{BUCKET}/dvcstore"], root, env)
        _run([*dvc, "remote", "modify", "s3store", "endpointurl", s3["AWS_ENDPOINT_URL"]], root, env)
        _run(["git", "add", "-A"], root, env)
        _run(["git", "commit", "-qm", "the pipeline's outputs and an S3 remote"], root, env)
        _run([*dvc, "push"], root, env)
        clone = tmp_path / "clone"
        _run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
        assert not (clone / "data").exists() and not (clone / "artifacts").exists()
        _run([*dvc, "pull"], clone, {**env, "DVC_SITE_CACHE_DIR": str(clone / ".dvc-site-cache")})
        same = clone / "data" / "HAM10000_metadata.csv"
        assert same.read_bytes() == (root / "data" / "HAM10000_metadata.csv").read_bytes()
        assert (clone / "artifacts" / "model" / "model.pt").read_bytes() == (
            root / "artifacts/model/model.pt"
        ).read_bytes()
        status = _run([*dvc, "status"], clone, env)
        assert "Data and pipelines are up to date" in status.stdout, status.stdout
