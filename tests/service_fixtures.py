"""A real `bentoml serve` of pipeline.serving.service on 127.0.0.1 around a packaged test model (a
temporary BENTOML_HOME), started and stopped by pid; shared by the service, web-page and API
contract tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.model import bundle, sites
from pipeline.registry import bento as bentos
from pipeline.registry import package as packaging
from tests.registry_fixtures import PROJECT_ROOT, write_evaluation

IMAGES_DIR = PROJECT_ROOT / "data" / "images"
MAX_BYTES = 1_000_000  # the servers' LESIONFLOW_MAX_IMAGE_BYTES
THRESHOLD = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_images(n: int) -> list[Path]:
    found = sorted(IMAGES_DIR.glob("ISIC_*.jpg"))[:n]
    if len(found) < n:
        pytest.fail(f"real data missing under {IMAGES_DIR}: run `make test` (it pulls data with DVC)")
    return found


def package(model_dir: Path, tmp: Path, home: Path) -> str:
    """Evaluate-stage files for ``model_dir`` (passing gates, THRESHOLD) and package it into ``home``."""
    write_evaluation(model_dir, tmp / "evaluate", tmp / "reports", threshold=THRESHOLD)
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)
    try:
        return packaging.package(model_dir, tmp / "evaluate", tmp / "reports", project_root=PROJECT_ROOT)
    finally:
        if old is None:
            os.environ.pop("BENTOML_HOME", None)
        else:
            os.environ["BENTOML_HOME"] = old


@contextlib.contextmanager
def serving(
    model_dir: Path,
    tmp: Path,
    retrieval_dir: Path | None = None,
    env_extra: dict[str, str] | None = None,
    site_records: list[dict] = (),
) -> Iterator[tuple[str, str, Path]]:
    """(base URL, packaged tag, model dir) of a running service of the packaged ``model_dir``
    (with the retrieval index ``retrieval_dir`` stored beside it, as packaging does; ``env_extra``:
    more environment for the service, e.g. where its inference log goes; ``site_records``: sites
    recorded with the stored model, as ``lesionflow site add`` does, their ``model_md5`` filled in)."""
    home = tmp / "bentoml"
    tag = package(model_dir, tmp, home)
    stored = home / "models" / tag.replace(":", "/")
    if retrieval_dir is not None:
        shutil.copytree(retrieval_dir, stored / bundle.RETRIEVAL_DIR)
    for record in site_records:
        sites.write(stored, {**record, "model_md5": bundle.model_md5(stored)})
    port = free_port()
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        "LESIONFLOW_MAX_IMAGE_BYTES": str(MAX_BYTES),
        "LESIONFLOW_THREADS": "1",
        "LESIONFLOW_INFERENCE_LOG": str(tmp / "inference-log"),
        "LESIONFLOW_AUTH": "off",  # reachable from this machine only; the auth tests pass tokens in env_extra
        **(env_extra or {}),
    }
    env.pop("LESIONFLOW_MODEL_TAG", None)
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(
        bentos.serve_command(port=port),
        cwd=PROJECT_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    GROUPS[base] = proc.pid
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{(tmp / 'serve.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after 90 s:\n{(tmp / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield base, tag, model_dir
    finally:
        stop_group(proc)
        log.close()


#: The pid of each running server (by its base URL).
GROUPS: dict[str, int] = {}


#: The API token of each running server that requires one (by base URL), set by its fixture. Here,
#: not in a conftest (which pytest may import as a module of its own, with a dict of its own).
TOKENS: dict[str, str] = {}


def token_for(base: str) -> str:
    """The API token of the running server at ``base``."""
    return TOKENS[base]


def server_processes(base: str) -> dict[str, list[int]]:
    """The live processes of the server at ``base`` by role (:func:`process_roles`)."""
    return process_roles(GROUPS[base])


#: What a process's command line holds, and its role (the first that matches; else ``server``).
ROLE_MARKS = (("logworker", "writer"), ("_bentoml_impl.worker", "worker"), ("from multiprocessing", "gradcam"))


def process_roles(pid: int) -> dict[str, list[int]]:
    """The live processes of the server started as ``pid`` by role: the model ``worker``
    (``_bentoml_impl.worker.service``), the inference log's ``writer``, the ``gradcam`` process
    (:mod:`pipeline.serving.explainer`, with the resource tracker ``multiprocessing`` starts beside
    it) and BentoML's ``server`` (its arbiter): the server process and all its descendants."""
    import psutil

    roles: dict[str, list[int]] = {"worker": [], "writer": [], "gradcam": [], "server": []}
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(p.cmdline())
            roles[next((role for mark, role in ROLE_MARKS if mark in cmd), "server")].append(p.pid)
    return roles


def _group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``, from /proc (Linux)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(stat.parent.name))
    return members


def stop_group(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """Stop a server started with ``start_new_session`` as an orchestrator stops a container:
    SIGTERM to its process group, then wait up to ``grace`` seconds until every process of the
    group has ended (the service's inference-log writers end after the service's workers), and
    SIGKILL what is left."""
    deadline = time.monotonic() + grace
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
