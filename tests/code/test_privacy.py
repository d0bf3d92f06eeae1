"""Patients' data kept only as long and as exactly as needed: the inference log's metadata policy,
its files' modes, retention and erasure of one answer, uploads stored without EXIF; and the API
tokens that decide who may call the service (only their hashes are stored)."""

from __future__ import annotations

import io
import json
import os
import stat
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from PIL import Image

from pipeline.core import images
from pipeline.monitoring import erasures, inferencelog, logcare, logrecord
from pipeline.monitoring.logrecord import Answer
from pipeline.serving import auth

T0 = datetime(2026, 3, 10, 12, tzinfo=UTC)
RESPONSE = {"dx_probabilities": {"mel": 0.2, "nv": 0.8}, "p_malignant": 0.2, "decision": "benign"}


def _answer(k: int, when: datetime = T0, **kw) -> Answer:
    rgb = np.full((40, 50, 3), (10 * k) % 256, dtype=np.uint8)
    meta = {"age": 47.0, "sex": "female", "localization": "back"}
    return Answer(rgb, RESPONSE, "m", kw.pop("metadata", meta), timestamp=when, request_id=f"r{k}", **kw)


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("binned", {"age": 45.0, "sex": "female", "localization": "back"}),
        ("exact", {"age": 47.0, "sex": "female", "localization": "back"}),
        ("off", {"age": None, "sex": None, "localization": None}),
    ],
)
def test_the_log_keeps_the_metadata_the_policy_allows(tmp_path, policy, expected):
    log = inferencelog.InferenceLog(tmp_path / "log", metadata=policy)
    assert log.log(_answer(1)) is not None
    row = inferencelog.read(tmp_path / "log").iloc[0]
    got = {k: (None if row[k] is None or row[k] != row[k] else row[k]) for k in expected}
    assert got == expected
    with pytest.raises(logrecord.InferenceLogError, match="log_metadata"):
        logrecord.kept_metadata({}, "rounded")


def test_log_files_are_the_owners_alone_and_never_written_through_a_link(tmp_path):
    log = inferencelog.InferenceLog(tmp_path / "log")
    path = log.log(_answer(1))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "log").st_mode) == 0o700
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    assert inferencelog.InferenceLog(tmp_path / "linked").log(_answer(2)) is None  # refused (a warning)
    assert not any(elsewhere.iterdir())
    day = inferencelog.log_file(tmp_path / "log", T0 + timedelta(days=1))
    day.symlink_to(tmp_path / "target")  # a link planted where tomorrow's file goes
    assert log.log(_answer(3, T0 + timedelta(days=1))) is None and not (tmp_path / "target").exists()


def _jpeg_with_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x9003] = "2026:03:10 12:00:00"
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40, 3), 120, np.uint8)).save(buf, "JPEG", exif=exif.tobytes(), comment=b"P-123")
    return buf.getvalue()


def test_stored_uploads_carry_no_exif_and_the_same_pixels(tmp_path):
    data = _jpeg_with_exif()
    stripped = images.strip_metadata(data)
    assert b"CameraMaker" in data and b"CameraMaker" not in stripped and b"P-123" not in stripped
    assert (np.asarray(Image.open(io.BytesIO(stripped))) == np.asarray(Image.open(io.BytesIO(data)))).all()
    log = inferencelog.InferenceLog(tmp_path / "log", store_images=True)
    log.log(_answer(1, image_bytes=data))
    import base64

    stored = base64.b64decode(inferencelog.read(tmp_path / "log")["image_b64"][0])
    assert stored == stripped


def test_retention_deletes_whole_old_days_only(tmp_path):
    log = inferencelog.InferenceLog(tmp_path / "log")
    for age_days in (100, 91, 90, 3, 0):
        log.log(_answer(age_days, T0 - timedelta(days=age_days)))
    removed = logcare.prune(tmp_path / "log", 90, now=T0)
    assert sorted(os.path.basename(r) for r in removed) == ["inference-2025-11-30.jsonl", "inference-2025-12-09.jsonl"]
    assert sorted(inferencelog.read(tmp_path / "log")["request_id"]) == ["r0", "r3", "r90"]


def test_forget_erases_one_answer_and_its_image_wherever_it_is_stored(tmp_path):
    log = inferencelog.InferenceLog(tmp_path / "log", store_images=True)
    for k in range(4):
        log.log(_answer(k, T0 + timedelta(hours=10 * k), image_bytes=_jpeg_with_exif()))
    batch_image = Answer(
        np.zeros((8, 8, 3), np.uint8), RESPONSE, "m", timestamp=T0 + timedelta(hours=20), request_id="r2-0"
    )
    log.log(batch_image)  # the first image of a batch request r2
    found = logcare.forget(tmp_path / "log", "r2")
    assert [f["records"] for f in found] == [2] and found[0]["where"].endswith("inference-2026-03-11.jsonl")
    left = inferencelog.read(tmp_path / "log")
    assert sorted(left["request_id"]) == ["r0", "r1", "r3"]  # r2 and the batch image r2-0 are gone
    assert logcare.forget(tmp_path / "log", "r2") == []
    with pytest.raises(ValueError, match="not a request id"):
        logcare.forget(tmp_path / "log", "../etc")


