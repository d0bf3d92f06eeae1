"""Bentos: building the Bento of ``bentofile.yaml`` around the champion (offline), finding the
newest one and its Dockerfile, and the command that serves one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.registry.champions import champion
from pipeline.registry.store import BENTO_NAME, RegistryError, bentoml_home, get_bento
from pipeline.registry.trace import describe

BUILD_TIMEOUT_S = 900
#: The service's import path (``service:`` in bentofile.yaml).
SERVICE = "pipeline.serving.service:LesionflowService"


def serve_command(target: str = SERVICE, host: str = "127.0.0.1", port: int = 3000) -> list[str]:
    """``bentoml serve`` of a Bento tag or of the project's service, with this interpreter."""
    return [sys.executable, "-m", "bentoml", "serve", target, "--host", host, "--port", str(port)]


def latest_bento() -> str | None:
    """Tag of the newest lesionflow Bento, or None when none is built."""
    try:
        return describe(f"{BENTO_NAME}:latest").get("bento_tag")
    except RegistryError:
        return None


def latest_bento_model() -> str | None:
    """The model tag inside the newest lesionflow Bento (None when no Bento is built)."""
    try:
        return describe(f"{BENTO_NAME}:latest")["tag"]
    except RegistryError:
        return None


def _build_command(champ: dict, root: Path) -> list[str]:
    """``bentoml build`` of bentofile.yaml pinning the champion, labelled with its lineage."""
    labels = champ["labels"]
    return [sys.executable, "-m", "bentoml", "build", "-f", "bentofile.yaml", "-o", "tag",
            "--arg", f"model_tag={champ['tag']}",
            "--label", f"model_tag={champ['tag'].replace(':', '.')}",
            "--label", f"data_md5={labels.get('data_md5', 'unknown')}",
            "--label", f"git_commit={labels.get('git_commit', 'unknown')}",
            str(root)]  # fmt: skip


def _run_build(champ: dict, root: Path) -> str:
    """Run ``bentoml build``; the tag it printed, or :class:`RegistryError` with its output's tail."""
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home()),
        "BENTOML_DO_NOT_TRACK": "true",
        "LESIONFLOW_MODEL_TAG": champ["tag"],
    }
    try:
        proc = subprocess.run(
            _build_command(champ, root), cwd=root, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise RegistryError(f"bentoml build did not finish within {BUILD_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RegistryError(f"bentoml build failed (exit {proc.returncode}):\n{tail}")
    tags = [ln.split("__tag__:", 1)[1].strip() for ln in proc.stdout.splitlines() if "__tag__:" in ln]
    if not tags:
        raise RegistryError(f"bentoml build printed no tag:\n{proc.stdout[-2000:]}")
    return tags[-1]


def build_bento(project_root: Path = Path(".")) -> str:
    """Build a Bento of ``bentofile.yaml`` serving the champion (pinned by tag); return its tag.

    Runs ``bentoml build`` in a subprocess (offline: ``python.lock_packages: false``; the model
    store is ``$BENTOML_HOME``). The built Bento holds its generated Dockerfile under
    ``env/docker/``. Raises :class:`RegistryError` without a champion or when the build fails.
    """
    root = Path(project_root).resolve()
    champ = champion()
    if champ is None:
        raise RegistryError(f"no champion in the BentoML store at {bentoml_home()}: package a model first")
    if not (root / "bentofile.yaml").exists():
        raise RegistryError(f"{root / 'bentofile.yaml'}: not found")
    tag = _run_build(champ, root)
    if not bento_dockerfile(tag).exists():
        raise RegistryError(f"bento {tag}: no generated Dockerfile under {get_bento(tag).path}/env/docker")
    return tag


def bento_dockerfile(tag: str) -> Path:
    """Path of the generated Dockerfile inside a built Bento."""
    return Path(get_bento(tag).path) / "env" / "docker" / "Dockerfile"
