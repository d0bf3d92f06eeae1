"""The ``lesionflow`` CLI on a temporary BentoML store holding one packaged (untrained) model:
``trace`` finds the data version and the restore commands or fails clearly, ``predict`` gives
probabilities and decisions at the model's threshold and skips unreadable files by name,
``status`` reports an empty workspace."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli.app import app
from pipeline.cli.serve import serve_env
from pipeline.registry import package as packaging
from tests.conftest import project_env
from tests.registry_fixtures import PROJECT_ROOT, write_evaluation, write_model_dir

DATA_MD5 = "0123456789abcdef0123456789abcdef.dir"
THRESHOLD = 0.3

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def _project_files(root):
    """What makes a folder a lesionflow project (pipeline.core.project.ROOT_MARKERS)."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(PROJECT_ROOT / name, root / name)


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    """A project dir (cwd) with a data.dvc pointer and a store holding one packaged model."""
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.chdir(tmp_path)
    _project_files(tmp_path)
    (tmp_path / "data.dvc").write_text(f"outs:\n- md5: {DATA_MD5}\n  size: 1234\n  nfiles: 70\n  path: data\n")
    git = lambda *a: subprocess.run(
        ["git", *a],
        cwd=tmp_path,
        env=project_env(tmp_path),
        check=True,  # noqa: E731
        capture_output=True,
        text=True,
    ).stdout.strip()
    git("init", "-q", "-b", "main")
    git("add", "data.dvc")
    git("commit", "-qm", "data")
    model = write_model_dir(tmp_path / "artifacts/model")
    write_evaluation(model, tmp_path / "artifacts/evaluate", tmp_path / "reports/evaluate", threshold=THRESHOLD)
    evaluated = (model, tmp_path / "artifacts/evaluate", tmp_path / "reports/evaluate")
    tag = packaging.package(*evaluated, project_root=tmp_path)
    return tmp_path, tag, git("rev-parse", "HEAD")


def test_trace_unknown_tag_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    res = invoke("trace", "lesionflow-classifier:doesnotexist")
    assert res.exit_code == 2
    assert "unknown tag 'lesionflow-classifier:doesnotexist'" in res.output and "known models: none" in res.output
    res = invoke("trace", "not a tag!")
    assert res.exit_code == 2 and "not a valid tag" in res.output


def test_trace_gives_data_version_commit_and_restore_commands(workspace):
    _, tag, commit = workspace
    res = invoke("trace", tag, "--json")
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["tag"] == tag and rec["data_md5"] == DATA_MD5 and rec["threshold"] == pytest.approx(THRESHOLD)
    assert rec["git_commit"] == commit
    res = invoke("trace", tag)
    assert res.exit_code == 0, res.output
    assert DATA_MD5 in res.output and f"git checkout {commit}" in res.output and "dvc checkout" in res.output
    assert "binary.roc_auc" in res.output and "PASSED" in res.output


