"""A local S3-compatible server (moto's server mode, as DVC's own test suite uses) on 127.0.0.1,
started and stopped by pid, with a bucket and the ``AWS_*`` environment that DVC (dvc-s3), s3fs and
boto3 read."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

BUCKET = "lesionflow-test"
#: The process group of each running server, by its endpoint URL (to stop it for a while: SIGSTOP).
PIDS: dict[str, int] = {}


@contextlib.contextmanager
def s3_server(log: Path, port: int | None = None) -> Iterator[dict[str, str]]:
    """Yields the environment (``AWS_ENDPOINT_URL`` and test credentials) of a running server that
    holds an empty bucket :data:`BUCKET`; on ``port`` when given (a store that comes back where it was)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": url,
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start:\n{log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=url, **_credentials(env)).create_bucket(Bucket=BUCKET)
        PIDS[url] = proc.pid
        yield env
    finally:
        PIDS.pop(url, None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a stopped server must be able to end
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        out.close()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _credentials(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }
