"""A built Bento started as BentoML users start one (``bentoml serve <bento tag>``, no lesionflow
command, no environment of ours but the tokens file an operator mounts, from an unrelated folder)
answers only with a token and writes its inference log where the params.yaml packaged with it says
(``monitor.log_url``). It ships the project's params.yaml only, never the project's stores (where
earlier Bentos and this very build lie)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import yaml

from pipeline.monitoring import inferencelog
from pipeline.registry import bento as bentos
from pipeline.serving import auth
from tests.registry_fixtures import PROJECT_ROOT, write_model_dir
from tests.service_fixtures import free_port, package, real_images, stop_group


def _project_copy(dest, log_url: str):
    """The project's code, bentofile.yaml and a params.yaml whose monitor.log_url is ``log_url``."""
    dest.mkdir()
    shutil.copytree(PROJECT_ROOT / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "bentofile.yaml", dest / "bentofile.yaml")
    doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    doc["monitor"]["log_url"] = log_url
    (dest / "params.yaml").write_text(yaml.safe_dump(doc))
    return dest


def test_a_bento_served_with_plain_bentoml_serve_logs_where_its_params_say(tmp_path, monkeypatch):
    project = _project_copy(tmp_path / "project", str(tmp_path / "audit-log"))
    home, log_dir = project / ".lesionflow" / "bentoml", tmp_path / "audit-log"  # the project's own store
    model_dir = write_model_dir(tmp_path / "model", backbone="small_cnn", input_size=(48, 64))
    tag = package(model_dir, tmp_path, home)
    monkeypatch.setenv("BENTOML_HOME", str(home))
    bentos.build_bento(project)
    bento = bentos.build_bento(project)  # a rebuild: the first Bento now lies in the project's own store
    src = bentos.bento_dockerfile(bento).parents[2] / "src"
    assert sorted(src.rglob("params.yaml")) == [src / "params.yaml"] and not (src / ".lesionflow").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    token = auth.add(tmp_path / "api-tokens", "operator")  # what an operator mounts (a Secret, in Kubernetes)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
           auth.TOKENS_ENV: str(tmp_path / "api-tokens")}  # fmt: skip
    port = free_port()
    with open(tmp_path / "serve.log", "w") as out:
        proc = subprocess.Popen(
            bentos.serve_command(bento, port=port), cwd=elsewhere, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
            while not _ready(base):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.3)
            image = real_images(1)[0]
            files = {"image": (image.name, image.read_bytes(), "image/jpeg")}
            assert httpx.post(f"{base}/classify", files=files).status_code == 401  # no token, no answer
            r = httpx.post(f"{base}/classify", files=files, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200 and r.json()["model_tag"] == tag, r.text
        finally:
            stop_group(proc)
    records = inferencelog.read(log_dir)
    assert len(records) == 1 and records["model_tag"][0] == tag, (tmp_path / "serve.log").read_text()[-3000:]
    assert not (elsewhere / "logs").exists()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
