"""The inference log on object storage: two replicas of the service write to one bucket of a local
S3-compatible server (moto, on 127.0.0.1), each its own objects; the monitor reads every record of
both, in time order, none lost or duplicated."""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pandas as pd
import pytest

from pipeline.monitoring import inferencelog
from tests.registry_fixtures import write_model_dir
from tests.s3_fixtures import BUCKET, s3_server
from tests.service_fixtures import real_images, serving

pytestmark = pytest.mark.e2e


def test_two_replicas_log_to_one_bucket_and_the_monitor_reads_every_record(tmp_path):
    with s3_server(tmp_path / "moto.log") as s3:
        log_url = f"s3://{BUCKET}/lesionflow/inference"
        env = {**s3, "LESIONFLOW_INFERENCE_LOG": log_url, "LESIONFLOW_LOG_ROLL_RECORDS": "4"}
        env["LESIONFLOW_LOG_ROLL_SECONDS"] = "1"
        model = write_model_dir(tmp_path / "model")
        images = real_images(12)
        with contextlib.ExitStack() as stack:
            replicas = []
            for i in (0, 1):
                (tmp_path / f"replica{i}").mkdir()
                own = {**env, "LESIONFLOW_LOG_SPOOL": str(tmp_path / f"replica{i}" / "spool")}  # its emptyDir
                replicas.append(stack.enter_context(serving(model, tmp_path / f"replica{i}", env_extra=own)))

            def classify(k: int) -> int:
                data = images[k % len(images)].read_bytes()
                r = httpx.post(f"{replicas[k % 2][0]}/classify", files={"image": ("x.jpg", data)}, timeout=60)
                assert r.status_code == 200, r.text
                return r.status_code

            with ThreadPoolExecutor(8) as pool:  # under load: the writers' statistics fall behind
                answered = list(pool.map(classify, range(160)))
        # both services stopped (SIGTERM): every buffered record was put as an object at exit
        old = {k: os.environ.get(k) for k in s3}
        os.environ.update(s3)
        try:
            df = inferencelog.read(log_url)
            import fsspec

            fs, root = fsspec.core.url_to_fs(log_url, skip_instance_cache=True)
            objects = [o for day in fs.ls(root) for o in fs.ls(day)]
            written = {o: [json.loads(line) for line in fs.cat_file(o).decode().splitlines()] for o in objects}
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    if len(df) != len(answered):  # say which replica lost what, and what its service logged about it
        per_writer = {w: sum(1 for o in objects if w in o) for w in {o.rsplit("-", 1)[0] for o in objects}}
        said = [
            line
            for i in (0, 1)
            for line in (tmp_path / f"replica{i}" / "serve.log").read_text().splitlines()
            if "inference log" in line or "Traceback" in line or "cleanup hook" in line
        ]
        pytest.fail(
            f"{len(df)} records read back of {len(answered)} answered; objects per writer {per_writer}\n"
            + "\n".join(said)
        )
    assert df["request_id"].is_unique, "no record twice"
    for name, records in written.items():  # as written, not as a reader sorts: each segment in time order
        answers = [r["timestamp"] for r in records if r.get("kind") == "answer"]
        assert answers == sorted(answers), f"{name}: answer records out of order"
    cov = df.attrs["coverage"]
    assert cov["answered"] == cov["records"] == len(answered) and cov["dropped"] == cov["failed"] == 0
    assert not list(tmp_path.glob("replica*/spool/**/*.jsonl*")), "every spooled segment was put"
    writers = {o.rsplit("/", 1)[-1].rsplit("-", 1)[0] for o in objects}
    # each process writes its own objects: per replica its worker (answers) and its log writer (statistics)
    assert len(writers) == 4, f"each process writes its own objects: {sorted(writers)}"
    assert all(o.endswith(".jsonl") and "/inference-" in o for o in objects)
    assert set(df["model_tag"]) and pd.api.types.is_datetime64_any_dtype(df["timestamp"])
