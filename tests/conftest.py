"""Shared fixtures. Tests are split by what they guard (Made-With-ML):

* ``tests/code``  - units of code on small synthetic fixtures;
* ``tests/data``  - the real data and data-handling stages (contract, split);
* ``tests/model`` - model behaviour (training, inference, metrics);
* ``tests/e2e``   - the real flow end to end on a tiny sample.

The real data (``data/``, pulled by ``make test``) must be present: tests that need it fail, not
skip, when it is missing.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = PROJECT_ROOT / "data"
METADATA_CSV = DATA_DIR / "HAM10000_metadata.csv"
IMAGES_DIR = DATA_DIR / "images"

# Never touch the user's (or the project's) Prefect, BentoML or DVC state from a test: the session
# gets its own homes in a temporary folder, set before any test module imports Prefect or BentoML
# (an exported BENTOML_HOME of the developer's shell is overridden too), removed at the end.
# Temporary and cache files of the tools too (torchrun's rendezvous folders, Dask's scratch space,
# TorchInductor's cache, Matplotlib's font cache, Chromium's profile), so that a test run leaves
# nothing behind in ~ or /tmp (pytest's own basetemp stays where pytest keeps it).
# The temp folder of the shell that ran pytest, resolved before TMPDIR is changed below; a
# pytest-xdist worker (which inherits the controller's TMPDIR) makes its home beside the
# controller's, not inside it (Chromium's socket path has a length limit).
_BASE_TMP = os.environ.setdefault("LESIONFLOW_TESTS_BASE_TMPDIR", tempfile.gettempdir())
tempfile.tempdir = _BASE_TMP  # this process's temp folder (its subprocesses get TMPDIR below)
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="lesionflow-tests-"))
for _sub in ("tmp", "cache", "config"):
    (_SESSION_HOME / _sub).mkdir()
os.environ.update(
    PREFECT_HOME=str(_SESSION_HOME / "prefect"),
    BENTOML_HOME=str(_SESSION_HOME / "bentoml"),
    DVC_SITE_CACHE_DIR=str(_SESSION_HOME / "dvc-site-cache"),
    DVC_NO_ANALYTICS="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
    BENTOML_DO_NOT_TRACK="true",
    TMPDIR=str(_SESSION_HOME / "tmp"),  # subprocesses (this process keeps its tempfile.tempdir)
    DASK_TEMPORARY_DIRECTORY=str(_SESSION_HOME / "tmp"),
    TORCHINDUCTOR_CACHE_DIR=str(_SESSION_HOME / "cache" / "torchinductor"),
    MPLCONFIGDIR=str(_SESSION_HOME / "config" / "matplotlib"),
    XDG_CACHE_HOME=str(_SESSION_HOME / "cache"),
    XDG_CONFIG_HOME=str(_SESSION_HOME / "config"),
)
os.environ.pop("LESIONFLOW_MODEL_TAG", None)
os.environ.pop("LESIONFLOW_INFERENCE_LOG", None)


def pytest_sessionfinish(session, exitstatus) -> None:
    # A flow run in this process (flows/predict.py's test) starts Prefect's temporary API server,
    # which Prefect stops at interpreter exit with an INFO line to a console pytest has closed by
    # then ("--- Logging error --- ValueError: I/O operation on closed file"). Stop it now, quietly.
    server = sys.modules.get("prefect.server.api.server")
    if server is None:
        return
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # the flow's logs, while the server still listens
    logging.getLogger("prefect").setLevel(logging.WARNING)
    for instance in list(server.SubprocessASGIServer._instances.values()):
        instance.stop()


# The end-to-end modules that go on from the shared first run of tests/e2e/conftest.py (checked
# at collection): under pytest-xdist they run on one worker, so that the run is made once.
SHARED_FIRST_RUN = (
    "tests/e2e/test_audit.py",
    "tests/e2e/test_ingest.py",
    "tests/e2e/test_label_loop.py",
    "tests/e2e/test_retrain_flow.py",
    "tests/e2e/test_scale_out.py",
    "tests/e2e/test_stop.py",
)


def _xdist_scope(nodeid: str) -> str:
    """The share of the suite one pytest-xdist worker runs whole: the modules of
    :data:`SHARED_FIRST_RUN` together, every other module by itself (its module-scoped servers and
    workspaces)."""
    path = nodeid.split("::", 1)[0]
    return "shared first run" if path in SHARED_FIRST_RUN else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``make test`` runs two workers; each takes whole :func:`_xdist_scope` shares, in collection
    order (xdist's own ``loadgroup`` marks do not reach its scheduler under pytest 9.2)."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # xdist would order the shares by their number of tests

    class Scopes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_scope(nodeid)

    return Scopes(config, log)


def pytest_collection_modifyitems(config, items) -> None:
    """Every test on the shared first run is in a module of :data:`SHARED_FIRST_RUN`; under
    pytest-xdist those, the longest share, come first, so that the other worker runs the rest
    meanwhile."""
    on_it = {i.nodeid.split("::", 1)[0] for i in items if "first_run" in getattr(i, "fixturenames", ())}
    strays = sorted(m for m in on_it - set(SHARED_FIRST_RUN) if m.startswith("tests/e2e/"))
    if strays:
        raise pytest.UsageError(f"{', '.join(strays)}: uses first_run; add it to SHARED_FIRST_RUN in {__file__}")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: _xdist_scope(item.nodeid) != "shared first run")


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


def _require_real_data() -> None:
    if not METADATA_CSV.exists() or not IMAGES_DIR.is_dir():
        pytest.fail(f"real data missing under {DATA_DIR}: run `make test` (it pulls data with DVC)")


@pytest.fixture(scope="session")
def real_metadata() -> pd.DataFrame:
    """HAM10000's full metadata table."""
    _require_real_data()
    return pd.read_csv(METADATA_CSV)


