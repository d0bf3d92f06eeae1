"""The service refuses what its model cannot judge and says so, against a real `bentoml serve`
(``trusted_server``: a model with a temperature and an OOD detector, tests/model/conftest.py):

* images smaller than the data contract's minimum or too elongated get a 422 naming the size and
  the limit;
* a non-dermoscopic photograph is answered with ``in_distribution: false``, a message and no risk
  estimate or referral (the probabilities only under ``withheld_probabilities``), and reaches the
  inference log as such;
* calibrated probabilities are the same through the service and through the evaluation's path;
* the API contract: ``/docs.json`` documents every endpoint with request, response and error
  schemas, ``/docs`` browses it, and schemathesis (examples and fuzzing, bounded) finds no 5xx and
  no response outside its schema;
* similar confirmed cases (``/similar``, ``/classify?similar=K``, ``/cases/<id>.jpg``): the query's
  own lesion first with similarity ~1, one image per lesion, k respected, none for an OOD image,
  and a clear 503 from a model packaged without an index (the ``server`` fixture's).
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core import params
from pipeline.evaluation import oodsets
from pipeline.evaluation.predictions import predict_split
from pipeline.model import quality
from pipeline.model.inference import load_model
from pipeline.monitoring import inferencelog
from pipeline.serving.schemas import Classification, ModelInfo, SimilarCases
from tests.model.conftest import trust_sample
from tests.registry_fixtures import PROJECT_ROOT
from tests.service_fixtures import token_for

IMAGES_DIR = PROJECT_ROOT / "data" / "images"


def _png(w: int, h: int, colour=(180, 120, 100)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _photo() -> tuple[str, bytes]:
    coffee = next(o for o in oodsets.photographs() if o.name == "coffee")
    buf = io.BytesIO()
    Image.fromarray(coffee.rgb).save(buf, format="JPEG", quality=90)
    return "coffee.jpg", buf.getvalue()


@pytest.mark.parametrize("w, h", [(1, 1), (20, 20)])
def test_images_below_the_contracts_minimum_get_a_422_naming_size_and_minimum(trusted_client, w, h):
    r = trusted_client.post("/classify", files={"image": ("tiny.png", _png(w, h), "image/png")})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["field"] == "image" and f"{w}x{h}" in body["error"] and "at least 64x64" in body["error"]


def test_a_64x64_image_is_judged_and_an_elongated_one_is_refused(trusted_client):
    ok = trusted_client.post("/classify", files={"image": ("small.png", _png(64, 64), "image/png")})
    assert ok.status_code == 200, ok.text
    long = trusted_client.post("/classify", files={"image": ("strip.png", _png(600, 100), "image/png")})
    assert long.status_code == 422 and "at most 4:1" in long.json()["error"]


def test_a_photo_that_is_not_dermoscopy_gets_no_risk_estimate(trusted_server, trusted_client):
    name, data = _photo()
    r = trusted_client.post("/classify", files={"image": (name, data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = Classification.model_validate(r.json()).model_dump()
    assert body["in_distribution"] is False and body["ood_score"] > body["ood_threshold"]
    assert "does not look like" in body["message"]  # the detector's verdict, beside any quality reason
    for key in ("dx_probabilities", "risk_probabilities", "p_malignant", "refer", "decision", "risk_class"):
        assert body[key] is None, key
    withheld = body["withheld_probabilities"]
    assert withheld["p_malignant"] == pytest.approx(withheld["binary_probabilities"]["malignant"])
    # a training-like image is judged as usual
    image_id = trust_sample()["image_id"][0]
    r = trusted_client.post("/classify", files={"image": ("x.jpg", (IMAGES_DIR / f"{image_id}.jpg").read_bytes())})
    ok = r.json()
    assert ok["in_distribution"] is True and ok["refer"] in (True, False) and ok["message"] is None
    # the inference log keeps the flag (and the probabilities) for monitoring
    log_dir = trusted_server[2].parent / "inference-log"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = inferencelog.read(log_dir) if log_dir.exists() else pd.DataFrame()
        if len(rows) >= 2 and set(rows["source"]) >= {"image"} and rows["in_distribution"].notna().sum() >= 2:
            break
        time.sleep(0.3)
    flagged = rows[rows["in_distribution"] == False]  # noqa: E712
    assert len(flagged) >= 1 and flagged["p_malignant"].notna().all() and flagged["decision"].isna().all()


def test_a_blank_or_dark_image_is_refused_with_its_reasons_in_the_answer_and_the_log(trusted_server, trusted_client):
    """A plain black frame (the lens cap on) and a very dark lesion get no decision, the reasons in
    ``quality_reasons`` and ``message``; the log keeps the reasons for monitoring."""
    lesion = np.asarray(Image.open(IMAGES_DIR / f"{trust_sample()['image_id'][1]}.jpg").convert("RGB"))
    dark = io.BytesIO()
    Image.fromarray((lesion * 0.1).astype(np.uint8)).save(dark, format="PNG")
    sent = {
        "black.png": (_png(400, 300, (0, 0, 0)), {"blank", "underexposed"}),
        "dark.png": (dark.getvalue(), {"underexposed"}),
    }
    ids = set()
    for name, (data, reasons) in sent.items():
        r = trusted_client.post("/classify", files={"image": (name, data, "image/png")})
        assert r.status_code == 200, r.text
        body = Classification.model_validate(r.json()).model_dump()
        assert reasons <= set(body["quality_reasons"]), (name, body["quality_reasons"])
        assert body["message"].startswith("the image cannot be judged") and "under-exposed" in body["message"]
        for key in ("p_malignant", "refer", "decision", "risk_class", "dx_top"):
            assert body[key] is None, (name, key)
        assert body["withheld_probabilities"] is not None
        ids.add(body["request_id"])
    similar = trusted_client.post("/similar", files={"image": ("black.png", _png(400, 300, (0, 0, 0)), "image/png")})
    assert similar.status_code == 200 and similar.json()["similar"] == [] and similar.json()["quality_reasons"]
    mine = _log_rows(trusted_server, ids)
    assert len(mine) == 2 and mine["decision"].isna().all()
    assert all("underexposed" in str(v).split("; ") for v in mine["quality_reasons"])


def test_service_and_evaluation_give_the_same_calibrated_probabilities(trusted_server, trusted_client):
    rows = trust_sample().head(3)
    served = [
        trusted_client.post("/classify", files={"image": ("x.jpg", (IMAGES_DIR / f"{i}.jpg").read_bytes())}).json()
        for i in rows["image_id"]
    ]
    predictor = load_model(trusted_server[2], device="cpu")
    assert predictor.temperature != 1.0
    evaluated = predict_split(predictor, rows[["image_id", "lesion_id", "dx"]], IMAGES_DIR, 8, "test", False)
    dx = np.array([[s["dx_probabilities"][c] for c in predictor.taxonomy.classes("dx")] for s in served])
    assert np.allclose(dx, evaluated.level("dx"), atol=1e-5)
    assert np.allclose([s["ood_score"] for s in served], evaluated.ood_score, atol=1e-3)


def test_model_info_states_limits_calibration_and_ood(trusted_client):
    info = ModelInfo.model_validate(trusted_client.get("/model").json())
    limits = params.load_section("validate", PROJECT_ROOT / "params.yaml")
    assert info.input_limits == {
        "min_width": limits.min_width,
        "min_height": limits.min_height,
        "max_aspect_ratio": 4.0,
    }
    assert info.calibration["method"] == "temperature" and info.ood["method"] == "mahalanobis_layers"
    assert info.quality["fitted_on"] == "train" and set(info.quality["thresholds"]) == set(quality.FEATURES)


def test_openapi_documents_every_endpoint_and_docs_page_browses_it(trusted_client):
    spec = trusted_client.get("/docs.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/classify", "post"),
        ("/classify_batch", "post"),
        ("/gradcam", "post"),
        ("/model", "get"),
        ("/health", "get"),
        ("/infer", "post"),
        ("/livez", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/similar", "post"),
        ("/cases/{name}", "get"),
    ]:
        assert method in paths.get(path, {}), path
    classify = paths["/classify"]["post"]
    assert {"200", "400", "413", "415", "422"} <= set(classify["responses"])
    multipart = classify["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert multipart["properties"]["sex"]["enum"] == ["male", "female", "unknown"]
    assert {"Classification", "ApiErrorBody", "WithheldProbabilities"} <= set(spec["components"]["schemas"])
    page = trusted_client.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text and "/docs.json" in page.text
    assert trusted_client.get("/static_content/swagger-ui-bundle.js").status_code == 200
    assert "<title>lesionflow" in trusted_client.get("/").text  # the clinician page stays at /


def test_schemathesis_finds_no_server_error_and_no_response_outside_its_schema(trusted_server, tmp_path):
    base = trusted_server[0]
    cmd = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{base}/docs.json"),
        *("-H", f"Authorization: Bearer {token_for(base)}"),  # every operation with a token
        "--checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        *("--phases", "examples,fuzzing", "--max-examples", "20", "--workers", "1", "--seed", "1"),
        *("--max-time", "25", "--request-timeout", "30", "--no-color", "--generation-database", "none"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "13 selected / 13 total" in proc.stdout, proc.stdout[-3000:]  # every documented operation
    assert "Examples" in proc.stdout and "Fuzzing" in proc.stdout


# ----------------------------------------------------------------------------------------------
# similar confirmed cases


def test_similar_returns_the_query_itself_first_with_thumbnails(trusted_client):
    rows = trust_sample()
    image_id = rows["image_id"][5]
    r = trusted_client.post("/similar", files={"image": ("x.jpg", (IMAGES_DIR / f"{image_id}.jpg").read_bytes())})
    assert r.status_code == 200, r.text
    body = SimilarCases.model_validate(r.json())
    assert body.k == 6 and len(body.similar) == 6 and "HAM10000" in body.attribution
    first = body.similar[0]
    lesion = rows.set_index("image_id").loc[image_id, "lesion_id"]
    assert first.lesion_id == lesion and first.similarity == pytest.approx(1.0, abs=1e-3)
    assert len({c.lesion_id for c in body.similar}) == 6  # one image per lesion
    assert all(a.similarity >= b.similarity for a, b in zip(body.similar, body.similar[1:]))
    assert first.dx == rows.set_index("image_id").loc[image_id, "dx"] and first.confirmation
    thumb = trusted_client.get(first.thumbnail_url)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 100
    missing = trusted_client.get("/cases/ISIC_9999999.jpg")
    assert missing.status_code == 404 and missing.json()["field"] == "name"


def test_classify_adds_k_similar_cases_when_asked_and_none_for_a_photo(trusted_client):
    image_id = trust_sample()["image_id"][7]
    data = (IMAGES_DIR / f"{image_id}.jpg").read_bytes()
    plain = trusted_client.post("/classify", files={"image": ("x.jpg", data)}).json()
    assert plain["similar"] is None
    asked = trusted_client.post("/classify?similar=3", files={"image": ("x.jpg", data)}).json()
    assert [c["image_id"] for c in asked["similar"]][:1] == [image_id] and len(asked["similar"]) == 3
    raw = trusted_client.post("/classify?similar=2&age=50", content=data, headers={"Content-Type": "image/jpeg"})
    assert raw.status_code == 200 and len(raw.json()["similar"]) == 2 and raw.json()["metadata"]["age"] == 50
    name, photo = _photo()
    ood = trusted_client.post("/similar", files={"image": (name, photo, "image/jpeg")}).json()
    assert ood["in_distribution"] is False and ood["similar"] == [] and ood["message"]
    bad = trusted_client.post("/classify?similar=0", files={"image": ("x.jpg", data)})
    assert bad.status_code == 422 and bad.json()["field"] == "similar"


def test_similar_cases_found_for_a_whole_batch_match_those_of_single_requests(trusted_client):
    """The service queries the index once per model batch: requests batched together, asking for
    different k (or none, or an image out of distribution), each get exactly their own cases."""
    ids = list(trust_sample()["image_id"][8:12])
    blobs = [(IMAGES_DIR / f"{i}.jpg").read_bytes() for i in ids]
    alone = {
        (j, k): [
            c["image_id"]
            for c in trusted_client.post(f"/classify?similar={k}", files={"image": ("x.jpg", b)}).json()["similar"]
        ]
        for j, b in enumerate(blobs)
        for k in (2, 5)
    }
    assert all(alone[j, 2] == alone[j, 5][:2] for j in range(len(blobs)))
    name, photo = _photo()
    files = [("image", (f"{j}.jpg", b)) for j, b in enumerate(blobs)] + [("image", (name, photo, "image/jpeg"))]
    batch = trusted_client.post("/classify_batch?similar=5", files=files).json()["results"]
    assert [[c["image_id"] for c in r["similar"]] for r in batch[:-1]] == [alone[j, 5] for j in range(len(blobs))]
    assert batch[-1]["in_distribution"] is False and batch[-1]["similar"] == []

    def ask(job):
        j, k = job
        url = "/classify" if k is None else f"/classify?similar={k}"
        return trusted_client.post(url, files={"image": ("x.jpg", blobs[j])}).json()["similar"]

    jobs = [(j, k) for j in range(len(blobs)) for k in (None, 2, 5)] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (j, k), cases in zip(jobs, answers):
        assert (cases is None) if k is None else [c["image_id"] for c in cases] == alone[j, k]


def test_an_inference_log_that_keeps_images_holds_the_uploaded_file(trusted_server, trusted_client):
    """LESIONFLOW_LOG_IMAGES=1: the record of an answer carries the very bytes that were uploaded."""
    import base64

    data = (IMAGES_DIR / f"{trust_sample()['image_id'][3]}.jpg").read_bytes()
    r = trusted_client.post("/classify", files={"image": ("kept.jpg", data)})
    assert r.status_code == 200, r.text
    rid = r.json()["request_id"]
    deadline = time.monotonic() + 30  # its features record (holding the file) follows the answer
    while True:
        df = inferencelog.read(trusted_server[2].parent / "inference-log")
        kept = df.loc[df["request_id"] == rid, "image_b64"].dropna() if "image_b64" in df else []
        if len(kept) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(kept) == 1, "the features record holding the file was not written in 30 s"
    assert base64.b64decode(kept.iloc[0]) == data


def test_a_model_without_an_index_says_so(client):
    data = (IMAGES_DIR / f"{trust_sample()['image_id'][0]}.jpg").read_bytes()
    r = client.post("/similar", files={"image": ("x.jpg", data)})
    assert r.status_code == 503 and "without a retrieval index" in r.json()["error"]
    assert client.post("/classify?similar=3", files={"image": ("x.jpg", data)}).status_code == 503
    assert client.post("/classify", files={"image": ("x.jpg", data)}).json()["similar"] is None


# ----------------------------------------------------------------------------------------------
# the Python client


def test_the_python_client_gives_typed_answers_of_every_image_route(trusted_server, trusted_client):
    """pipeline.serving.client against the served model: each call returns the service's response
    model, the same answer as the raw HTTP request, and a refused request raises naming the field."""
    from pipeline.serving.client import ApiRequestError, LesionflowClient
    from pipeline.serving.schemas import BatchClassification, Health

    base, tag, _ = trusted_server
    image_id, other = trust_sample()["image_id"][:2]
    path = IMAGES_DIR / f"{image_id}.jpg"
    png = io.BytesIO()
    Image.open(IMAGES_DIR / f"{other}.jpg").save(png, format="PNG")
    with LesionflowClient(base, token=token_for(base)) as client:
        r = client.classify(path, age=55, sex="male", localization="back", similar=3)
        raw = trusted_client.post(
            "/classify",
            params={"similar": 3},
            files={"image": (path.name, path.read_bytes(), "image/jpeg")},
            data={"age": "55", "sex": "male", "localization": "back"},
        ).json()
        assert isinstance(r, Classification) and r.request_id != raw["request_id"]  # one id per answer
        assert r == Classification.model_validate({**raw, "request_id": r.request_id})
        assert r.model_tag == tag and r.metadata.age == 55 and [c.image_id for c in r.similar][:1] == [image_id]
        batch = client.classify_batch([path, png.getvalue()])
        assert isinstance(batch, BatchClassification) and batch.n == 2
        assert batch.results[0].p_malignant == pytest.approx(client.classify(path).p_malignant)
        cases = client.similar(path, k=2)
        assert isinstance(cases, SimilarCases) and len(cases.similar) == 2 and cases.similar[0].image_id == image_id
        overlay, predicted = client.gradcam(path)
        assert overlay[:8] == b"\x89PNG\r\n\x1a\n" and predicted in client.model().classes["dx"]
        assert isinstance(client.model(), ModelInfo) and client.model().model_tag == tag
        assert client.health() == Health(status="ok", ready=True, model_tag=tag)
        with pytest.raises(ApiRequestError) as refused:
            client.classify(_png(1, 1))
        assert refused.value.status == 422 and refused.value.field == "image" and "64x64" in refused.value.message


def _log_rows(trusted_server, ids: set[str]) -> pd.DataFrame:
    """The inference log's rows of the answers ``ids`` (waiting up to 20 s for them)."""
    log_dir = trusted_server[2].parent / "inference-log"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = inferencelog.read(log_dir) if log_dir.exists() else pd.DataFrame()
        if len(rows) and ids <= set(rows["request_id"]):
            break
        time.sleep(0.3)
    return rows[rows["request_id"].isin(ids)].set_index("request_id")


