"""A real Label Studio server for the labelling loop's end-to-end test: started from its own
environment (``.venv-labelstudio/``, ``make labelstudio``) on 127.0.0.1 with a copy of the
migrated SQLite template and its API token, stopped by pid. Without the environment the test
FAILS naming the make target (CI's ``make test`` builds it), it never skips."""

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

from tests.registry_fixtures import PROJECT_ROOT

LS_VENV = PROJECT_ROOT / ".venv-labelstudio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def labelstudio_server(tmp: Path, timeout: float = 180.0) -> Iterator[tuple[str, Path]]:
    """``(url, file of its API token)`` of a Label Studio server on 127.0.0.1 with its own data in
    ``tmp``."""
    exe, template = LS_VENV / "bin" / "label-studio", LS_VENV / "template"
    if not exe.exists() or not (template / "token").exists():
        pytest.fail(f"{LS_VENV}: no Label Studio environment; run `make labelstudio` (make test does)")
    data = tmp / "label-studio"
    shutil.copytree(template / "data", data)
    port = _free_port()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp), "LABEL_STUDIO_BASE_DATA_DIR": str(data)}
    log = open(tmp / "label-studio.log", "w")
    proc = subprocess.Popen(
        [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port), "--data-dir", str(data)],
        cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Label Studio did not start: {(tmp / 'label-studio.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, template / "token"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def label_in_studio(url: str, token_file: Path, config: Path, tasks: Path, truth, tmp: Path) -> list[dict]:
    """The export of the queue's ``tasks`` labelled in Label Studio as ``truth`` says
    (``tests/labelstudio_client.py``, run by Label Studio's own Python)."""
    import json

    truth[["image_id", "dx", "dx_type", "lesion_id"]].to_csv(tmp / "truth.csv", index=False)
    script = PROJECT_ROOT / "tests" / "labelstudio_client.py"
    args = [url, token_file, config, tasks, tmp / "truth.csv", tmp / "export.json"]
    res = subprocess.run([str(LS_VENV / "bin" / "python"), str(script), *map(str, args)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads((tmp / "export.json").read_text())
