"""The inference log on an object store that goes down and comes back: records wait in the local
spool, the uploads retry with backoff, and once the store is back every answer record and its
statistics are there; a writer killed with its segment open leaves nothing behind either."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from pipeline.core.images import decode_rgb
from pipeline.monitoring import inferencelog, logstore
from pipeline.monitoring.logrecord import Answer
from pipeline.serving.logqueue import BackgroundLog
from tests.conftest import IMAGES_DIR
from tests.s3_fixtures import BUCKET, free_port, s3_server


def _answer(rgb: np.ndarray, k: int) -> Answer:
    p = np.full(7, 0.1)
    p[k % 7] = 0.4
    probs = dict(zip(("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"), p.tolist()))
    return Answer(
        rgb, {"dx_probabilities": probs, "p_malignant": 0.3, "decision": "no_refer"}, "m", request_id=f"q{k:03d}"
    )


@pytest.fixture
def images(real_metadata):
    return [decode_rgb(IMAGES_DIR / f"{i}.jpg", i) for i in real_metadata["image_id"].iloc[:3]]


def test_object_store_down_for_a_while_loses_nothing(tmp_path, images, monkeypatch):
    port = free_port()
    url = f"s3://{BUCKET}/outage"
    monkeypatch.setenv(logstore.SPOOL_ENV, str(tmp_path / "spool"))
    with s3_server(tmp_path / "moto-1.log", port=port) as s3:
        for key, value in s3.items():
            monkeypatch.setenv(key, value)
        bg = BackgroundLog(tmp_path / "model", url, writer="pod-b-w0")
        for k in range(5):
            assert bg.submit(_answer(images[k % 3], k))
        assert bg.flush(timeout=60), bg.counters()
        assert bg.counters()["written"] == 5 and bg.counters()["spool"] == 0
        assert len(inferencelog.read(url)) == 5
    # the store is down: answers go on, their records wait in the spool
    for k in range(5, 25):
        assert bg.submit(_answer(images[k % 3], k))
    assert not bg.flush(timeout=3), "nothing can be put while the store is down"
    counts = bg.counters()
    assert counts["spooled"] == 25 and counts["written"] == 5 and counts["dropped"] == counts["failed"] == 0
    assert counts["spool"] >= 1 and bg._uploader.last_error
    with s3_server(tmp_path / "moto-2.log", port=port):  # back where it was (moto keeps no data: empty)
        assert bg.flush(timeout=60), bg.counters()
        counts = bg.counters()
        assert counts["written"] == 25 and counts["spool"] == 0
        df = inferencelog.read(url)
        assert df["request_id"].tolist() == [f"q{k:03d}" for k in range(5, 25)], "every record of the outage"
        assert df["has_statistics"].all()
        assert bg.close()
    assert not any((tmp_path / "spool").rglob("*.jsonl*")), "the spool is empty once everything is put"


def test_a_segment_left_open_by_a_killed_writer_is_put_by_the_next(tmp_path, images, monkeypatch):
    """A writer SIGKILLed with lines in its open spool segment: the next writer on that spool rolls
    the segment (cut at its last complete line) and puts it."""
    import subprocess
    import sys
    import textwrap

    url = f"s3://{BUCKET}/killed"
    monkeypatch.setenv(logstore.SPOOL_ENV, str(tmp_path / "spool"))
    with s3_server(tmp_path / "moto.log") as s3:
        for key, value in s3.items():
            monkeypatch.setenv(key, value)
        script = textwrap.dedent(
            f"""
            import os, signal, sys
            from datetime import date
            from pipeline.monitoring import logstore
            sp, _ = logstore.spool({url!r})
            for k in range(7):
                line = b'{{"kind":"answer","timestamp":"2026-12-06T10:00:0%dZ","request_id":"k%d",' % (k, k)
                sp.append(date(2026, 12, 6), line + b'"prediction":{{"probabilities":{{"nv":1.0}}}}}}\\n')
            sp.append(date(2026, 12, 6), b'{{"kind":"answer","timest')  # torn by the kill
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
        proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ), cwd=os.getcwd())
        assert proc.returncode == -signal.SIGKILL
        assert len(list((tmp_path / "spool").rglob("*.part"))) == 1
        logstore._spools.pop(url, None)
        sp, up = logstore.spool(url)  # a new writer starts on the spool
        assert not list((tmp_path / "spool").rglob("*.part"))
        assert logstore.flush(url)
        df = inferencelog.read(url)
        assert df["request_id"].tolist() == [f"k{k}" for k in range(7)]


def test_forget_on_s3_reaches_a_record_still_in_the_spool_of_a_running_writer(tmp_path, images, monkeypatch):
    """On S3: a running writer whose uploader has already listed the store (s3fs caches listings)
    still honours an erasure request left by `forget` after that: the record, spooled when forget
    ran, is never put; the writer's counters still account for every answer."""
    from pipeline.monitoring import logcare

    url = f"s3://{BUCKET}/erased"
    monkeypatch.setenv(logstore.SPOOL_ENV, str(tmp_path / "spool"))
    with s3_server(tmp_path / "moto.log") as s3:
        for key, value in s3.items():
            monkeypatch.setenv(key, value)
        bg = BackgroundLog(tmp_path / "model", url, writer="pod-e-w0")
        assert bg.submit(_answer(images[0], 0)) and bg.flush(timeout=60), bg.counters()
        for k in range(1, 4):
            assert bg.submit(_answer(images[k % 3], k))
        assert logcare.forget(url, "q002") == []  # still in the spool: nothing put yet
        assert bg.flush(timeout=60), bg.counters()
        assert inferencelog.read(url)["request_id"].tolist() == ["q000", "q001", "q003"]
        assert not [line for _, _, line in logstore.iter_lines(url) if "q002" in line]  # its statistics too
        counts = bg.counters()
        assert counts["written"] == 4 and counts["spool"] == 0, counts
        assert bg.close()
