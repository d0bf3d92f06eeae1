"""The retraining flow's decisions, without running it: when to retry, when to force evaluate,
what a failed gate or a violated contract says, and the one-flow-per-workspace lock."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows import lock, messages, stages
from flows import retrain as flow
from pipeline.core.layout import Layout


def _failed_with(exc: BaseException):
    """A stand-in for a Prefect Failed state whose result raises ``exc``."""

    def result(*_, **__):
        raise exc

    return SimpleNamespace(result=result)


def test_only_transient_failures_are_retried():
    lock_msg = ["ERROR: Unable to acquire lock. Most likely another DVC process is running or was terminated abruptly."]
    assert stages.retry_on_transient(
        None, None, _failed_with(stages.StageFailed("train", 255, lock_msg, stages.is_transient(lock_msg)))
    )
    assert stages.retry_on_transient(
        None, None, _failed_with(OSError(errno.EAGAIN, "Resource temporarily unavailable"))
    )
    contract = ["Data contract violated: 1 of 23 checks failed", "ERROR: failed to reproduce 'validate'"]
    assert not stages.retry_on_transient(
        None, None, _failed_with(stages.StageFailed("validate", 255, contract, stages.is_transient(contract)))
    )
    assert not stages.retry_on_transient(None, None, _failed_with(FileNotFoundError(errno.ENOENT, "no such file")))
    assert not stages.retry_on_transient(None, None, _failed_with(ValueError("a bug")))
    assert not stages.retry_on_transient(None, None, SimpleNamespace(result=lambda *a, **k: {"ok": 1}))


def test_evaluate_is_forced_only_when_the_champion_changed_under_the_candidate():
    judged_vs_a = {"champion": {"md5": "A"}, "model_md5": "C"}
    assert messages.needs_forced_evaluate(judged_vs_a, champion_md5="B", candidate_md5="C")
    assert messages.needs_forced_evaluate({"champion": None}, champion_md5="B", candidate_md5="C")
    assert messages.needs_forced_evaluate(judged_vs_a, champion_md5=None, candidate_md5="C")  # champion removed
    assert not messages.needs_forced_evaluate(judged_vs_a, champion_md5="A", candidate_md5="C")
    assert not messages.needs_forced_evaluate(
        {"champion": None}, champion_md5="C", candidate_md5="C"
    )  # it is the champion
    assert not messages.needs_forced_evaluate(None, champion_md5="B", candidate_md5="C")  # never evaluated: DVC runs it
    assert not messages.needs_forced_evaluate({"champion": None}, champion_md5=None, candidate_md5="C")


def test_gate_failure_message_names_metric_value_and_threshold():
    verdict = {
        "passed": False,
        "failed": ["absolute:dx.accuracy", "regression:binary.roc_auc"],
        "gates": [
            {
                "gate": "absolute",
                "metric": "dx.accuracy",
                "direction": "min",
                "value": 0.4,
                "threshold": 1.01,
                "passed": False,
                "note": "",
            },
            {
                "gate": "absolute",
                "metric": "binary.roc_auc",
                "direction": "min",
                "value": 0.9,
                "threshold": 0.85,
                "passed": True,
                "note": "",
            },
            {
                "gate": "regression",
                "metric": "binary.roc_auc",
                "direction": "min",
                "value": 0.8,
                "threshold": 0.89,
                "champion_value": 0.9,
                "margin": 0.01,
                "passed": False,
                "note": "",
            },
            {
                "gate": "absolute",
                "metric": "dx.typo",
                "direction": "min",
                "value": None,
                "threshold": 0.5,
                "passed": False,
                "note": "metric not computed",
            },
        ],
    }
    msg = messages.failed_gates_message(verdict)
    assert "absolute:dx.accuracy = 0.4000 (needs >= 1.0100)" in msg
    assert "regression:binary.roc_auc = 0.8000 (needs >= 0.8900, champion 0.9000" in msg
    assert "dx.typo = n/a" in msg and "metric not computed" in msg
    assert "absolute:binary.roc_auc" not in msg  # passing gates are not listed


def test_validation_message_lists_failed_checks_and_points_to_the_report(tmp_path):
    started = time.time()
    checks = {
        "passed": False,
        "checks": [
            {
                "name": "in_set(dx)",
                "description": "dx is one of [...]",
                "passed": False,
                "failures": 1,
                "examples": ["row 1 (image_id ISIC_0024516): dx='melanoma'"],
            },
            {
                "name": "unique(image_id)",
                "description": "image_id is unique",
                "passed": True,
                "failures": 0,
                "examples": [],
            },
        ],
    }
    path = Layout(tmp_path).reports("validation") / "checks.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(checks))
    msg = messages.validation_failure_message(tmp_path, started)
    assert msg is not None and "1 of 2 checks failed" in msg and "dx='melanoma'" in msg
    assert "reports/validation/report.md" in msg and "image_id is unique" not in msg
    # checks older than this run (validate crashed before writing them) are not quoted
    os.utime(path, (started - 3600, started - 3600))
    assert messages.validation_failure_message(tmp_path, started) is None
    path.write_text(json.dumps({**checks, "passed": True}))
    assert messages.validation_failure_message(tmp_path, started) is None


def test_workspace_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    with lock.workspace_lock(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with (
            pytest.raises(lock.WorkspaceBusy, match="another retraining flow is running") as info,
            lock.workspace_lock(tmp_path, timeout=0),
        ):
            pass
        assert f"pid {os.getpid()}" in str(info.value)
    with lock.workspace_lock(tmp_path):  # free again
        pass


def test_workspace_lock_waits_for_the_holder(tmp_path):
    release = threading.Event()
    held = threading.Event()

    def holder():
        with lock.workspace_lock(tmp_path):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    threading.Timer(0.5, release.set).start()
    with lock.workspace_lock(tmp_path, timeout=60, poll=0.1):
        # acquired only once the holder was told to let go (not by timing: by what happened)
        acquired_after_release = release.is_set()
    t.join()
    assert acquired_after_release


def test_workspace_lock_is_released_when_the_holder_dies(tmp_path):
    code = (
        "import sys, os; sys.path.insert(0, sys.argv[2]); from pathlib import Path; from flows import lock as f; "
        "cm = f.workspace_lock(Path(sys.argv[1])); cm.__enter__(); os._exit(0)"
    )
    root = str(Path(__file__).resolve().parents[2])
    subprocess.run([sys.executable, "-c", code, str(tmp_path), root], check=True, timeout=120)
    with lock.workspace_lock(tmp_path, timeout=0):  # the dead process's lock is gone
        pass


def test_prefect_yaml_deploys_the_retraining_flow_with_valid_parameters_and_schedule():
    import inspect

    import yaml
    from prefect.client.schemas.schedules import CronSchedule

    root = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((root / "prefect.yaml").read_text())
    (dep,) = doc["deployments"]
    path, name = dep["entrypoint"].split(":")
    assert (root / path).resolve() == Path(flow.__file__).resolve() and getattr(flow, name) is flow.retrain
    assert set(dep["parameters"]) <= set(inspect.signature(flow.retrain.fn).parameters)
    for sched in dep["schedules"]:
        CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # raises on a bad cron or zone
    with pytest.raises(ValueError):
        CronSchedule(cron="61 * * * *")


def test_importing_flows_creates_missing_prefect_and_bentoml_homes(tmp_path):
    """A fresh clone has no .lesionflow/: Prefect would fail to create its home there ("unable to
    open database file"); importing the flows package creates both homes first."""
    from tests.conftest import PROJECT_ROOT

    prefect_home, bentoml_home = tmp_path / "clone/.lesionflow/prefect", tmp_path / "clone/.lesionflow/bentoml"
    env = {**os.environ, "PREFECT_HOME": str(prefect_home), "BENTOML_HOME": str(bentoml_home)}
    subprocess.run([sys.executable, "-c", "import flows"], cwd=PROJECT_ROOT, env=env, check=True)
    assert prefect_home.is_dir() and bentoml_home.is_dir()
