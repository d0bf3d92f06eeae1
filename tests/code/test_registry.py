"""pipeline.registry on a temporary BENTOML_HOME: package -> champion -> export -> describe round
trip with the lineage an auditor needs; refusals (failed gate, evaluated another model, missing
files); describe() of unknown tags; an offline `bentoml build` whose Bento pins the champion and
holds its Dockerfile."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.core import lineage
from pipeline.model import bundle, inference
from pipeline.registry import bento as bentos
from pipeline.registry import champions, history, store, trace
from pipeline.registry import package as packaging
from tests.registry_fixtures import PROJECT_ROOT, write_evaluation, write_model_dir
from tools import codemap


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "bentoml"
    monkeypatch.setenv("BENTOML_HOME", str(h))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    monkeypatch.delenv("LESIONFLOW_MODEL_TAG", raising=False)
    return h


def _evaluated(tmp_path, name: str, seed: int = 0, **kw):
    model = write_model_dir(tmp_path / name / "model", seed=seed)
    ev, rep = tmp_path / name / "evaluate", tmp_path / name / "reports"
    files = write_evaluation(model, ev, rep, **kw)
    return model, ev, rep, files


def test_round_trip_package_champion_export_describe(home, tmp_path):
    assert champions.champion() is None
    model, ev, rep, files = _evaluated(tmp_path, "a", threshold=0.27)
    tag = packaging.package(model, ev, rep, project_root=PROJECT_ROOT)
    assert tag.startswith(f"{store.MODEL_NAME}:")
    assert str(home) in champions.champion()["path"]

    champ = champions.champion()
    assert champ["tag"] == tag
    data_md5 = lineage.data_version(PROJECT_ROOT / "data.dvc")["md5"]
    assert champ["labels"]["data_md5"] == data_md5
    assert champ["labels"]["model_md5"] == files["model_md5"]

    dest = tmp_path / "champion"
    assert history.export_champion(dest) == tag
    for name in ("model.pt", "config.json"):
        assert lineage.file_md5(dest / name) == lineage.file_md5(model / name)
    assert json.loads((dest / "operating_point.json").read_text())["threshold"] == 0.27
    assert inference.load_model(dest, device="cpu").classes == inference.load_model(model, device="cpu").classes

    d = trace.describe(tag)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert d["tag"] == tag and d["bento_tag"] is None
    assert d["data_md5"] == data_md5
    assert d["git_commit"] == commit
    assert d["threshold"] == 0.27
    assert d["model_md5"] == files["model_md5"]
    assert d["metrics"] == files["metrics"]
    assert d["gates"]["passed"] is True
    assert d["params"] == yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    lock = yaml.safe_load((PROJECT_ROOT / "dvc.lock").read_text())
    assert set(d["dvc_lock"]) == set(lock["stages"])
    for stage, entry in lock["stages"].items():
        for dep in entry.get("deps") or []:
            assert d["dvc_lock"][stage]["deps"][dep["path"]] == dep.get("md5")
    assert d["restore"][0] == f"git checkout {commit}"
    assert any(c.startswith("dvc checkout") for c in d["restore"])
    assert any("dvc pull" in c for c in d["restore"])
    # the record travels with the model files too
    record = json.loads((Path(d["path"]) / bundle.RECORD_FILE).read_text())
    assert record["data"]["md5"] == data_md5 and record["tag"] == tag


def test_newest_model_is_champion_and_failures_never_replace_it(home, tmp_path):
    m1, e1, r1, _ = _evaluated(tmp_path, "one", seed=1)
    t1 = packaging.package(m1, e1, r1, project_root=PROJECT_ROOT)
    m2, e2, r2, _ = _evaluated(tmp_path, "two", seed=2)
    t2 = packaging.package(m2, e2, r2, project_root=PROJECT_ROOT)
    assert t2 != t1 and champions.champion()["tag"] == t2

    m3, e3, r3, _ = _evaluated(tmp_path, "failed", seed=3, passed=False)
    with pytest.raises(store.RegistryError, match="failed its gates.*binary.roc_auc"):
        packaging.package(m3, e3, r3, project_root=PROJECT_ROOT)
    assert champions.champion()["tag"] == t2

    # evaluated one model, packaging another: refused
    m4, e4, r4, _ = _evaluated(tmp_path, "mismatch", seed=4)
    write_model_dir(m4, seed=5)  # retrained after evaluation
    with pytest.raises(store.RegistryError, match="evaluated model md5"):
        packaging.package(m4, e4, r4, project_root=PROJECT_ROOT)
    (r1 / "gates.json").unlink()
    with pytest.raises(store.RegistryError, match="gates.json: gate verdict not found"):
        packaging.package(m1, e1, r1, project_root=PROJECT_ROOT)
    assert champions.champion()["tag"] == t2
    assert len(store.models()) == 2


def test_export_without_champion_removes_destination(home, tmp_path):
    dest = tmp_path / "champion"
    dest.mkdir()
    (dest / "model.pt").write_bytes(b"stale")
    assert history.export_champion(dest) is None
    assert not dest.exists()


@pytest.mark.parametrize("tag", ["lesionflow-classifier:doesnotexist", "nosuchbento:v1", "nosuchbento", "Not A Tag!"])
def test_describe_unknown_tag_fails_clearly(home, tmp_path, tag):
    m, e, r, _ = _evaluated(tmp_path, "a")
    known = packaging.package(m, e, r, project_root=PROJECT_ROOT)
    with pytest.raises(store.RegistryError) as err:
        trace.describe(tag)
    msg = str(err.value)
    assert repr(tag) in msg
    assert known in msg  # tells what is known instead


def test_build_bento_offline_pins_champion_with_dockerfile(home, tmp_path):
    with pytest.raises(store.RegistryError, match="no champion"):
        bentos.build_bento(PROJECT_ROOT)
    m, e, r, files = _evaluated(tmp_path, "a")
    tag = packaging.package(m, e, r, project_root=PROJECT_ROOT)
    bento = bentos.build_bento(PROJECT_ROOT)
    assert bento.startswith(f"{store.BENTO_NAME}:")
    dockerfile = bentos.bento_dockerfile(bento)
    assert dockerfile.exists() and "requirements.txt" in dockerfile.read_text()
    manifest = yaml.safe_load((dockerfile.parents[2] / "bento.yaml").read_text())
    assert manifest["args"]["model_tag"] == tag
    assert [m["tag"] for s in manifest["services"] for m in s["models"]] == [tag]
    # the Bento ships exactly the modules the service imports, and its web page
    src = dockerfile.parents[2] / "src"
    shipped = sorted(str(f.relative_to(src)) for f in src.rglob("*.py"))
    assert shipped == [f for f in codemap.bento_include(PROJECT_ROOT) if f.endswith(".py")]
    assert (src / "pipeline" / "serving" / "web" / "index.html").exists()
    d = trace.describe(bento)
    assert d["bento_tag"] == bento and d["tag"] == tag
    assert d["data_md5"] == lineage.data_version(PROJECT_ROOT / "data.dvc")["md5"]
    assert d["model_md5"] == files["model_md5"]


def test_package_outside_a_repo_with_null_values(home, tmp_path, monkeypatch):
    """A project root without git or data.dvc, and a dvc.lock entry without md5 (null): packaged,
    and describe() says so instead of failing."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    (root / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: python -m pipeline.stages.train\n"
        "    deps:\n    - path: artifacts/splits\n      md5:\n"
    )
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv("LESIONFLOW_GIT_COMMIT", raising=False)
    monkeypatch.delenv("LESIONFLOW_DATA_MD5", raising=False)
    m, e, r, _ = _evaluated(tmp_path, "a")
    tag = packaging.package(m, e, r, project_root=root)
    d = trace.describe(tag)
    assert d["dvc_lock"] == {
        "train": {"cmd": "python -m pipeline.stages.train", "deps": {"artifacts/splits": None}, "outs": {}}
    }
    assert d["git_commit"] == "unknown" and d["data_md5"] == "unknown"
    assert any("no git commit" in n for n in d["notes"])


