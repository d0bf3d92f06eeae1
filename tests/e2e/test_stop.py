"""A stopped `lesionflow run` leaves nothing running: SIGTERM (``kill PID``, a supervisor) or SIGINT
(Ctrl-C) during training ends DVC, the training and Prefect's temporary server with the run, and
the next run resumes at the stage that was stopped (DVC finds the earlier ones up to date) and the
last run's model is still there."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import plain_env
from tests.workspace_fixtures import copy_workspace, lesionflow

pytestmark = pytest.mark.e2e


def _set_epochs(root: Path, epochs: int) -> None:
    path = root / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["train"]["epochs"] = epochs
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _stop_during_training(root: Path, sig: signal.Signals, log: Path) -> None:
    """Start a run (ephemeral Prefect server, as `make run`), send ``sig`` once training runs, and
    check that the run and every process it started have ended."""
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    env = plain_env(home, DVC_SITE_CACHE_DIR=str(root / ".dvc-site-cache"))
    with open(log, "w") as out:
        run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--retries", "0"], cwd=root, env=env,
                               stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while "train | epoch 1" not in log.read_text():
                assert run.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
            started = psutil.Process(run.pid).children(recursive=True)
            names = " ".join(" ".join(p.cmdline()) for p in started if p.is_running())
            assert "uvicorn" in names and "dvc" in names and "pipeline.stages.train" in names, names
            run.send_signal(sig)
            assert run.wait(timeout=90) != 0
            _, alive = psutil.wait_procs(started, timeout=30)
            assert not alive, [" ".join(p.cmdline()) for p in alive if p.is_running()]
        finally:
            if run.poll() is None:
                run.kill()


def test_a_stopped_run_leaves_nothing_running_and_the_next_resumes_at_train(first_run, tmp_path):
    root = copy_workspace(first_run["snapshot"], tmp_path / "ws")
    _set_epochs(root, 500)  # training now long enough to be stopped in the middle
    for sig in (signal.SIGTERM, signal.SIGINT):
        _stop_during_training(root, sig, tmp_path / f"run-{sig.name}.log")
    # what the next run does is what DVC finds out of date: train and what follows it, nothing before
    status = lesionflow(root, "dvc", "status", "--json")
    assert status.returncode == 0, status.stdout[-3000:]
    stale = set(json.loads(status.stdout[status.stdout.index("{") :]))
    assert "train" in stale and not stale & {"validate", "split", "eda"}, stale
    assert (root / "artifacts/model/model.pt").exists()  # the last run's model: a stopped run did not remove it