def test_forget_and_prune_on_object_storage(tmp_path):
    """The same on an object store (fsspec's in-memory file system stands for S3 here; the
    end-to-end tests run the S3 server)."""
    import fsspec

    url = f"memory://forget-{os.getpid()}/log"
    log = inferencelog.InferenceLog(url)
    for k in range(3):
        log.log(_answer(k, T0 - timedelta(days=200 * (k == 0))))
    log.flush()
    fs = fsspec.filesystem("memory")
    try:
        assert [f["records"] for f in logcare.forget(url, "r1")] == [1]
        assert sorted(inferencelog.read(url)["request_id"]) == ["r0", "r2"]
        assert erasures.requested(fs, f"/forget-{os.getpid()}/log") == {"r1"}
        # a day of records (the oldest), and the erasure requests once as old as the retention
        assert len(logcare.prune(url, 90, now=T0)) == 1 and list(inferencelog.read(url)["request_id"]) == ["r2"]
        later = datetime.now(UTC) + timedelta(days=91)
        removed = logcare.prune(url, 90, now=later)
        assert len(removed) == 2 and removed[-1].endswith(f"erasures/{datetime.now(UTC).date().isoformat()}")
        assert erasures.requested(fs, f"/forget-{os.getpid()}/log") == frozenset()
    finally:
        if fs.exists(f"/forget-{os.getpid()}"):
            fs.rm(f"/forget-{os.getpid()}", recursive=True)


def test_forget_reaches_the_records_still_waiting_in_a_replicas_spool(tmp_path, monkeypatch):
    """On object storage a record waits in its replica's local spool before it is put, where
    `forget` cannot see it: the erasure request forget leaves in the store makes the uploader drop
    it (a batch's images included) before the PUT; the other records are put as they were."""
    import fsspec

    monkeypatch.setenv("LESIONFLOW_LOG_SPOOL", str(tmp_path / "spool"))
    url = f"memory://spooled-{os.getpid()}/log"
    log = inferencelog.InferenceLog(url)
    for k in range(3):
        log.log(_answer(k))
    log.log(Answer(np.zeros((8, 8, 3), np.uint8), RESPONSE, "m", timestamp=T0, request_id="r1-0"))
    try:
        assert logcare.forget(url, "r1") == []  # nothing put yet
        log.flush()
        assert sorted(inferencelog.read(url)["request_id"]) == ["r0", "r2"]
    finally:
        fsspec.filesystem("memory").rm(f"/spooled-{os.getpid()}", recursive=True)


def test_an_erasure_requested_while_a_segment_is_put_is_honoured():
    """The race: forget lists the objects just before a replica puts the segment holding the
    record (so it finds nothing) and leaves its request while the PUT is under way; the uploader
    looks again once the PUT succeeded and rewrites the object without the record, or deletes it
    when nothing is left."""
    import fsspec

    fs, root = fsspec.filesystem("memory"), f"/race-{os.getpid()}/log"
    name = f"{root}/inference-2026-03-10/w-000001.jsonl"

    class ForgetDuringPut:  # the store, with a forget of `rid` landing during the first PUT
        def __init__(self, rid: str):
            self.rid, self.puts = rid, 0

        def __getattr__(self, attr):
            return getattr(fs, attr)

        def pipe_file(self, path, data):
            fs.pipe_file(path, data)
            self.puts += 1
            if self.puts == 1:
                erasures.request(fs, root, self.rid)

    lines = b"".join(json.dumps({"kind": "answer", "request_id": rid}).encode() + b"\n" for rid in ("r0", "r1", "r1-0"))
    try:
        kept = erasures.put_without(ForgetDuringPut("r1"), root, name, lines)
        assert [json.loads(x)["request_id"] for x in fs.cat_file(name).splitlines()] == ["r0"]
        assert kept == fs.cat_file(name)
        erasures.put_without(ForgetDuringPut("r0"), root, name, kept)
        assert not fs.exists(name)  # nothing left: no object
        assert erasures.put_without(fs, root, name, kept) == b"" and not fs.exists(name)
    finally:
        fs.rm(f"/race-{os.getpid()}", recursive=True)


def test_tokens_are_stored_hashed_shown_once_and_revocable(tmp_path):
    path = tmp_path / "tokens"
    token = auth.add(path, "ci")
    other = auth.add(path, "clinic-b")
    text = path.read_text()
    assert token not in text and auth.digest(token) in text and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    keeper = auth.Gatekeeper(path)
    assert keeper.who(f"Bearer {token}") == "ci" and keeper.who(f"bearer {other}") == "clinic-b"
    assert keeper.who(None) is None and keeper.who("Bearer nope") is None and keeper.who(token) is None
    with pytest.raises(auth.TokenError, match="exists"):
        auth.add(path, "ci")
    with pytest.raises(auth.TokenError, match="letters, digits"):
        auth.add(path, "a b")
    auth.revoke(path, "ci")
    keeper._checked = 0.0  # the service re-reads within a second; here at once
    assert keeper.who(f"Bearer {token}") is None and keeper.who(f"Bearer {other}") == "clinic-b"
    with pytest.raises(auth.TokenError, match="no token named 'ci'"):
        auth.revoke(path, "ci")
    path.write_text("ci not-a-hash\n")
    with pytest.raises(auth.TokenError, match="line 1"):
        auth.read_entries(path)
    keeper._checked = 0.0
    assert keeper.who(f"Bearer {other}") is None and "cannot be read" in keeper.refusal()  # refuse, never guess


def test_request_ids_are_records_keys(tmp_path):
    """What forget() relies on: the log writes the answer's request id as given."""
    log = inferencelog.InferenceLog(tmp_path / "log")
    log.log(_answer(5))
    line = next(iter(inferencelog.log_file(tmp_path / "log", T0).read_text().splitlines()))
    assert json.loads(line)["request_id"] == "r5"
