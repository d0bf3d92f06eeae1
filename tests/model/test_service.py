"""The BentoML service through HTTP: a real `bentoml serve` on 127.0.0.1 (started once for the
module) serving a tiny untrained model packaged with pipeline.registry.package into a temporary
BENTOML_HOME. Valid images (JPEG/PNG, any size, multipart or raw body) get probabilities that
sum to one at every level and match pipeline.model.inference's; every kind of bad input gets its 4xx
JSON error naming the field; the service keeps answering afterwards."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core import images, lineage
from pipeline.model import inference
from tests.registry_fixtures import PROJECT_ROOT
from tests.service_fixtures import MAX_BYTES, THRESHOLD
from tests.service_fixtures import real_images as _real_images


def _check_probabilities(body: dict) -> None:
    for key in ("dx_probabilities", "risk_probabilities", "binary_probabilities"):
        probs = body[key]
        assert all(0.0 <= v <= 1.0 for v in probs.values()), (key, probs)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6), (key, probs)
    assert set(body["dx_probabilities"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert body["p_malignant"] == pytest.approx(body["binary_probabilities"]["malignant"])
    assert body["risk_class"] == max(body["risk_probabilities"], key=body["risk_probabilities"].get)
    assert body["refer"] is (body["p_malignant"] >= body["threshold"])
    assert body["decision"].startswith("refer") if body["refer"] else "no referral" in body["decision"]
    assert "not for clinical use" in body["disclaimer"]


def test_classify_multipart_matches_pipeline_inference(server, client):
    base, tag, model_dir = server
    path = _real_images(1)[0]
    r = client.post(
        "/classify",
        files={"image": (path.name, path.read_bytes(), "image/jpeg")},
        data={"age": "45", "sex": "female", "localization": "back"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    _check_probabilities(body)
    assert body["model_tag"] == tag
    assert body["data_version"] == lineage.data_version(PROJECT_ROOT / "data.dvc")["md5"]
    assert body["threshold"] == pytest.approx(THRESHOLD)
    assert body["metadata"] == {"age": 45.0, "sex": "female", "localization": "back"}
    # the same preprocessing + model as pipeline.model.inference (imported, not copied)
    import pandas as pd

    local = inference.load_model(model_dir, device="cpu").predict(
        [images.decode_rgb(path)], metadata=pd.DataFrame([{"age": 45.0, "sex": "female", "localization": "back"}])
    )
    np.testing.assert_allclose(list(body["dx_probabilities"].values()), local["dx_probs"][0], atol=1e-5)
    assert body["p_malignant"] == pytest.approx(float(local["p_malignant"][0]), abs=1e-5)


def test_classify_raw_body_png_any_size(client):
    path = _real_images(2)[1]
    big = Image.open(path).convert("RGB").resize((600, 450))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    r = client.post("/classify?sex=male&age=60", content=buf.getvalue(), headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    _check_probabilities(r.json())
    assert r.json()["metadata"]["sex"] == "male"
    jpeg = client.post("/classify", content=path.read_bytes(), headers={"Content-Type": "application/octet-stream"})
    assert jpeg.status_code == 200, jpeg.text
    _check_probabilities(jpeg.json())


def test_batch_endpoint_and_concurrent_requests(client):
    paths = _real_images(3)
    r = client.post(
        "/classify_batch",
        files=[("image", (p.name, p.read_bytes(), "image/jpeg")) for p in paths],
        data={"age": ["30", "50", "70"]},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3
    for res, age in zip(results, (30.0, 50.0, 70.0)):
        _check_probabilities(res)
        assert res["metadata"]["age"] == age

    def one(p: Path) -> dict:
        resp = client.post("/classify", content=p.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert resp.status_code == 200, resp.text
        return resp.json()

    before = client.get("/model").json()["batching"]
    with ThreadPoolExecutor(12) as pool:
        out = list(pool.map(one, paths * 4))
    for i, res in enumerate(out):  # batched with other requests, yet the same answer per image
        assert res["dx_probabilities"] == pytest.approx(out[i % 3]["dx_probabilities"], abs=1e-5)
    after = client.get("/model").json()["batching"]
    assert after["images"] - before["images"] == 12  # every image went through the batcher once
    assert 1 <= after["batches"] - before["batches"] <= 12
    assert after["largest_batch"] <= after["max_batch_size"]


def test_batchable_infer_api(server, client):
    """BentoML's batchable /infer: preprocessed tensors in, probabilities out; a bad item gets
    its own error without failing the others."""
    import base64

    _, _, model_dir = server
    pred = inference.load_model(model_dir, device="cpu")
    path = _real_images(1)[0]
    u8 = pred.resize([images.decode_rgb(path)])[0].numpy()
    good = {"pixels": base64.b64encode(u8.tobytes()).decode(), "age": 50}
    r = client.post("/infer", json={"items": [good, {"pixels": "AAAA"}, {**good, "sex": "robot"}]})
    assert r.status_code == 200, r.text
    ok, short, bad_sex = r.json()
    assert sum(ok["dx"]) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(
        ok["dx"],
        pred.predict([images.decode_rgb(path)], metadata={"age": [50.0], "sex": [None], "localization": [None]})[
            "dx_probs"
        ][0],
        atol=1e-5,
    )
    assert "expected" in short["error"] and "sex" in bad_sex["error"]


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (never decoded: refused first)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="GIF")
    return buf.getvalue()


def _bad_requests() -> list:
    jpeg = _real_images(1)[0].read_bytes()
    raw = {"Content-Type": "image/jpeg"}
    return [
        # id, (path, kwargs), status, field, words in the message
        ("empty-body", ("/classify", {"content": b"", "headers": raw}), 400, "image", "empty"),
        ("empty-file", ("/classify", {"files": {"image": ("a.jpg", b"", "image/jpeg")}}), 400, "image", "empty"),
        (
            "not-an-image",
            ("/classify", {"content": b"hello, this is text" * 10, "headers": raw}),
            400,
            "image",
            "not an image",
        ),
        (
            "truncated",
            ("/classify", {"files": {"image": ("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}}),
            400,
            "image",
            "truncated",
        ),
        (
            "gif",
            ("/classify", {"content": _gif(), "headers": {"Content-Type": "image/png"}}),
            415,
            "image",
            "unsupported format",
        ),
        (
            "too-many-bytes",
            ("/classify", {"content": os.urandom(MAX_BYTES + 10), "headers": raw}),
            413,
            "image",
            "exceeds the limit",
        ),
        (
            "too-many-bytes-multipart",
            ("/classify", {"files": {"image": ("b.jpg", os.urandom(MAX_BYTES + 10), "image/jpeg")}}),
            413,
            "image",
            "exceeds",
        ),
        (
            "decompression-bomb",
            ("/classify", {"content": _png_bomb(30000, 30000), "headers": raw}),
            413,
            "image",
            "decompression bomb",
        ),
        (
            "age-not-a-number",
            ("/classify", {"files": {"image": ("a.jpg", jpeg, "image/jpeg")}, "data": {"age": "abc"}}),
            422,
            "age",
            "number",
        ),
        ("age-out-of-range", ("/classify?age=150", {"content": jpeg, "headers": raw}), 422, "age", "between"),
        (
            "sex-not-in-vocabulary",
            ("/classify", {"files": {"image": ("a.jpg", jpeg, "image/jpeg")}, "data": {"sex": "robot"}}),
            422,
            "sex",
            "accepted",
        ),
        (
            "localization-unknown",
            ("/classify?localization=elbow", {"content": jpeg, "headers": raw}),
            422,
            "localization",
            "accepted",
        ),
        (
            "unknown-field",
            ("/classify", {"files": {"image": ("a.jpg", jpeg, "image/jpeg")}, "data": {"colour": "red"}}),
            422,
            "colour",
            "unknown field",
        ),
        (
            "no-image-field",
            ("/classify", {"files": {"photo_wrong": ("a.jpg", jpeg, "image/jpeg")}}),
            422,
            "photo_wrong",
            "unknown field",
        ),
        ("only-metadata", ("/classify", {"files": {"age": (None, "40")}}), 400, "image", "missing"),
        ("json-body", ("/classify", {"json": {"image": "x"}}), 415, "image", "Content-Type"),
        (
            "batch-bad-item",
            (
                "/classify_batch",
                {"files": [("image", ("a.jpg", jpeg, "image/jpeg")), ("image", ("b.jpg", b"nope", "image/jpeg"))]},
            ),
            400,
            "image[1]",
            "not an image",
        ),
    ]


@pytest.mark.parametrize("case", _bad_requests(), ids=lambda c: c[0])
def test_bad_input_gets_4xx_json_naming_the_problem(client, case):
    _, (path, kwargs), status, field, words = case
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["field"] == field
    assert field in body["error"] and words.lower() in body["error"].lower(), body


def test_service_still_answers_after_bad_input(client):
    for _ in range(2):  # bad inputs interleaved with good ones
        assert client.post("/classify", content=b"garbage", headers={"Content-Type": "image/jpeg"}).status_code == 400
        path = _real_images(1)[0]
        r = client.post("/classify", content=path.read_bytes(), headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 200, r.text
        _check_probabilities(r.json())
    assert client.get("/readyz").status_code == 200
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["ready"] is True


def test_model_info(server, client):
    _, tag, _ = server
    info = client.get("/model").json()
    assert info["model_tag"] == tag
    assert info["threshold"] == pytest.approx(THRESHOLD)
    assert info["classes"]["dx"] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert info["uses_metadata"] is True
    assert info["limits"]["max_image_bytes"] == MAX_BYTES


def test_answers_reach_the_inference_log_in_order(server, client):
    """Every answered image becomes one inference-log record (the answer record written by the
    request, the EDA statistics of that image by the log's writer), none dropped at this pace;
    /model says which engine predicts and counts the log's records; the record carries the
    uploaded file's sha256 and size."""
    from pipeline.features import imagestats
    from pipeline.monitoring import inferencelog

    _, tag, model_dir = server
    log_dir = model_dir.parent / "inference-log"
    before = client.get("/model").json()["inference_log"]
    paths = _real_images(3)
    for path in paths:
        r = client.post("/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while True:
        info = client.get("/model").json()
        counts = info["inference_log"]
        done = counts["statistics_written"] >= before["statistics_written"] + 3 and counts["queued"] == 0
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert info["engine"] in ("onnx", "torch") and info["engine"] == inference.load_model(model_dir).engine
    assert counts["enabled"] is True and counts["dropped"] == 0 and counts["failed"] == 0
    assert counts["written"] == counts["answered"] >= before["written"] + 3
    df = inferencelog.read(log_dir)
    assert len(df) == counts["written"] and (df["model_tag"] == tag).all()
    assert df["has_statistics"].sum() == counts["statistics_written"]  # all but /infer's and /gradcam's
    last = df.tail(3).reset_index(drop=True)
    assert last["has_statistics"].all()
    assert last["image_sha256"].tolist() == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert last["image_bytes"].tolist() == [p.stat().st_size for p in paths]
    for i, path in enumerate(paths):
        stats = imagestats.image_statistics(images.decode_rgb(path))
        assert last["brightness"][i] == pytest.approx(stats["brightness"])
        assert last["contrast_rms"][i] == pytest.approx(stats["contrast_rms"])


def test_every_route_that_answers_leaves_its_record(server, client):
    """/classify, /gradcam and /infer each leave an answer record naming their route: the
    explanation records the class it showed, the tensor of /infer its probabilities; neither waits
    for image statistics (the reader does not count them missing), and the monitor's batch leaves
    the explanations out (the page asks for one after classifying the same image)."""
    import base64

    from pipeline.monitoring import batch, inferencelog

    _, _, model_dir = server
    log_dir = model_dir.parent / "inference-log"
    path = _real_images(1)[0]
    r = client.post("/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    classified = r.json()["request_id"]
    g = client.post("/gradcam", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    assert g.status_code == 200, g.text
    u8 = inference.load_model(model_dir, device="cpu").resize([images.decode_rgb(path)])[0].numpy()
    i = client.post("/infer", json={"items": [{"pixels": base64.b64encode(u8.tobytes()).decode()}]})
    assert i.status_code == 200, i.text
    df = inferencelog.read(log_dir)
    by_route = dict(tuple(df.groupby("route")))
    shown = by_route["/gradcam"].iloc[-1]
    assert shown["request_id"] == g.headers["X-Request-ID"]
    assert shown["explained_class"] == g.headers["X-Gradcam-Class"] and not shown["statistics_expected"]
    assert by_route["/gradcam"]["image_sha256"].iloc[-1] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert by_route["/infer"]["p_dx_nv"].iloc[-1] == pytest.approx(i.json()[0]["dx"][5], abs=1e-6)
    assert not by_route["/infer"]["statistics_expected"].iloc[-1]
    assert classified in set(by_route["/classify"]["request_id"])
    current = batch.current_from_log(log_dir)
    assert "/gradcam" not in set(current["route"]) and len(current) == len(df) - len(by_route["/gradcam"])


def test_a_disagreement_is_recorded_with_its_answer_and_a_bad_one_named(server, client):
    """``POST /dispute``: a clinician's diagnosis joins the answer's record in the inference log (the
    labelling queue reads it); a bad value gets a 422 naming the field, a body that is not JSON a
    400, and nothing is recorded."""
    from pipeline.monitoring import inferencelog

    path = _real_images(1)[0]
    r = client.post("/classify", files={"image": (path.name, path.read_bytes(), "image/jpeg")})
    rid = r.json()["request_id"]
    for body, field in (
        ({"request_id": rid, "dx": "melanoma"}, "dx"),
        ({"request_id": "../etc", "dx": "mel"}, "request_id"),
        ({"request_id": rid, "dx": "mel", "note": "x" * 501}, "note"),
        ({"request_id": rid, "dx": "mel", "patient": "A. Smith"}, "patient"),
    ):
        bad = client.post("/dispute", json=body)
        assert bad.status_code == 422 and bad.json()["field"] == field, bad.text
    not_json = client.post("/dispute", content=b"not json")
    assert not_json.status_code == 400 and not_json.json()["field"] == "body"
    ok = client.post("/dispute", json={"request_id": rid, "dx": "mel", "note": "irregular network"})
    assert ok.status_code == 200 and ok.json() == {"recorded": True, "request_id": rid, "dx": "mel"}
    df = inferencelog.read(server[2].parent / "inference-log").set_index("request_id")
    assert df.loc[rid, "disputed_dx"] == "mel" and df.loc[rid, "dispute_note"] == "irregular network"
    assert df["disputed_dx"].notna().sum() == 1
    metrics = client.get("/metrics").text  # counted where operators look; the refused ones are not
    assert 'lesionflow_disputes_total{state="written"} 1.0' in metrics, metrics[-1500:]
    assert 'lesionflow_disputes_total{state="failed"}' not in metrics