def _images(tiny_data, dest, n=3):
    dest.mkdir(parents=True)
    srcs = sorted((tiny_data / "images").glob("*.jpg"))[:n]
    for s in srcs[:-1]:
        shutil.copyfile(s, dest / s.name)
    Image.open(srcs[-1]).convert("RGB").resize((600, 450)).save(dest / "large.png")  # PNG, another size
    data = srcs[0].read_bytes()
    (dest / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (dest / "notes.jpg").write_text("not an image")
    return [s.name for s in srcs[:-1]] + ["large.png"]


def test_predict_folder_writes_probabilities_and_decisions_and_skips_bad_files(workspace, tiny_data):
    root, tag, _ = workspace
    good = _images(tiny_data, root / "batch")
    res = invoke("predict", "batch", str(root / "missing.jpg"), "--out", "out/preds.csv")
    assert res.exit_code == 0, res.output
    for bad in ("truncated.jpg", "notes.jpg", "missing.jpg"):
        assert bad in res.output, f"{bad} should be reported as skipped"
    assert "3 predicted, 3 skipped" in res.output
    df = pd.read_csv(root / "out/preds.csv")
    assert sorted(df["file"].map(lambda f: f.split("/")[-1])) == sorted(good)
    dx_cols = [f"p_dx_{c}" for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")]
    risk_cols = [c for c in df.columns if c.startswith("p_risk_")]
    assert set(dx_cols) <= set(df.columns) and len(risk_cols) == 3
    np.testing.assert_allclose(df[dx_cols].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(df[risk_cols].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(df["p_malignant"], df["p_binary_malignant"], atol=1e-9)
    assert (df["decision"] == np.where(df["p_malignant"] >= THRESHOLD, "malignant", "benign")).all()
    assert (df["threshold"] == THRESHOLD).all() and (df["model"] == tag).all()
    assert set(df["risk_pred"]) <= {"benign", "benign_at_risk", "malignant"}
    assert list(df.columns[-3:]) == ["threshold", "decision", "model"]  # the prediction-row schema


def test_predict_with_a_model_dir_or_tag_and_a_threshold_override(workspace, tiny_data):
    root, tag, _ = workspace
    _images(tiny_data, root / "batch")
    res = invoke("predict", "batch", "--model", tag, "--threshold", "0", "--out", "a.csv")
    assert res.exit_code == 0, res.output
    assert (pd.read_csv(root / "a.csv")["decision"] == "malignant").all()  # p >= 0 always
    # an unpackaged model dir without an operating point: the threshold must be given
    res = invoke("predict", "batch", "--model", str(root / "artifacts/model"))
    assert res.exit_code == 0, res.output  # the evaluate stage judged this very model (md5 matches)
    shutil.rmtree(root / "artifacts/evaluate")
    res = invoke("predict", "batch", "--model", str(root / "artifacts/model"))
    assert res.exit_code == 2 and "no operating threshold" in res.output


def test_predict_at_a_site_decides_at_its_threshold_or_not_at_all(workspace, tiny_data):
    """``--site`` as the service's ``site``: the site's threshold and a ``site`` column; at a site not
    suitable for the model, probabilities and an empty decision; an unknown site or a second
    threshold is refused naming it."""
    from pipeline.model import bundle, sites
    from pipeline.registry.store import resolve

    root, tag, _ = workspace
    _images(tiny_data, root / "batch")
    stored = resolve(tag)[0].path
    for name, threshold, suitable in (("clinic-a", 0.0, True), ("clinic-b", 0.5, False)):
        record = {"name": name, "threshold": threshold, "target_sensitivity": 0.95, "suitable": suitable}
        sites.write(
            stored,
            {
                **record,
                "reason": None if suitable else "too few benign referred",
                "model_md5": bundle.model_md5(stored),
            },
        )
    res = invoke("predict", "batch", "--model", tag, "--site", "clinic-a", "--out", "a.csv")
    assert res.exit_code == 0, res.output
    df = pd.read_csv(root / "a.csv")
    assert (df["decision"] == "malignant").all() and (df["threshold"] == 0.0).all() and (df["site"] == "clinic-a").all()
    assert list(df.columns[-2:]) == ["site", "model"]
    res = invoke("predict", "batch", "--model", tag, "--site", "clinic-b", "--out", "b.csv")
    assert res.exit_code == 0 and "not suitable for this model" in " ".join(res.output.split())
    df = pd.read_csv(root / "b.csv")
    assert df["decision"].isna().all() and df["p_malignant"].notna().all()
    res = invoke("predict", "batch", "--model", tag, "--site", "clinic-z")
    assert res.exit_code == 2 and "unknown site 'clinic-z'" in res.output and "clinic-a, clinic-b" in res.output
    res = invoke("predict", "batch", "--model", tag, "--site", "clinic-a", "--threshold", "0.2")
    assert res.exit_code == 2 and "give one" in res.output


def test_predict_names_why_an_image_was_not_judged_and_leaves_its_decision_empty(workspace):
    root, _, _ = workspace
    meta = pd.read_csv(PROJECT_ROOT / "data" / "HAM10000_metadata.csv").sample(40, random_state=2)
    files = [PROJECT_ROOT / "data" / "images" / f"{i}.jpg" for i in meta["image_id"]]
    rgb = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    model = write_model_dir(root / "checked", trust_images=rgb, trust_labels=list(meta["dx"]))
    write_evaluation(model, root / "checked-eval", root / "checked-reports", threshold=THRESHOLD)
    (root / "mixed").mkdir()
    Image.new("RGB", (300, 200), (0, 0, 0)).save(root / "mixed" / "capped.png")
    shutil.copy(files[0], root / "mixed" / "lesion.jpg")
    res = invoke("predict", "mixed", "--model", str(model), "--threshold", "0.3", "--out", "q.csv")
    assert res.exit_code == 0, res.output
    assert "not judged: blank or without visible structure" in " ".join(res.output.split())
    assert "1 image(s) refused by the image-quality checks" in res.output
    df = pd.read_csv(root / "q.csv", keep_default_na=False).set_index("file")
    capped = df.loc[[f for f in df.index if f.endswith("capped.png")][0]]
    lesion = df.loc[[f for f in df.index if f.endswith("lesion.jpg")][0]]
    assert set(capped["quality_reasons"].split("; ")) >= {"blank", "underexposed"} and capped["decision"] == ""
    assert lesion["quality_reasons"] == "" and lesion["decision"] in ("malignant", "benign")


def test_predict_with_nothing_readable_fails(workspace):
    root, _, _ = workspace
    (root / "junk.png").write_bytes(b"")
    res = invoke("predict", "junk.png")
    assert res.exit_code == 1 and "junk.png" in res.output and "empty file" in res.output


def test_status_of_an_empty_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    monkeypatch.chdir(tmp_path)
    _project_files(tmp_path)
    res = invoke("status")
    assert res.exit_code == 0, res.output
    assert "Champion: none yet" in res.output and "Last run: none recorded" in res.output


def test_status_shows_champion_and_last_run(workspace):
    root, tag, _ = workspace
    (root / ".lesionflow").mkdir()
    (root / ".lesionflow/last_run.json").write_text(
        json.dumps(
            {
                "flow_run_name": "brave-otter",
                "state": "GateFailed",
                "state_type": "FAILED",
                "message": "Gates failed: absolute:dx.accuracy = 0.1000 (needs >= 1.0100)",
                "finished_at": "2026-01-01T00:00:00+00:00",
                "stages": [
                    {"stage": "validate", "ran": False, "seconds": 1.0},
                    {"stage": "evaluate", "ran": True, "seconds": 9.0},
                ],
            }
        )
    )
    res = invoke("status")
    assert res.exit_code == 0, res.output
    assert tag in res.output and "brave-otter" in res.output and "GateFailed" in res.output
    assert "Gate verdict" in res.output and "binary.roc_auc" in res.output


def test_serve_sends_the_inference_log_to_the_projects_log_dir(tmp_path):
    """A Bento runs from its own folder in the BentoML store: `lesionflow serve` must point the
    inference log at the project's monitor.log_dir (absolute), where monitoring reads it, and keep
    an operator's own $LESIONFLOW_INFERENCE_LOG."""
    assert "--bento" in invoke("serve", "--help").output  # the command itself is there
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(PROJECT_ROOT / "params.yaml", project / "params.yaml")
    env = serve_env({"PATH": "/usr/bin"}, project)
    assert env["LESIONFLOW_INFERENCE_LOG"] == str((project / "logs/inference").resolve())
    assert env["PATH"] == "/usr/bin"
    own = serve_env({"LESIONFLOW_INFERENCE_LOG": "/var/log/lesionflow"}, project)
    assert own["LESIONFLOW_INFERENCE_LOG"] == "/var/log/lesionflow"
    elsewhere = serve_env({}, tmp_path / "elsewhere")  # no params.yaml: the default folder
    assert elsewhere["LESIONFLOW_INFERENCE_LOG"] == str((tmp_path / "elsewhere/logs/inference").resolve())
