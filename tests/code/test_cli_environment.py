"""The CLI configures itself: run from a plain shell (only ``PATH`` and ``HOME``: no
``BENTOML_HOME``, ``PREFECT_HOME``, ``COLUMNS`` or telemetry variables), from the project root or
any folder below it, ``lesionflow status``, ``trace`` and ``predict`` find the project's BentoML
store under ``.lesionflow/``, give the right answers, and keep long paths on one line when their
output is not a terminal. The project sits at a long path, as a fresh clone may."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.registry import package as packaging
from tests.conftest import plain_env, project_env
from tests.registry_fixtures import PROJECT_ROOT, write_evaluation, write_model_dir

LESIONFLOW = Path(sys.executable).parent / "lesionflow"
DATA_MD5 = "fedcba9876543210fedcba9876543210.dir"
THRESHOLD = 0.25


def run(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LESIONFLOW), *args],
        cwd=cwd,
        env=plain_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_data):
    """A project at a long path: dvc.yaml, params.yaml, data.dvc and three images, committed to
    git, with one tiny packaged model in the project's own store ``.lesionflow/bentoml``."""
    base = tmp_path_factory.mktemp("ws")
    root = base / "a-rather-long-folder-name-for-a-fresh-clone" / "and-another-one-below-it" / "lesionflow-main"
    root.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(PROJECT_ROOT / name, root / name)
    (root / "data.dvc").write_text(f"outs:\n- md5: {DATA_MD5}\n  size: 1234\n  nfiles: 3\n  path: data\n")
    images = root / "data" / "images"
    images.mkdir(parents=True)
    for src in sorted((tiny_data / "images").glob("*.jpg"))[:3]:
        shutil.copyfile(src, images / src.name)
    env = project_env(root)
    git = lambda *a: subprocess.run(
        ["git", *a],
        cwd=root,
        env=env,
        check=True,  # noqa: E731
        capture_output=True,
        text=True,
    ).stdout.strip()
    git("init", "-q", "-b", "main")
    git("add", "dvc.yaml", "params.yaml", "data.dvc")
    git("commit", "-qm", "project")
    model = write_model_dir(base / "model")
    write_evaluation(model, base / "evaluate", base / "reports", threshold=THRESHOLD)
    store = root / ".lesionflow" / "bentoml"
    before = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(store)
    try:
        tag = packaging.package(model, base / "evaluate", base / "reports", project_root=root)
    finally:
        os.environ["BENTOML_HOME"] = before if before is not None else ""
        if before is None:
            del os.environ["BENTOML_HOME"]
    home = base / "home"
    home.mkdir()
    sub = root / "data" / "images"
    return {"root": root, "sub": sub, "tag": tag, "store": store, "home": home, "commit": git("rev-parse", "HEAD")}


@pytest.mark.parametrize("where", ["root", "sub"])
def test_status_finds_the_projects_store_from_a_plain_shell(workspace, where):
    res = run(["status"], workspace[where], workspace["home"])
    assert res.returncode == 0, res.stdout
    lines = res.stdout.splitlines()
    assert f"Project: {workspace['root']}" in lines
    store_line = [ln for ln in lines if ln.startswith("BentoML store")]
    assert store_line == [f"BentoML store (models, bentos): {workspace['store']} (the project's default)"]
    assert any(ln.startswith(f"Prefect home: {workspace['root'] / '.lesionflow' / 'prefect'}") for ln in lines)
    assert f"Champion: {workspace['tag']}" in res.stdout
    assert "Traceback" not in res.stdout and "telemetry" not in res.stdout.lower()
    # nothing went to the user's home (the BentoML / Prefect defaults)
    assert not (workspace["home"] / "bentoml").exists() and not (workspace["home"] / ".prefect").exists()


