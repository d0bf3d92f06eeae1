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


def test_a_drift_check_is_recorded_with_the_stored_model_it_ran_against(harness, tmp_path, monkeypatch):
    """The check travels with the model whose weights it compared against (``monitoring/`` in its
    store folder): ``lesionflow trace`` and the audit bundle show it; another model gets nothing."""
    import flows.monitor as fm
    from pipeline.audit import evidence
    from pipeline.model import bundle
    from pipeline.registry import package, trace
    from tests.registry_fixtures import write_evaluation, write_model_dir

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    tags = {}
    for name, seed in (("checked", 0), ("other", 1)):
        model = write_model_dir(tmp_path / name / "model", seed=seed)
        files = write_evaluation(model, tmp_path / name / "evaluate", tmp_path / name / "reports")
        tags[name] = (package.package(model, tmp_path / name / "evaluate", tmp_path / name / "reports",
                                      project_root=PROJECT_ROOT), files["model_md5"])  # fmt: skip
    checked_tag, md5 = tags["checked"]
    fake = _fake_check("no_drift")

    @task(name="check")
    def check(*args):
        return {**fake.fn(*args), "created_at": "2026-03-01T00:00:00+00:00",
                "reference": {"model": {"model_md5": md5}}}  # fmt: skip

    monkeypatch.setattr(fm, "check", check)
    root = _workspace(tmp_path / "ws", "champion-md5")
    assert fm.monitor(folder="new-images", project_root=str(root), return_state=True).name == "NoDrift"
    recorded = trace.describe(checked_tag)
    assert [(r["report"], r["decision"], r["model_md5"]) for r in recorded["drift_checks"]] == [
        ("20260301T000000Z", "no_drift", md5)
    ]
    assert recorded["drift_checks"][0]["source"] == {"kind": "folder", "path": "new-images"}
    assert trace.describe(tags["other"][0])["drift_checks"] == []
    assert bundle.verify(Path(recorded["path"]))["model_md5"] == md5  # a record added later alters no packaged file
    # the audit bundle lists it once, from the store, even without the workspace's reports
    shutil.rmtree(root / "reports")
    assert [r["report"] for r in evidence.drift_checks(root, Path(recorded["path"]), md5)] == ["20260301T000000Z"]