def test_a_request_naming_a_site_is_decided_at_that_sites_threshold(trusted_server, trusted_client):
    """``lesionflow site add`` records an operating point per site with the model (here: clinic-a
    suitable at 0.999, clinic-b not suitable; tests/model/conftest.py). A request names its site by
    header, form field or query parameter; the answer says which site and threshold applied; at a
    site not suitable for the model it gets probabilities but no decision, and the reason. The
    inference log keeps the site and threshold of every answer."""
    image = (IMAGES_DIR / f"{trust_sample()['image_id'][2]}.jpg").read_bytes()
    files = {"image": ("x.jpg", image, "image/jpeg")}
    model = trusted_client.post("/classify", files=files).json()
    by_header = trusted_client.post("/classify", files=files, headers={"X-Lesionflow-Site": "clinic-a"}).json()
    by_form = trusted_client.post("/classify", files=files, data={"site": "clinic-a"}).json()
    raw = trusted_client.post("/classify?site=clinic-a", content=image, headers={"Content-Type": "image/jpeg"})
    model_threshold = trusted_client.get("/model").json()["threshold"]
    assert model["site"] is None and model["threshold"] == pytest.approx(model_threshold)
    for body in (by_header, by_form, raw.json()):
        assert body["site"] == "clinic-a" and body["threshold"] == pytest.approx(0.999)
        assert body["p_malignant"] == pytest.approx(model["p_malignant"], abs=1e-6)
        assert body["refer"] is (body["p_malignant"] >= 0.999) and body["decision"] is not None
    assert model["refer"] is (model["p_malignant"] >= model_threshold)
    unsuitable = trusted_client.post("/classify", files=files, data={"site": "clinic-b"}).json()
    assert unsuitable["site"] == "clinic-b" and unsuitable["refer"] is None and unsuitable["decision"] is None
    assert unsuitable["p_malignant"] == pytest.approx(model["p_malignant"], abs=1e-6)  # probabilities, no decision
    assert "not suitable" in unsuitable["message"] and "min_site_specificity" in unsuitable["message"]
    rows = _log_rows(trusted_server, {model["request_id"], by_header["request_id"], unsuitable["request_id"]})
    assert rows.loc[by_header["request_id"], "site"] == "clinic-a"
    assert rows.loc[by_header["request_id"], "threshold"] == pytest.approx(0.999)
    assert pd.isna(rows.loc[model["request_id"], "site"])
    assert rows.loc[model["request_id"], "threshold"] == pytest.approx(model_threshold)
    assert pd.isna(rows.loc[unsuitable["request_id"], "decision"])