@pytest.mark.parametrize("where", ["root", "sub"])
def test_trace_finds_the_champion_from_a_plain_shell(workspace, where):
    res = run(["trace", workspace["tag"], "--json"], workspace[where], workspace["home"])
    assert res.returncode == 0, res.stdout
    rec = json.loads(res.stdout)
    assert rec["tag"] == workspace["tag"] and rec["data_md5"] == DATA_MD5
    assert rec["git_commit"] == workspace["commit"] and rec["threshold"] == pytest.approx(THRESHOLD)
    assert rec["path"].startswith(str(workspace["store"]))


def test_predict_from_a_subfolder_takes_paths_as_typed(workspace):
    sub = workspace["sub"]
    res = run(["predict", ".", "--out", "p.csv"], sub, workspace["home"])
    assert res.returncode == 0, res.stdout
    df = pd.read_csv(sub / "p.csv")  # relative to where the user typed it
    assert len(df) == 3 and (df["model"] == workspace["tag"]).all() and (df["threshold"] == THRESHOLD).all()
    assert ((df["decision"] == "malignant") == (df["p_malignant"] >= THRESHOLD)).all()
    (sub / "p.csv").unlink()


def test_predict_with_log_writes_the_answers_to_the_projects_inference_log(workspace):
    """``lesionflow predict --log`` writes each answer as the service would (route, the file's
    sha256, the image statistics), never the file's name, to the project's log."""
    import hashlib

    from pipeline.monitoring import inferencelog

    sub = workspace["sub"]
    res = run(["predict", ".", "--log"], sub, workspace["home"])
    assert res.returncode == 0, res.stdout
    log_dir = workspace["root"] / "logs" / "inference"
    assert f"Logged 3 answer(s) to {log_dir}" in res.stdout
    df = inferencelog.read(log_dir)
    files = sorted(sub.glob("*.jpg"))
    assert len(df) == 3 and (df["route"] == inferencelog.PREDICT_ROUTE).all() and df["has_statistics"].all()
    assert sorted(df["image_sha256"]) == sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files)
    assert (df["model_tag"] == workspace["tag"]).all()
    assert not any(
        p.name in log_dir.joinpath(f).read_text() for p in files for f in os.listdir(log_dir) if f.endswith(".jsonl")
    )


def test_outside_a_project_commands_that_need_one_say_so(tmp_path, workspace):
    res = run(["status"], tmp_path, workspace["home"])
    assert res.returncode == 2
    assert "not inside a lesionflow project" in res.stdout and "dvc.yaml and params.yaml" in res.stdout


def test_long_paths_in_messages_stay_on_one_line_when_not_a_terminal(workspace):
    """No COLUMNS and a pipe: rich would wrap at 80 columns and split the path."""
    deep = workspace["root"] / "some" / "deeply" / "nested" / "folder-with-a-long-name" / "ISIC_0000000.jpg"
    assert len(str(deep)) > 120
    res = run(["predict", str(deep)], workspace["sub"], workspace["home"])
    assert res.returncode == 2  # nothing given is an image: a user error, said in one line
    assert f"error: {deep}: no such file or folder" in res.stdout.splitlines()
    res = run(["trace", "lesionflow-classifier:doesnotexist"], workspace["sub"], workspace["home"])
    assert res.returncode == 2
    (line,) = [ln for ln in res.stdout.splitlines() if "unknown tag" in ln]
    assert f"(store: {workspace['store']})" in line and "known models:" in line


def test_env_gives_prefect_and_bentoml_commands_the_same_settings(workspace):
    script = (
        f'eval "$({LESIONFLOW} env)" && printenv BENTOML_HOME PREFECT_HOME PREFECT_SERVER_ANALYTICS_ENABLED '
        "&& command -v prefect bentoml dvc"
    )
    res = subprocess.run(
        ["bash", "-c", script],
        cwd=workspace["sub"],
        env=plain_env(workspace["home"]),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[:3] == [str(workspace["store"]), str(workspace["root"] / ".lesionflow" / "prefect"), "false"]
    assert all(Path(tool).parent == LESIONFLOW.parent for tool in lines[3:6])