def copy_sample(dest: Path, per_class: int, seed: int = 0, whole_lesions: bool = True) -> Path:
    """Copy a small real sample (``per_class`` lesions per diagnosis, all their images when
    ``whole_lesions``) into ``dest/data/{HAM10000_metadata.csv,images/}``; returns ``dest/data``."""
    _require_real_data()
    meta = pd.read_csv(METADATA_CSV)
    lesions = meta.drop_duplicates("lesion_id")
    picked = pd.concat(
        g.sample(min(per_class, len(g)), random_state=seed) for _, g in lesions.groupby("dx", sort=True)
    )["lesion_id"]
    rows = meta[meta["lesion_id"].isin(set(picked))]
    if not whole_lesions:
        rows = rows.drop_duplicates("lesion_id")
    rows = rows.sort_values("image_id").reset_index(drop=True)
    out = dest / "data"
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows.to_csv(out / "HAM10000_metadata.csv", index=False)
    for image_id in rows["image_id"]:
        shutil.copyfile(IMAGES_DIR / f"{image_id}.jpg", out / "images" / f"{image_id}.jpg")
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny real sample: 6 lesions per diagnosis with all their images (about 60 images)."""
    return copy_sample(tmp_path_factory.mktemp("tiny"), per_class=6)


def project_env(root: Path) -> dict[str, str]:
    """Environment for running the pipeline's CLIs (dvc, python -m pipeline.*) in a temporary
    project: the project's interpreter first on PATH, tools kept offline and out of $HOME."""
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(root / ".dvc-site-cache"),
        PREFECT_HOME=str(root / ".prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        BENTOML_HOME=str(root / ".bentoml"),
        BENTOML_DO_NOT_TRACK="true",
        GIT_AUTHOR_NAME="lesionflow-tests",
        GIT_AUTHOR_EMAIL="tests@lesionflow.invalid",
        GIT_COMMITTER_NAME="lesionflow-tests",
        GIT_COMMITTER_EMAIL="tests@lesionflow.invalid",
    )
    env.pop("PYTHONPATH", None)
    return env


def plain_env(home: Path, **extra: str) -> dict[str, str]:
    """What a new user's non-interactive shell has: ``PATH`` (without this interpreter's venv, so
    nothing can rely on an activated venv) and ``HOME``; plus ``extra``."""
    import sys

    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p and p != venv_bin)
    return {"PATH": path or os.defpath, "HOME": str(home), **extra}


def make_project(root: Path, data_dir: Path, params_overrides: dict | None = None) -> Path:
    """A throw-away lesionflow workspace at ``root``: the project's code, params and pipeline,
    ``data_dir`` copied to ``root/data`` and tracked by DVC (own cache), all committed to git."""
    import subprocess

    import yaml

    root.mkdir(parents=True, exist_ok=True)
    for name in ("pipeline", "flows", "labels"):
        shutil.copytree(PROJECT_ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", "bentofile.yaml", "prefect.yaml"):
        if (PROJECT_ROOT / name).exists():
            shutil.copyfile(PROJECT_ROOT / name, root / name)
    if params_overrides:
        data = yaml.safe_load((root / "params.yaml").read_text())
        for dotted, value in params_overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    shutil.copytree(data_dir, root / "data")
    (root / ".gitignore").write_text(
        "/artifacts/\n/reports/\n/.dvc-site-cache/\n/.prefect/\n/.bentoml/\n/.lesionflow/\n__pycache__/\n"
    )
    env = project_env(root)
    run = lambda *cmd: subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q", "-b", "main")
    run("dvc", "init", "-q")
    run("dvc", "config", "core.analytics", "false")
    run("dvc", "add", "-q", "data")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "test workspace")
    return root
