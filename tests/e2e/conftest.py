"""The end-to-end tests' shared state: one Prefect server for their flow runs and one workspace
after its first retraining run, both made once for all of ``tests/e2e`` and stopped after its last
test. A test that changes a workspace works on its own copy of that first run (``snapshot``); only
the retraining-flow scenarios go on in the workspace that ran."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import copy_sample, make_project
from tests.workspace_fixtures import TINY, copy_workspace, lesionflow, prefect_server, split_off_batch


@pytest.fixture(scope="package")
def prefect_api(tmp_path_factory) -> Iterator[str]:
    """The API URL of a Prefect server on 127.0.0.1 (one start instead of an ephemeral server per run)."""
    with prefect_server(tmp_path_factory.mktemp("prefect-server")) as url:
        yield url


@pytest.fixture(scope="package")
def first_run(prefect_api, tmp_path_factory) -> dict:
    """Data version 1 (a real sample minus a held-back batch of whole lesions) in a workspace after
    its first ``lesionflow run`` against :func:`prefect_api`: every stage ran and the model was
    packaged. Keys: ``root`` (the workspace), ``proc`` (the run), ``snapshot`` (an untouched copy
    taken right after the run), ``batch_dir`` and ``batch`` (the held-back lesions, for ingestion)."""
    tmp = tmp_path_factory.mktemp("v1")
    data = copy_sample(tmp / "sample", per_class=7, seed=3)
    batch = split_off_batch(data, tmp / "batch")
    root = make_project(tmp / "ws", data, TINY)
    for key, value in (("user.name", "Data Steward"), ("user.email", "steward@lesionflow.invalid")):
        subprocess.run(["git", "config", key, value], cwd=root, check=True)  # as a user's git has
    proc = lesionflow(root, "run", "--retries", "0", api_url=prefect_api)
    snapshot = copy_workspace(root, tmp / "snapshot" / "ws")
    return {"root": root, "proc": proc, "snapshot": snapshot, "batch_dir": tmp / "batch", "batch": batch}
