"""The statistics backlog: when the log's writer falls behind (the service is saturated), the
copies its statistics need wait on local disk beyond the memory queue, are computed once the
writer catches up, and leave nothing on disk; what cannot be kept is counted."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.images import decode_rgb, strip_metadata
from pipeline.features import imagestats
from pipeline.monitoring import inferencelog
from pipeline.monitoring.logrecord import Answer
from pipeline.serving import appender, logworker
from pipeline.serving.backlog import DiskBacklog, backlog_folder
from pipeline.serving.logqueue import BackgroundLog
from pipeline.serving.requests import decode_image
from tests.conftest import IMAGES_DIR

DX = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
#: Room for a frame's JSON header beside its copy's pixels.
HEADER_ROOM = 4096


@pytest.fixture(scope="module")
def images(real_metadata):
    return [decode_rgb(IMAGES_DIR / f"{i}.jpg", i) for i in real_metadata["image_id"].iloc[:4]]


@pytest.fixture
def spool(tmp_path, monkeypatch):
    """The backlog's base folder, private to the test."""
    monkeypatch.setenv("LESIONFLOW_LOG_SPOOL", str(tmp_path / "spool"))
    return tmp_path / "spool"


def _answer(rgb, rng, rid: str) -> Answer:
    p = rng.dirichlet(np.ones(7))
    prediction = {"dx_probabilities": dict(zip(DX, p.tolist())), "p_malignant": float(p[4])}
    return Answer(rgb, prediction, "m", metadata={"age": 55, "sex": "female"}, request_id=rid)


def _chunks(bg: BackgroundLog) -> list:
    folder = backlog_folder(bg.writer)
    return sorted(folder.glob("*.frames")) if folder.is_dir() else []


def test_copies_wait_on_disk_beyond_the_memory_queue_and_are_computed_when_the_writer_catches_up(
    tmp_path, spool, images
):
    small = imagestats.statistics_copy(images[0])
    frame_room = small.nbytes + HEADER_ROOM
    bg = BackgroundLog(tmp_path / "model", str(tmp_path / "log"), 2 * small.nbytes, backlog_bytes=10 * frame_room)
    rng = np.random.default_rng(3)
    ids = [f"r{k:03d}" for k in range(40)]
    os.kill(bg.pid, signal.SIGSTOP)  # the writer gets no CPU, as under saturation
    try:
        assert all(bg.submit(_answer(images[k % 4], rng, rid)) for k, rid in enumerate(ids))
        assert bg.handed_over(timeout=10)  # the copies are queued by the log's appender thread
        counts = bg.counters()
        assert counts["written"] == 40 and counts["queued"] == 12 and counts["statistics_dropped"] == 28
        chunks = _chunks(bg)
        assert chunks and counts["backlog_bytes"] == sum(p.stat().st_size for p in chunks) > 0
        assert stat.S_IMODE(chunks[0].stat().st_mode) == 0o600
        assert stat.S_IMODE(chunks[0].parent.stat().st_mode) == 0o700
        on_disk = b"".join(p.read_bytes() for p in chunks)
        assert b"r005" in on_disk  # a copy waits with its request id and time, not the answer itself:
        assert b"dx_probabilities" not in on_disk and b"female" not in on_disk, "its answer record holds those"
    finally:
        os.kill(bg.pid, signal.SIGCONT)
    assert bg.flush(timeout=60)
    assert _chunks(bg) == [] and bg.counters()["backlog_bytes"] == 0, "a copy is deleted once its statistics exist"
    df = inferencelog.read(tmp_path / "log")
    assert df["request_id"].tolist() == ids and df["has_statistics"].tolist() == [True] * 12 + [False] * 28
    for k in (0, 5, 11):  # from memory (0) and from disk (5, 11): the statistics of the image itself
        assert df["brightness"][k] == pytest.approx(imagestats.image_statistics(images[k % 4])["brightness"], rel=1e-9)
    assert bg.counters()["statistics_written"] == 12
    assert bg.close()