def test_git_state_a_rewritten_dvc_lock_is_not_dirty_code(tmp_path):
    """A run rewrites dvc.lock before packaging: the code still is the commit's (not dirty), and
    the rewrite is recorded; any other modified tracked file makes the package dirty, named."""
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / "dvc.lock").write_text("schema: '2.0'\n")
    (repo / "train.py").write_text("x = 1\n")
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=repo, check=True)
    assert lineage.git_state(repo)["dirty"] is False
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    state = lineage.git_state(repo)
    assert state["dirty"] is False and state["run_records_modified"] == ["dvc.lock"] and state["modified"] == []
    (repo / "train.py").write_text("x = 2\n")
    state = lineage.git_state(repo)
    assert state["dirty"] is True and state["modified"] == ["train.py"]
    assert len(state["commit"]) == 40


def test_rollback_makes_an_earlier_model_champion_until_a_newer_one_is_packaged(home, tmp_path):
    with pytest.raises(store.RegistryError, match="no earlier champion"):
        history.rollback(None, "nothing yet")
    first = packaging.package(*_evaluated(tmp_path, "a", seed=1)[:3], project_root=PROJECT_ROOT)
    second = packaging.package(*_evaluated(tmp_path, "b", seed=2)[:3], project_root=PROJECT_ROOT)
    assert champions.champion()["tag"] == second and history.previous_champion() == first
    with pytest.raises(store.RegistryError, match="reason"):
        history.rollback(None, "  ")
    with pytest.raises(store.RegistryError, match="unknown tag"):
        history.rollback("lesionflow-classifier:nosuchversion", "typo")
    event = history.rollback(None, "melanoma sensitivity fell at site B")
    assert (event["tag"], event["from"]) == (first, second) and champions.champion()["tag"] == first
    with pytest.raises(store.RegistryError, match="already the champion"):
        history.rollback(first, "again")
    # the exported champion (what the flow's regression gates compare with) is the restored one
    assert history.export_champion(tmp_path / "champ") == first
    third = packaging.package(*_evaluated(tmp_path, "c", seed=3)[:3], project_root=PROJECT_ROOT)
    assert champions.champion()["tag"] == third  # packaging after a rollback makes a champion as usual
    rows = history.history()
    assert [(r["event"], r["tag"]) for r in rows] == [
        ("packaged", first), ("packaged", second), ("rollback", first), ("packaged", third)
    ]  # fmt: skip
    assert rows[2]["reason"] == "melanoma sensitivity fell at site B" and rows[2]["by"] == history.who()
    assert [r["current"] for r in rows] == [False, False, False, True]
    assert all(r["data_md5"] == lineage.data_version(PROJECT_ROOT / "data.dvc")["md5"] for r in rows)
    # the record survives a new process: it lives in the store's home
    assert json.loads(champions.history_file().read_text().splitlines()[0])["tag"] == first


