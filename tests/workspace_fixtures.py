"""Tiny throw-away lesionflow workspaces for the end-to-end tests, and the tools to drive them:
``lesionflow`` from a plain shell, a Prefect server on 127.0.0.1, a data version with a batch of
lesions held back for ingestion, and a copy of a workspace that still works where it lands (git,
DVC cache, stage outputs, BentoML store: everything lives inside the workspace folder)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import plain_env, project_env

STAGES = ["validate", "split", "eda", "train", "retrieval", "review", "reference", "evaluate"]
# tiny training and evaluation; gates every model passes (dx.accuracy is always computed)
TINY = {
    "train.backbone": "small_cnn",
    "train.pretrained": False,
    "train.epochs": 1,
    "train.input_size": [32, 40],
    "train.warmup_epochs": 0.0,
    "train.batch_size": 16,
    "train.tta": False,
    "evaluate.bootstrap": 0,
    "evaluate.gradcam_per_class": 0,
    "evaluate.gates": {
        "absolute": {"dx.accuracy": 0.0},
        "regression_margin": {"dx.accuracy": 1.0},
        "lower_is_better": [],
    },
    "eda.permutation_repeats": 1,
    "eda.grid_per_class": 1,
}


def lesionflow(root: Path, *args: str, api_url: str | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """``lesionflow ARGS`` in the workspace (its own copy of the code), stdout and stderr together,
    from a plain shell (PATH and HOME only: the CLI finds its stores under ``.lesionflow/`` and
    turns telemetry off itself; no COLUMNS: its output is not a terminal and must not wrap);
    against the Prefect server at ``api_url`` (else an ephemeral one, as ``make run``)."""
    home = root.parent / "home"
    home.mkdir(exist_ok=True)
    env = plain_env(home, DVC_SITE_CACHE_DIR=str(root / ".dvc-site-cache"))  # DVC's default: /var/tmp
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def prefect_server(root: Path, timeout: float = 180.0):
    """A Prefect server on 127.0.0.1 for the workspace (one start instead of an ephemeral server per
    run); yields its API URL and stops it (SIGTERM) afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root.parent / "prefect-server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        cwd=root,
        env=project_env(root),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prefect server did not start: {(root.parent / 'prefect-server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


HELD_BACK_PER_CLASS = 2


def split_off_batch(data: Path, dest: Path, per_class: int = HELD_BACK_PER_CLASS, seed: int = 1) -> pd.DataFrame:
    """Move ``per_class`` whole lesions per diagnosis out of ``data`` into ``dest/{batch.csv,
    images/}``; returns the batch's rows."""
    meta = pd.read_csv(data / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    lesions = meta.drop_duplicates("lesion_id").groupby("dx", sort=True).sample(per_class, random_state=seed)
    batch = meta[meta["lesion_id"].isin(set(lesions["lesion_id"]))]
    (dest / "images").mkdir(parents=True)
    for image_id in batch["image_id"]:
        shutil.move(data / "images" / f"{image_id}.jpg", dest / "images" / f"{image_id}.jpg")
    meta[~meta.index.isin(batch.index)].to_csv(data / "HAM10000_metadata.csv", index=False)
    batch.to_csv(dest / "batch.csv", index=False)
    return batch.reset_index(drop=True)


def copy_workspace(src: Path, dest: Path) -> Path:
    """A copy of the workspace ``src`` at ``dest`` (its git repository, DVC cache and stage
    outputs, stores and run records), as a user who copies a project folder has."""
    return Path(shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns(".dvc-site-cache")))