def test_a_service_stopping_before_the_writer_caught_up_counts_the_rest_dropped_and_deletes_their_copies(
    tmp_path, spool, images
):
    small = imagestats.statistics_copy(images[0])
    bg = BackgroundLog(tmp_path / "model", str(tmp_path / "log"), small.nbytes, backlog_bytes=1 << 30)
    rng = np.random.default_rng(4)
    os.kill(bg.pid, signal.SIGSTOP)
    for k in range(6):
        assert bg.submit(_answer(images[k % 4], rng, f"s{k}"))
    deadline = time.monotonic() + 10  # a record's copy is queued just after its request is released
    while bg.counters()["queued"] < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert bg.counters()["queued"] == 6 and _chunks(bg)
    assert bg.close(timeout=2) is False  # the writer never got to them
    counts = bg.counters()
    assert counts["statistics_written"] == 0 and counts["queued"] == 0 and counts["written"] == 6
    assert counts["statistics_dropped"] + counts["statistics_failed"] == 6  # failed: sent, never answered
    assert _chunks(bg) == [], "no copy of a patient's image is left behind"


def test_leftovers_of_a_killed_process_are_deleted_and_a_live_one_s_kept(tmp_path):
    folder = tmp_path / "backlog"
    killed = (  # a process that appends a frame and dies without cleaning up (as under SIGKILL)
        "import os, sys; from pathlib import Path; from pipeline.serving.backlog import DiskBacklog; "
        "DiskBacklog(Path(sys.argv[1]), 'aaaa', 1 << 20).append(b'x'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", killed, str(folder)], cwd=Path(__file__).resolve().parents[2], check=True)
    live = DiskBacklog(folder, "bbbb", 1 << 20)  # another replica's worker on this host, running
    assert live.append(b"y") is not None
    (folder / "notes.txt").write_text("not ours")
    assert DiskBacklog(folder, "cccc", 1 << 20).clear_leftovers() == 1
    assert sorted(p.name for p in folder.iterdir()) == ["bbbb-000000.frames", "notes.txt"]


def test_a_full_backlog_refuses_and_chunks_roll_and_go_once_read(tmp_path):
    backlog = DiskBacklog(tmp_path / "b", "run", max_bytes=250, chunk_bytes=100)
    frames = [bytes([k]) * 60 for k in range(5)]
    where = [backlog.append(f) for f in frames]
    assert where[4] is None and all(w is not None for w in where[:4])  # 4 x 60 fits in 250, a fifth not
    assert len(list((tmp_path / "b").iterdir())) == 2  # a chunk is closed past 100 bytes
    assert [backlog.read(w) for w in where[:2]] == frames[:2]
    assert len(list((tmp_path / "b").iterdir())) == 1 and backlog.bytes == 120
    assert [backlog.read(w) for w in where[2:4]] == frames[2:4]
    assert list((tmp_path / "b").iterdir()) == [] and backlog.bytes == 0


def test_a_partial_write_is_refused_and_the_frames_before_it_still_read_back(tmp_path, monkeypatch):
    backlog = DiskBacklog(tmp_path / "b", "run", max_bytes=1 << 20)
    first = backlog.append(b"a" * 50)
    chunk = backlog._chunks[0]
    # a disk that fills up in the middle of the next frame
    monkeypatch.setattr(chunk, "append", lambda data: os.write(chunk.fd, data[:10]))
    assert backlog.append(b"b" * 50) is None and backlog.bytes == 60
    third = backlog.append(b"c" * 50)  # goes to a new chunk
    assert third is not None and third.chunk == 1
    assert backlog.read(first) == b"a" * 50 and backlog.read(third) == b"c" * 50
    assert list((tmp_path / "b").iterdir()) == [] and backlog.bytes == 0


