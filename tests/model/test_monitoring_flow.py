"""The monitoring flow's retraining trigger: on confirmed drift it runs the retraining deployment
only when a new DVC data version exists (data.dvc md5 != the champion's), otherwise it ends in a
DriftDetected (failed) state carrying the report's path; no drift completes quietly."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect import task
from prefect.testing.utilities import prefect_test_harness

from tests.conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _workspace(root: Path, data_md5: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    (root / "data.dvc").write_text(f"outs:\n- md5: {data_md5}\n  path: data\n")
    return root


def _fake_check(decision: str):
    @task(name="check")
    def check(root, folder, metadata_csv, hours, model_dir, reference_dir):
        report = Path(root) / "reports" / "monitoring" / "20260301T000000Z"
        report.mkdir(parents=True, exist_ok=True)
        return {
            "decision": decision,
            "reason": f"{decision}: brightness drifted",
            "report_dir": str(report),
            "source": {"kind": "folder", "path": folder},
            "n_current": 500,
            "n_reference": 2000,
            "min_batch_size": 100,
            "drift_share": 0.5,
            "n_features": 80,
            "thresholds": {"drift_share": 0.25},
            "key_features_drifted": ["brightness"],
            "embedding_drift": None,
            "drifted_columns": ["brightness"],
            "column_drift": {},
            "reports": {},
        }

    return check


@pytest.mark.parametrize(
    "decision, workspace_md5, expect",
    [
        ("drift", "new-data-md5", "RetrainingTriggered"),
        ("drift", "champion-md5", "DriftDetected"),
        ("no_drift", "new-data-md5", "NoDrift"),
    ],
)
def test_retraining_only_with_a_new_data_version(harness, tmp_path, monkeypatch, decision, workspace_md5, expect):
    import flows.monitor as fm

    calls = []
    monkeypatch.setattr(fm, "check", _fake_check(decision))
    monkeypatch.setattr(fm, "champion_data_md5", lambda: "champion-md5")
    monkeypatch.setattr(fm, "run_deployment", lambda **kw: calls.append(kw) or "run-123")
    root = _workspace(tmp_path / "ws", workspace_md5)
    state = fm.monitor(folder="new-images", project_root=str(root), return_state=True)
    assert state.name == expect, state.message
    report = str(root.resolve() / "reports" / "monitoring" / "20260301T000000Z")
    if expect == "RetrainingTriggered":
        assert state.is_completed()
        assert calls == [
            {
                "name": "lesionflow-retrain/lesionflow-retrain-scheduled",
                "timeout": 0,
                "parameters": {"project_root": str(root.resolve())},
            }
        ]
    elif expect == "DriftDetected":
        assert state.is_failed() and not calls
        assert report in state.message and "no new labelled data" in state.message
    else:
        assert state.is_completed() and not calls


def test_unreachable_retraining_deployment_ends_in_an_alert(harness, tmp_path, monkeypatch):
    import flows.monitor as fm

    def missing(**kw):
        raise RuntimeError("deployment lesionflow-retrain/lesionflow-retrain-scheduled not found")

    monkeypatch.setattr(fm, "check", _fake_check("drift"))
    monkeypatch.setattr(fm, "champion_data_md5", lambda: "champion-md5")
    monkeypatch.setattr(fm, "run_deployment", missing)
    monkeypatch.setattr(fm.trigger_retraining, "retries", 0)
    root = _workspace(tmp_path / "ws", "new-data-md5")
    state = fm.monitor(folder="new-images", project_root=str(root), return_state=True)
    assert state.name == "DriftDetected" and state.is_failed()
    assert "not found" in state.message and "python -m flows.retrain --serve" in state.message
    assert "reports/monitoring/20260301T000000Z" in state.message
