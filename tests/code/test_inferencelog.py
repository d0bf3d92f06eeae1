"""The service's inference log: what the record function writes is read back by the monitor with no
loss (row count and values), by time window, safely under concurrent writers."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from pipeline.core.images import decode_rgb
from pipeline.core.params import to_dict
from pipeline.features import imagestats
from pipeline.monitoring import inferencelog, logrecord, logstore, profile
from pipeline.monitoring.logrecord import Answer
from pipeline.serving import logqueue
from pipeline.serving.logqueue import BackgroundLog
from tests.conftest import IMAGES_DIR

T0 = datetime(2026, 3, 1, 23, 59, 58, tzinfo=UTC)
DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def _service_response(rng: np.random.Generator) -> dict:
    """A prediction as the service's ``finalise`` returns it."""
    p = rng.dirichlet(np.ones(7))
    return {
        "dx_probabilities": dict(zip(DX, p.tolist())),
        "p_malignant": float(p[0] + p[1] + p[4]),
        "decision": "refer" if p[4] > 0.2 else "no_refer",
        "model_tag": "lesionflow:abc",
    }


@pytest.fixture(scope="module")
def real_images(real_metadata):
    ids = real_metadata["image_id"].iloc[:4].tolist()
    return [decode_rgb(IMAGES_DIR / f"{i}.jpg", i) for i in ids]