def test_an_unknown_or_ambiguous_site_is_refused_naming_the_field(trusted_client):
    image = (IMAGES_DIR / f"{trust_sample()['image_id'][2]}.jpg").read_bytes()
    files = {"image": ("x.jpg", image, "image/jpeg")}
    unknown = trusted_client.post("/classify", files=files, data={"site": "clinic-z"})
    assert unknown.status_code == 422 and unknown.json()["field"] == "site"
    assert "clinic-z" in unknown.json()["error"] and "clinic-a, clinic-b" in unknown.json()["error"]
    both = trusted_client.post(
        "/classify", files=files, data={"site": "clinic-a"}, headers={"X-Lesionflow-Site": "clinic-b"}
    )
    assert both.status_code == 422 and both.json()["field"] == "site" and "name one site" in both.json()["error"]
    batch = trusted_client.post(
        "/classify_batch", files=[("image", ("a.jpg", image)), ("image", ("b.jpg", image))], data={"site": "clinic-a"}
    )
    assert batch.status_code == 200 and {r["site"] for r in batch.json()["results"]} == {"clinic-a"}
    shown = {s["name"]: s for s in trusted_client.get("/model").json()["sites"]}
    assert set(shown) == {"clinic-a", "clinic-b"} and shown["clinic-b"]["suitable"] is False
    assert shown["clinic-a"]["threshold"] == pytest.approx(0.999)