def test_a_packaged_model_carries_its_schema_and_is_refused_when_altered(home, tmp_path):
    """metadata.json (pipeline.model.bundle) says what the model takes and gives and lists every
    file with its sha256; loading a packaged model checks it and names the first file that differs.
    An unpackaged model (the train stage's folder) has none and loads as before."""
    model, ev, rep, files = _evaluated(tmp_path, "a", threshold=0.27)
    tag = packaging.package(model, ev, rep, project_root=PROJECT_ROOT)
    stored = Path(champions.champion()["path"])
    doc = json.loads((stored / bundle.METADATA_FILE).read_text())
    assert doc["schema"] == bundle.SCHEMA and doc["tag"] == tag and doc["model_md5"] == files["model_md5"]
    config = json.loads((model / bundle.CONFIG_FILE).read_text())
    assert doc["inputs"]["image"]["input_size"] == config["preprocessing"]["input_size"]
    assert doc["inputs"]["image"]["normalisation"]["mean"] == config["preprocessing"]["mean"]
    assert doc["outputs"]["classes"] == config["classes"] and doc["outputs"]["taxonomy"] == config["taxonomy"]
    assert doc["outputs"]["decision"] == {"threshold": 0.27, "rule": "malignant if p(malignant) >= threshold"}
    assert doc["lineage"]["data_md5"] == lineage.data_version(PROJECT_ROOT / "data.dvc")["md5"]
    on_disk = sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file())
    ours = [f for f in on_disk if f not in (bundle.METADATA_FILE, "model.yaml")]  # model.yaml: BentoML's own record
    assert sorted(doc["files"]) == ours and {bundle.MODEL_FILE, bundle.OPERATING_POINT_FILE} <= set(ours)
    assert doc["files"][bundle.MODEL_FILE]["sha256"] == bundle.sha256(stored / bundle.MODEL_FILE)
    assert bundle.verify(stored) == doc and bundle.verify(model) is None
    inference.load_model(stored, device="cpu")
    op = json.loads((stored / bundle.OPERATING_POINT_FILE).read_text())
    (stored / bundle.OPERATING_POINT_FILE).write_text(json.dumps({**op, "threshold": 0.01}))  # same name, new bytes
    with pytest.raises(bundle.ModelLoadError, match=f"{bundle.OPERATING_POINT_FILE}: differs from the file packaged"):
        inference.load_model(stored, device="cpu")
    (stored / bundle.OPERATING_POINT_FILE).unlink()
    with pytest.raises(
        bundle.ModelLoadError, match=f"{bundle.OPERATING_POINT_FILE}: listed in metadata.json but missing"
    ):
        inference.load_model(stored, device="cpu")