def test_records_of_the_service_read_back_without_loss(tmp_path, real_images):
    rng = np.random.default_rng(0)
    projection = profile.projection_matrix(64, 8, seed=1)
    written = []
    for k in range(12):  # across midnight: two day files
        rgb = real_images[k % len(real_images)]
        pred = _service_response(rng)
        emb = rng.standard_normal(64).astype(np.float32)
        meta = {"age": [45.0, None][k % 2], "sex": ["male", "female", None][k % 3], "localization": "back"}
        answer = Answer(rgb, pred, "lesionflow:abc", meta, emb, T0 + timedelta(seconds=k), f"req-{k}")
        rec = logrecord.record_for(answer, projection=projection)
        inferencelog.append(rec, tmp_path)
        written.append((rec, rgb, pred, emb, meta))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inference-2026-03-01.jsonl", "inference-2026-03-02.jsonl"]
    df = inferencelog.read(tmp_path)
    assert len(df) == 12 and df["request_id"].tolist() == [f"req-{k}" for k in range(12)]
    for k, (_, rgb, pred, emb, meta) in enumerate(written):
        row = df.iloc[k]
        stats = imagestats.image_statistics(rgb)
        for name, value in stats.items():
            if isinstance(value, float) and math.isnan(value):
                assert pd.isna(row[name]), name
            elif isinstance(value, (bool, np.bool_)):
                assert bool(row[name]) == bool(value), name
            elif isinstance(value, str):
                assert row[name] == value, name
            else:
                assert row[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
        for c, p in pred["dx_probabilities"].items():
            assert row[f"p_dx_{c}"] == pytest.approx(p, rel=1e-12)
        assert row["dx_pred"] == max(pred["dx_probabilities"], key=pred["dx_probabilities"].get)
        assert row["p_malignant"] == pytest.approx(pred["p_malignant"]) and row["decision"] == pred["decision"]
        proj = emb @ projection
        assert [row[f"emb_{i:02d}"] for i in range(8)] == pytest.approx(proj.tolist(), rel=1e-6)
        assert (row["sex"] if isinstance(row["sex"], str) else None) == meta["sex"]
        assert (None if pd.isna(row["age"]) else row["age"]) == meta["age"]
        assert row["timestamp"] == pd.Timestamp(T0 + timedelta(seconds=k))
        assert "image_b64" not in row  # never the image unless configured


def test_read_by_time_window(tmp_path):
    rng = np.random.default_rng(1)
    for k in range(6):
        rec = logrecord.make_record(
            stats={"brightness": 0.1 * k},
            metadata=None,
            prediction=_service_response(rng),
            model_tag="m",
            timestamp=T0 + timedelta(hours=k),
        )
        inferencelog.append(rec, tmp_path)
    df = inferencelog.read(tmp_path, start=T0 + timedelta(hours=1), end=T0 + timedelta(hours=4))
    assert df["brightness"].tolist() == pytest.approx([0.1, 0.2, 0.3])  # start inclusive, end exclusive
    naive = (T0 + timedelta(hours=5)).replace(tzinfo=None)  # naive = UTC
    assert len(inferencelog.read(tmp_path, start=naive)) == 1
    assert len(inferencelog.read(tmp_path / "absent")) == 0


def test_concurrent_appends_never_interleave_and_torn_lines_are_skipped(tmp_path):
    rng = np.random.default_rng(2)
    big_stats = {f"s{i}": float(i) for i in range(400)}  # ~8 kB lines: larger than a pipe buffer

    def writer(w: int) -> None:
        for k in range(25):
            rec = logrecord.make_record(
                stats=big_stats,
                metadata=None,
                prediction=_service_response(rng),
                model_tag=f"w{w}",
                request_id=f"{w}-{k}",
                timestamp=T0,
            )
            inferencelog.append(rec, tmp_path)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = inferencelog.log_file(tmp_path, T0)
    lines = path.read_text().splitlines()
    assert len(lines) == 100 and all(json.loads(line)["stats"]["s399"] == 399.0 for line in lines)
    with open(path, "a") as fh:  # a crash in the middle of a write
        fh.write('{"timestamp": "2026-03-01T23:59:58Z", "stats": {"s0": 1')
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        df = inferencelog.read(tmp_path)
    assert len(df) == 100 and df["request_id"].is_unique
    assert df.attrs["skipped"] == [f"{path}:101"]


def test_images_only_when_configured_and_logger_never_raises(tmp_path, real_images):
    rng = np.random.default_rng(3)
    off = inferencelog.InferenceLog(tmp_path / "a")
    on = inferencelog.InferenceLog(tmp_path / "b", store_images=True)
    for log in (off, on):
        answer = Answer(real_images[0], _service_response(rng), "m", {"age": 50}, image_bytes=b"\xff\xd8jpeg")
        assert log.log(answer) is not None
    assert "image_b64" not in inferencelog.read(tmp_path / "a").columns
    assert inferencelog.read(tmp_path / "b")["image_b64"].tolist() == ["/9hqcGVn"]
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    rec = logrecord.record_for(Answer(real_images[0], _service_response(rng), "m"))
    assert inferencelog.InferenceLog(blocked).write(rec) is None  # warns, does not raise


def test_bad_record_is_named():
    with pytest.raises(inferencelog.InferenceLogError, match="timestamp"):
        inferencelog.append({"stats": {}}, "/tmp/never")
    with pytest.raises(inferencelog.InferenceLogError, match="no class probabilities"):
        logrecord.make_record(stats={}, metadata=None, prediction={"p_malignant": 0.3}, model_tag="m")


def test_service_hook_logs_one_line_per_prediction(tmp_path, real_images):
    """The service's hook: InferenceLog.log(Answer) -> one record with the projected embedding when
    the model's reference profile is present."""
    from pipeline.core.fsutil import write_json

    ref = tmp_path / "model" / "reference"
    ref.mkdir(parents=True)
    np.save(ref / "projection.npy", profile.projection_matrix(16, 4, seed=0))
    write_json(ref / "profile.json", {"feature_config": to_dict(imagestats.DEFAULT_CONFIG)})
    log = inferencelog.InferenceLog(tmp_path / "log", reference_dir=ref)
    rng = np.random.default_rng(4)
    emb = rng.standard_normal(16).astype(np.float32)
    meta = {"age": 30, "sex": "female", "localization": "face"}
    path = log.log(Answer(real_images[1], _service_response(rng), "lesionflow:xyz", meta, emb, source="image"))
    df = inferencelog.read(tmp_path / "log")
    assert path is not None and len(df) == 1 and df["source"][0] == "image"
    assert [df[f"emb_{i:02d}"][0] for i in range(4)] == pytest.approx((emb @ np.load(ref / "projection.npy")).tolist())
    assert df["brightness"][0] == pytest.approx(imagestats.image_statistics(real_images[1])["brightness"])
    assert log.log(Answer(np.zeros((2, 2), np.uint8), {}, "m")) is None  # a bad input is a warning, not an error


def _background_log(tmp_path, log_dir="log", **kwargs) -> BackgroundLog:
    """The service's BackgroundLog writing to ``tmp_path/log_dir`` (the model has no reference profile)."""
    return BackgroundLog(tmp_path / "model", str(tmp_path / log_dir), **kwargs)


def _answer(rgb, rng=None, **kw) -> Answer:
    """One answer of the service for ``rgb`` (an empty prediction without ``rng``)."""
    return Answer(rgb, {} if rng is None else _service_response(rng), kw.pop("model_tag", "m"), **kw)


def test_background_log_writes_every_record_in_order_with_the_request_time(tmp_path, real_images):
    """The service's BackgroundLog: submit() writes the answer record at once (the request's time,
    the uploaded file's sha256 and size, the OOD score); the writer process adds the statistics of
    each image, computed on its small copy: the same values as on the decoded image."""
    bg = _background_log(tmp_path)
    rng = np.random.default_rng(7)
    t_before = datetime.now(UTC)
    for k, rgb in enumerate(real_images):
        answer = _answer(
            rgb,
            rng,
            metadata={"age": 32 + 5 * k, "sex": "male", "localization": "back"},
            model_tag="lesionflow:abc",
            source=f"image{k}",
            image_sha256=f"{k:064x}",
            image_nbytes=1000 + k,
        )
        answer.prediction["ood_score"] = 0.5 + k
        assert bg.submit(answer) is True
        assert bg.counters()["written"] == k + 1  # on disk before submit() returns
    t_after = datetime.now(UTC)
    assert bg.flush(timeout=30)
    counts = bg.counters()
    assert counts["answered"] == counts["written"] == counts["statistics_written"] == 4
    assert counts["dropped"] == counts["failed"] == counts["statistics_dropped"] == counts["queued"] == 0
    df = inferencelog.read(tmp_path / "log")
    assert df["source"].tolist() == [f"image{k}" for k in range(4)]
    assert df["age"].tolist() == [30.0, 35.0, 40.0, 45.0]  # in 5-year bins: monitor.log_metadata's default
    assert df["image_sha256"].tolist() == [f"{k:064x}" for k in range(4)] and df["image_bytes"].tolist() == [
        1000,
        1001,
        1002,
        1003,
    ]
    assert df["ood_score"].tolist() == [0.5, 1.5, 2.5, 3.5] and df["has_statistics"].all()
    assert ((df["timestamp"] >= pd.Timestamp(t_before)) & (df["timestamp"] <= pd.Timestamp(t_after))).all()
    for k, rgb in enumerate(real_images):
        for name, value in imagestats.image_statistics(rgb).items():
            if isinstance(value, float) and not math.isnan(value):
                assert df[name][k] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    cov = df.attrs["coverage"]
    assert cov["answered"] == cov["records"] == cov["with_statistics"] == 4 and cov["record_coverage"] == 1.0
    assert bg.close()


def test_concurrent_requests_share_appends_and_each_record_is_on_disk_when_its_submit_returns(
    tmp_path, real_images, monkeypatch
):
    """The appender thread writes the records of every request waiting in one append (a group
    commit): 16 request threads x 40 answers, each record in the day file by the time its own
    submit() returned, every one exactly once, in fewer appends than records."""
    appends = []
    real_append = logstore.append_line

    def counted(location, day, data):
        appends.append(data.count(b'"kind":"answer"'))  # logrecord.to_line: compact separators
        return real_append(location, day, data)

    monkeypatch.setattr(logstore, "append_line", counted)
    bg = _background_log(tmp_path)
    missing = []

    def request(worker: int) -> None:
        rng = np.random.default_rng(worker)
        for k in range(40):
            rid = f"w{worker:02d}-{k:02d}"
            assert bg.submit(_answer(real_images[0], rng, request_id=rid), statistics=False)
            if rid.encode() not in b"".join(f.read_bytes() for f in (tmp_path / "log").glob("*.jsonl")):
                missing.append(rid)

    threads = [threading.Thread(target=request, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert missing == [], "a record was not on disk when its submit() returned"
    df = inferencelog.read(tmp_path / "log")
    assert sorted(df["request_id"]) == sorted(f"w{w:02d}-{k:02d}" for w in range(16) for k in range(40))
    assert sum(appends) == 640 and len([n for n in appends if n]) < 640, "concurrent requests share appends"
    assert bg.counters()["written"] == 640
    assert bg.close()


def test_a_full_queue_skips_statistics_never_an_answer_record_and_the_stream_says_so(tmp_path, real_images):
    """A saturated service never waits for its log's statistics: beyond max_queue_bytes of waiting
    copies (and no room on the disk backlog) an answer's statistics are skipped and counted; every
    answer record is still written, in the order the answers were given, and the reader marks the
    ones without statistics."""
    small = imagestats.statistics_copy(real_images[0])
    bg = _background_log(tmp_path, max_queue_bytes=2 * small.nbytes, backlog_bytes=0)
    rng = np.random.default_rng(8)
    os.kill(bg.pid, signal.SIGSTOP)  # the writer falls behind
    try:
        ids = [f"r{k:03d}" for k in range(40)]
        accepted = [bg.submit(_answer(real_images[k % 4], rng, request_id=rid)) for k, rid in enumerate(ids)]
        assert all(accepted)
        assert bg.handed_over(timeout=10)  # the copies are queued after the records, off the request
        counts = bg.counters()
        assert counts["written"] == 40 and counts["statistics_dropped"] == 38 and counts["queued"] == 2
        written = [
            json.loads(line)["request_id"]
            for line in inferencelog.log_file(tmp_path / "log", datetime.now(UTC)).read_text().splitlines()
        ]
        assert written == ids, "in the order the answers were given, as written (not as sorted by a reader)"
    finally:
        os.kill(bg.pid, signal.SIGCONT)
    assert bg.flush(timeout=30)
    df = inferencelog.read(tmp_path / "log")
    assert df["request_id"].tolist() == ids and df["has_statistics"].tolist() == [True, True] + [False] * 38
    cov = df.attrs["coverage"]
    assert (cov["answered"], cov["records"], cov["with_statistics"], cov["statistics_dropped"]) == (40, 40, 2, 38)
    assert cov["statistics_coverage"] == pytest.approx(2 / 40)
    assert bg.submit(_answer(real_images[0], rng)) is True and bg.flush(timeout=30)  # room again once drained
    assert bg.counters()["statistics_written"] == 3
    assert bg.close()


def test_background_log_survives_a_bad_record_and_can_be_switched_off(tmp_path, real_images):
    bg = _background_log(tmp_path)
    assert bg.submit(_answer(real_images[0])) is False  # no probabilities: no record, counted failed
    assert bg.submit(_answer(real_images[0], np.random.default_rng(9))) is True
    assert bg.flush(timeout=30)
    assert bg.counters()["failed"] == 1 and bg.counters()["written"] == 1 and bg.counters()["answered"] == 2
    assert bg.close()
    off = BackgroundLog(tmp_path / "model", None)  # logstore.location() is None when the log is off
    assert off.pid is None and off.submit(_answer(real_images[0])) is False and off.flush(timeout=1)


def test_a_stop_signal_while_the_writer_is_still_starting_loses_nothing(tmp_path, real_images):
    """A service stopped right after it started (its process group gets SIGTERM, or SIGINT from a
    terminal) while the writer's interpreter is still importing: the writer lives on, and every
    statistics record the service sends is written by it (it used to die, losing all of them)."""
    bg = _background_log(tmp_path)
    writer = bg.pid
    assert writer is not None
    os.kill(writer, signal.SIGTERM)  # within milliseconds of the start: long before its imports end
    os.kill(writer, signal.SIGINT)
    rng = np.random.default_rng(12)
    for rgb in real_images:
        assert bg.submit(_answer(rgb, rng))
    assert bg.close(timeout=60), bg.counters()
    assert bg.counters()["statistics_written"] == len(real_images) and bg.counters()["statistics_failed"] == 0
    df = inferencelog.read(tmp_path / "log")
    assert len(df) == len(real_images) and df["has_statistics"].all()
    assert bg._proc.pid == writer and bg._proc.returncode == 0, "the same writer, ended by close()"


def test_background_log_writer_is_a_low_priority_process_that_outlives_sigterm(tmp_path, real_images, monkeypatch):
    """The statistics run in a process of their own at the lowest CPU priority (never holding the
    service's interpreter lock); a SIGTERM to the service's process group does not lose queued
    statistics (the writer ends only when the service closes its input); a writer that dies is
    counted (its unanswered statistics failed) and started again; no answer record is lost."""
    bg = _background_log(tmp_path)
    rng = np.random.default_rng(10)
    assert bg.submit(_answer(real_images[0], rng)) and bg.flush(timeout=30)
    writer = bg.pid
    assert writer is not None and writer != os.getpid()
    if hasattr(os, "SCHED_IDLE"):  # Linux: only CPU nothing else wants
        assert os.sched_getscheduler(writer) == os.SCHED_IDLE
    else:
        assert os.getpriority(os.PRIO_PROCESS, writer) == 19
    os.kill(writer, signal.SIGTERM)
    assert bg.submit(_answer(real_images[1], rng)) and bg.flush(timeout=30)
    assert bg.pid == writer and bg.counters()["statistics_written"] == 2

    monkeypatch.setattr(logqueue, "RESTART_AFTER_S", 0.0)
    os.kill(writer, signal.SIGSTOP)
    assert bg.submit(_answer(real_images[2], rng))  # its statistics go to a writer about to die
    os.kill(writer, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while bg.counters()["statistics_failed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bg.counters()["statistics_failed"] == 1 and bg.counters()["queued"] == 0
    assert bg.submit(_answer(real_images[3], rng)) and bg.flush(timeout=30)
    assert bg.pid not in (None, writer) and bg.counters()["statistics_written"] == 3
    df = inferencelog.read(tmp_path / "log")
    assert len(df) == 4 and df["has_statistics"].tolist() == [True, True, False, True]

    last = bg.pid
    assert bg.close() and bg.pid is None
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(last, 0)


def test_counters_are_persisted_with_the_log_and_survive_a_restart(tmp_path, real_images):
    """The totals a worker reached are kept beside the log; the next run of the same worker (a
    container restarted after an OOM kill) starts its /metrics series from them; the tallies of
    both runs give the monitor the answers of its window."""
    from prometheus_client import REGISTRY

    def total(state):
        return REGISTRY.get_sample_value("lesionflow_inference_log_records_total", {"state": state}) or 0.0

    rng = np.random.default_rng(13)
    first = _background_log(tmp_path, writer="pod-a-w0")
    before = total("written")
    for rgb in real_images[:3]:
        assert first.submit(_answer(rgb, rng))
    assert first.close()
    assert total("written") == before + 3
    persisted = json.loads((tmp_path / "log" / "counters" / "pod-a-w0.json").read_text())["totals"]
    assert persisted["answered"] == persisted["written"] == 3
    assert oct((tmp_path / "log" / "counters" / "pod-a-w0.json").stat().st_mode & 0o777) == "0o600"
    second = _background_log(tmp_path, writer="pod-a-w0")
    assert total("written") == before + 6, "the restarted worker's series start from its persisted totals"
    assert second.submit(_answer(real_images[3], rng)) and second.close()
    assert json.loads((tmp_path / "log" / "counters" / "pod-a-w0.json").read_text())["totals"]["written"] == 4
    cov = inferencelog.read(tmp_path / "log").attrs["coverage"]
    assert cov["answered"] == cov["records"] == 4


def test_the_log_location_has_one_answer_for_writer_and_reader(tmp_path, monkeypatch):
    """$LESIONFLOW_INFERENCE_LOG first (off turns the log off), then monitor.log_url of the
    params.yaml that decides (a project's, or the one packaged beside the code, as in a Bento's
    src/), relative to that file's folder; else logs/inference."""
    import yaml

    from pipeline.core import project
    from pipeline.monitoring import logstore
    from tests.conftest import PROJECT_ROOT

    def project_at(folder, log_url=None):
        folder.mkdir(parents=True)
        doc = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
        if log_url is not None:
            doc["monitor"]["log_url"] = log_url
        (folder / "params.yaml").write_text(yaml.safe_dump(doc))
        return folder

    monkeypatch.delenv(logstore.LOCATION_ENV, raising=False)
    a = project_at(tmp_path / "a", "audit/log")
    assert logstore.location(a) == str(a / "audit/log")
    assert logstore.location(project_at(tmp_path / "b", "s3://bucket/log")) == "s3://bucket/log"
    assert logstore.location(tmp_path) == str(tmp_path / "logs/inference")  # no params.yaml: the default
    bento_src = project_at(tmp_path / "bento/src", "/var/lib/lesionflow/log")
    monkeypatch.setattr(project, "PACKAGE_HOME", bento_src)  # the code's own folder, as a Bento has it
    assert logstore.location() == "/var/lib/lesionflow/log"
    monkeypatch.setenv(logstore.LOCATION_ENV, str(tmp_path / "explicit"))
    assert logstore.location() == logstore.location(a) == str(tmp_path / "explicit")
    monkeypatch.setenv(logstore.LOCATION_ENV, "off")
    assert logstore.location() is None and logstore.location(a) is None


def test_the_monitor_says_how_much_of_the_service_its_window_holds():
    """The drift summary carries the window's coverage; below 99% of the answers (or of their
    statistics) it warns with the counts, in summary.md too."""
    from pipeline.monitoring.decision import summary_markdown
    from pipeline.monitoring.drift import coverage_warning

    full = {"answered": 1000, "records": 1000, "with_statistics": 995, "dropped": 0, "failed": 0}
    full |= {"record_coverage": 1.0, "statistics_coverage": 0.995}
    assert coverage_warning(full) is None
    short = {**full, "records": 950, "with_statistics": 700, "dropped": 50, "record_coverage": 0.95}
    short["statistics_coverage"] = 700 / 950
    warning = coverage_warning(short)
    assert "950 answer records of 1000 answers" in warning and "50 dropped" in warning
    assert "only 700 of 950 answers have image statistics" in warning
    summary = {"decision": "drift", "reason": "r", "source": {"kind": "log"}, "coverage": short}
    summary |= {"coverage_warning": warning, "n_current": 950, "min_batch_size": 10, "n_reference": 5}
    text = summary_markdown({**summary, "decision": "not_enough_data"})
    assert "| log coverage | 950 answer records of 1000 answers given; 700 with image statistics |" in text
    assert f"**Warning**: {warning}" in text
