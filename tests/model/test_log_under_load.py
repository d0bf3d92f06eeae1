"""The inference log under load, on a real service: every answer a client received has its record,
beyond the statistics queue's cap and after a SIGKILL of the whole service in the middle of it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from pipeline.monitoring import inferencelog
from tests.registry_fixtures import write_model_dir
from tests.service_fixtures import GROUPS, real_images, serving

CLIENTS = 8


def _hammer(base: str, blobs: list[bytes], stop: threading.Event, got: list[str], limit: int) -> None:
    """One client: POST /classify until ``stop``; the request ids of its 200 answers go to ``got``."""
    with httpx.Client(timeout=30) as client:
        k = 0
        while not stop.is_set():
            try:
                r = client.post(f"{base}/classify", files={"image": ("x.jpg", blobs[k % len(blobs)])})
            except httpx.HTTPError:  # the service was killed under us
                return
            k += 1
            if r.status_code == 200:
                got.append(r.json()["request_id"])
                if len(got) >= limit:
                    stop.set()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("model") / "model")


def test_beyond_the_statistics_queue_every_answer_has_its_record(model, tmp_path):
    """A statistics queue of a few KB and no disk backlog (both full at once under 8 clients):
    statistics are skipped and counted, no answer record is missing, and the reader's coverage says
    what it holds. (The disk backlog that normally takes the overflow: tests/code/test_statistics_backlog.py.)"""
    blobs = [p.read_bytes() for p in real_images(12)]
    caps = {"LESIONFLOW_LOG_QUEUE_MB": "0.2", "LESIONFLOW_LOG_BACKLOG_MB": "0"}
    with serving(model, tmp_path, env_extra=caps) as (base, _, _):
        got: list[str] = []
        stop = threading.Event()
        with ThreadPoolExecutor(CLIENTS) as pool:
            for _ in range(CLIENTS):
                pool.submit(_hammer, base, blobs, stop, got, 300)
        counts = httpx.get(f"{base}/model", timeout=30).json()["inference_log"]
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
    written = [
        ln for ln in metrics.splitlines() if ln.startswith('lesionflow_inference_log_records_total{state="written"}')
    ]
    assert written and float(written[0].split()[-1]) >= len(got), "counted on /metrics"
    df = inferencelog.read(tmp_path / "inference-log")
    assert set(got) <= set(df["request_id"]), f"{len(set(got) - set(df['request_id']))} answers without a record"
    assert counts["dropped"] == counts["failed"] == 0
    assert counts["statistics_dropped"] > 0, "the queue's cap was reached"
    assert df["has_statistics"].sum() + counts["statistics_dropped"] + counts["statistics_failed"] >= len(got)
    cov = df.attrs["coverage"]
    assert cov["answered"] == cov["records"] == len(df) and cov["statistics_dropped"] == counts["statistics_dropped"]


def test_sigkill_under_load_loses_no_answer_a_client_received(model, tmp_path):
    """SIGKILL of the service's whole process group (an OOM kill, a node lost) after 200 answers under
    load: every one of those 200 has its answer record (written before the answer was sent)."""
    blobs = [p.read_bytes() for p in real_images(12)]
    with serving(model, tmp_path) as (base, _, _):
        got: list[str] = []
        stop = threading.Event()
        with ThreadPoolExecutor(CLIENTS) as pool:
            for _ in range(CLIENTS):
                pool.submit(_hammer, base, blobs, stop, got, 200)
            while not stop.wait(0.01):
                pass
            # while the other clients' requests are in flight; BentoML starts its worker (and that
            # its log writer) outside the server's group, and a lost node loses those too
            lost = psutil.Process(GROUPS[base]).children(recursive=True)
            os.killpg(GROUPS[base], signal.SIGKILL)
            for proc in lost:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
        time.sleep(0.5)
    answered = got[:200]
    df = inferencelog.read(tmp_path / "inference-log")
    missing = set(answered) - set(df["request_id"])
    assert not missing, f"{len(missing)} of the 200 answers have no record"