class _Spinning:
    """A thread of this process using a core until the block ends (the busy service)."""

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        return self

    def _spin(self):
        while not self.stop.is_set():
            sum(range(10_000))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_pacing_waits_while_the_service_is_busy_unless_the_backlog_is_half_full(tmp_path):
    backlog = tmp_path / "backlog"
    backlog.mkdir()
    pacing = logworker.Pacing(os.getpid(), 0.2, backlog, 1000, window=0.1)
    time.sleep(0.25)  # a verdict stands for a window: look after a while, as the writer does
    assert not pacing.wait(), "an idle service: the writer goes on"
    with _Spinning():
        time.sleep(0.25)
        assert pacing.wait(), "a busy service: the writer waits"
        (backlog / "run-000000.frames").write_bytes(b"x" * 500)
        assert not pacing.wait(), "half the backlog's bound: the writer computes whatever the load"
    never = [
        logworker.Pacing(os.getpid(), 0.0, backlog, 1000),  # yielding switched off
        logworker.Pacing(os.getpid(), 0.2, None, 1000),  # no backlog to wait in
        logworker.Pacing(os.getpid(), 0.2, backlog, 0),
        logworker.Pacing(2**22 + 12345, 0.2, backlog, 1000),  # CPU time unreadable
    ]
    with _Spinning():
        assert not any(p.wait() for p in never)
    assert logworker.default_yield_cores({"LESIONFLOW_LOG_YIELD_CORES": "0.7"}) == 0.7
    cpus = len(os.sched_getaffinity(0))
    assert logworker.default_yield_cores({"LESIONFLOW_WORKERS": "2"}) == pytest.approx(cpus / 4)


def test_the_writer_waits_while_its_service_is_busy_and_catches_up_once_it_is_not(tmp_path, spool, images, monkeypatch):
    """At the service's peak the writer computes no statistics (its CPU time cost the service
    15-20% of its answers, benchmarks/log_cost.py): the copies wait, and are computed after."""
    monkeypatch.setenv("LESIONFLOW_LOG_YIELD_CORES", "0.2")
    bg = BackgroundLog(tmp_path / "model", str(tmp_path / "log"), backlog_bytes=1 << 30)
    rng = np.random.default_rng(5)
    try:
        with _Spinning():
            time.sleep(0.3)
            for k in range(5):
                assert bg.submit(_answer(images[k % 4], rng, f"b{k}"))
            assert bg.handed_over(timeout=10)
            time.sleep(1.0)
            counts = bg.counters()
            assert counts["statistics_written"] == 0 and counts["queued"] == 5, counts
        assert bg.flush(timeout=60)
        assert bg.counters()["statistics_written"] == 5
        assert inferencelog.read(tmp_path / "log")["has_statistics"].tolist() == [True] * 5
    finally:
        bg.close()


def test_the_appender_takes_no_new_records_while_too_many_copies_wait_to_be_queued(tmp_path, monkeypatch):
    """Queueing the statistics copies runs after the requests were answered; when it falls behind,
    the copies it holds are bounded: the next record waits instead of memory growing."""
    monkeypatch.setattr(appender, "MAX_FOLLOW_UPS", 3)
    app = appender.Appender(str(tmp_path / "log"))
    release = threading.Event()
    returned: list[str] = []

    def one_request_after_another():
        for k in range(8):
            returned.append(app.append(date(2026, 3, 1), b'{"k":%d}\n' % k, release.wait))

    thread = threading.Thread(target=one_request_after_another, daemon=True)
    thread.start()
    time.sleep(1.0)
    assert len(returned) == 3, "three copies wait to be queued: the fourth record waits"
    release.set()
    thread.join(timeout=10)
    assert returned == ["written"] * 8 and app.idle(timeout=10)


def _upload(path: Path, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    """An uploaded file of the image at ``path``, with a patient's name in its EXIF description."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if size is not None:
        img = img.resize(size)
    exif = Image.Exif()
    exif[0x010E] = "Jane Roe, 1961-04-02"  # ImageDescription
    buf = io.BytesIO()
    img.save(buf, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _frame_answer(frame: bytes) -> Answer:
    (n,) = logworker.HEADER.unpack(frame[: logworker.HEADER.size])
    header = json.loads(frame[logworker.HEADER.size : logworker.HEADER.size + n])
    return logworker.decode(header, frame[logworker.HEADER.size + n :])


def test_a_copy_is_the_uploaded_file_when_that_is_smaller_and_the_writer_decodes_it_as_the_service_did(
    real_metadata,
):
    """The service spends nothing on the pixels of an upload no larger than their copy: the frame
    carries the file (its metadata stripped) and the writer decodes it with the service's decoder,
    to the very pixels the service saw. A larger upload is sent as the copy, without the file
    unless the log keeps files."""
    path = IMAGES_DIR / f"{real_metadata['image_id'].iloc[0]}.jpg"
    data = _upload(path)
    rgb = decode_image(data, "image")  # what the service decoded
    answer = Answer(rgb, {"dx_probabilities": {}}, "m", metadata={"sex": "female"}, image_bytes=data)
    copy = logworker.statistics_copy(answer, 200)
    assert copy.rgb.size == 0 and copy.size == (rgb.shape[1], rgb.shape[0])
    assert b"Jane Roe" in data and b"Jane Roe" not in copy.image_bytes, "the file's metadata is stripped"
    frame = logworker.encode(copy)
    assert b"Jane Roe" not in frame and len(frame) < 200 * 150 * 3 // 4
    back = logworker.with_pixels(_frame_answer(frame))
    assert np.array_equal(back.rgb, rgb), "the writer decodes the very pixels the service saw"

    big = _upload(path, "PNG", (600, 450))  # larger than its 200x150 copy
    rgb_big = decode_image(big, "image")
    copy = logworker.statistics_copy(Answer(rgb_big, {}, "m", image_bytes=big), 200)
    assert copy.rgb.shape == (150, 200, 3) and copy.image_bytes is None and copy.size == (600, 450)
    assert np.array_equal(logworker.with_pixels(_frame_answer(logworker.encode(copy))).rgb, copy.rgb)
    kept = logworker.statistics_copy(Answer(rgb_big, {}, "m", image_bytes=big), 200, keep_file=True)
    assert kept.rgb.shape == (150, 200, 3) and kept.image_bytes == big

    wrong = Answer(logworker.NO_PIXELS, {}, "m", image_bytes=strip_metadata(data), size=(600, 450))
    with pytest.raises(ValueError, match="decodes to"):
        logworker.with_pixels(wrong)


def test_uploaded_files_wait_for_the_writer_without_their_metadata_and_give_the_statistics_of_the_decoded_image(
    tmp_path, spool, real_metadata
):
    """The whole way: uploads waiting in memory and on the disk backlog while the writer is stopped
    hold no patient's name, and the writer computes each one's statistics from the decoded file."""
    paths = [IMAGES_DIR / f"{i}.jpg" for i in real_metadata["image_id"].iloc[:3]]
    uploads = [_upload(p) for p in paths]
    decoded = [decode_image(data, "image") for data in uploads]
    bg = BackgroundLog(tmp_path / "model", str(tmp_path / "log"), len(uploads[0]) // 2, backlog_bytes=1 << 20)
    rng = np.random.default_rng(5)
    ids = [f"u{k:02d}" for k in range(60)]  # beyond what the pipe to the stopped writer holds (64 KB)
    os.kill(bg.pid, signal.SIGSTOP)
    try:
        for k, rid in enumerate(ids):
            answer = replace(_answer(decoded[k % 3], rng, rid), image_bytes=uploads[k % 3])
            assert bg.submit(answer)
        assert bg.handed_over(timeout=10)
        on_disk = b"".join(p.read_bytes() for p in _chunks(bg))
        assert b"u59" in on_disk and b"Jane Roe" not in on_disk
    finally:
        os.kill(bg.pid, signal.SIGCONT)
    assert bg.flush(timeout=60)
    df = inferencelog.read(tmp_path / "log")
    assert df["request_id"].tolist() == ids and df["has_statistics"].all()
    for k in range(60):
        expected = imagestats.image_statistics(decoded[k % 3])
        assert df["brightness"][k] == pytest.approx(expected["brightness"], rel=1e-9)
        assert df["sharpness"][k] == pytest.approx(expected["sharpness"], rel=1e-9)
    assert "image_b64" not in df.columns or df["image_b64"].isna().all(), "the log keeps no file unless asked"
    assert bg.close()
