"""The service's HTTP routes (a FastAPI app mounted into the BentoML service at ``/``) and its API
contract: ``GET /docs.json`` (the OpenAPI document of every endpoint, BentoML's included, with
request, response and error schemas) and ``GET /docs`` (a browsable page of it, Swagger UI from
BentoML's bundled assets: nothing is fetched from the internet). ``GET /`` stays the clinicians'
page (``web/``).

The handlers only translate HTTP: parsing and validation are :mod:`pipeline.serving.requests`,
predictions and responses the worker's :class:`pipeline.serving.engine.Classifier`, which every
handler reaches, typed, through :func:`classifier`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import anyio
import bentoml
from fastapi import FastAPI
from fastapi import Path as FastApiPath
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from pipeline.core.metadata import FIELDS
from pipeline.model.retrieval import ATTRIBUTION
from pipeline.serving import openapi
from pipeline.serving.batching import QueueFull
from pipeline.serving.engine import Classifier
from pipeline.serving.limits import busy
from pipeline.serving.requests import (
    SITE,
    ApiError,
    check_request_pixels,
    parse_dispute,
    parse_request,
    similar_count,
)
from pipeline.serving.schemas import (
    ApiErrorBody,
    BatchClassification,
    Classification,
    Dispute,
    DisputeRecorded,
    Health,
    ModelInfo,
    SimilarCases,
)

logger = logging.getLogger("lesionflow.service")
WEB_DIR = Path(__file__).resolve().parent / "web"

app = FastAPI(title="lesionflow", docs_url=None, redoc_url=None, openapi_url=None)


def classifier() -> Classifier:
    """The worker's classifier (:class:`pipeline.serving.service.LesionflowService` holds it), or
    ApiError 503 while the model is still loading."""
    found = getattr(bentoml.get_current_service(), "classifier", None)
    if not isinstance(found, Classifier):
        raise ApiError(503, "model", "the model is still loading; try again shortly")
    return found


def _internal_error(what: str) -> JSONResponse:
    return JSONResponse({"error": f"internal error while {what}; see the server log", "status": 500}, status_code=500)


def _similar_requested(request: Request, c: Classifier, default: int | None = None) -> int | None:
    """How many similar cases the request asks for (``?similar=K``), or ApiError."""
    k = similar_count(request, default)
    if k is not None and c.retrieval is None:
        raise ApiError(503, "similar", "this model was packaged without a retrieval index of training cases")
    return k


async def _predict(request: Request, batch: bool, similar: int | None) -> list[dict[str, Any]] | JSONResponse:
    """The responses of the request's images (``finalise``), or the error response. The images'
    declared pixels are checked against the request's budget and places in the model's queue are
    taken before any image is decoded: a request the worker has no room for costs nothing."""
    try:
        c = classifier()
        items = await parse_request(request, c.vocab, batch)
        c.site(items[0][2].get(SITE))  # an unknown site is refused before any image is decoded
        declared = check_request_pixels(items)
        c.batcher.reserve(len(items))
    except QueueFull as exc:
        return busy(str(exc)).response()
    except ApiError as exc:
        return exc.response()
    try:
        prepared = [
            await anyio.to_thread.run_sync(c.prepare, field, data, meta, similar, pixels)
            for (field, data, meta), pixels in zip(items, declared)
        ]
    except ApiError as exc:
        c.batcher.release(len(items))
        return exc.response()
    try:
        preds = await asyncio.gather(*(c.batcher.submit(item) for item, _ in prepared))
    except Exception:
        logger.exception("inference failed")
        return _internal_error("predicting")
    ids = _request_ids(request, len(prepared))
    route = request.url.path

    def responses() -> list[dict[str, Any]]:
        return [
            c.finalise(pred, {**info, "route": route}, similar, rid)
            for (_, info), pred, rid in zip(prepared, preds, ids)
        ]

    # off the event loop: finalise writes each answer's record to the inference log (a file append
    # under a lock) before the response is sent, and the loop serves the other requests meanwhile
    return await anyio.to_thread.run_sync(responses)


def _request_ids(request: Request, n: int) -> list[str]:
    """The request's id (:mod:`pipeline.serving.guard`) for its one image, ``<id>-<k>`` for each of a batch's."""
    rid = getattr(request.state, "request_id", None) or uuid.uuid4().hex
    return [rid] if n == 1 else [f"{rid}-{k}" for k in range(n)]


async def _handle(request: Request, batch: bool) -> JSONResponse:
    try:
        c = classifier()
        similar = _similar_requested(request, c)
    except ApiError as exc:
        return exc.response()
    results = await _predict(request, batch, similar)
    if isinstance(results, JSONResponse):
        return results
    if batch:
        return JSONResponse(
            {
                "results": results,
                "n": len(results),
                "model_tag": c.tag,
                "data_version": c.data_version,
                "disclaimer": c.disclaimer,
            }
        )
    return JSONResponse(results[0])


@app.post(
    "/classify",
    summary="Classify one dermoscopic image",
    response_model=Classification,
    responses=openapi.ERRORS,
    openapi_extra=openapi.image_request(batch=False, similar=True),
)
async def classify(request: Request) -> JSONResponse:
    """One JPEG or PNG image (multipart field ``image``, or the raw body with metadata as query
    parameters) -> the diagnosis and risk probabilities, p(malignant) and the referral decision at
    the model's operating threshold; withheld for an image the model cannot judge."""
    return await _handle(request, batch=False)


@app.post(
    "/classify_batch",
    summary="Classify several images",
    response_model=BatchClassification,
    responses=openapi.ERRORS,
    openapi_extra=openapi.image_request(batch=True, similar=True),
)
async def classify_batch(request: Request) -> JSONResponse:
    """Several images in one multipart request (repeated ``image`` fields; each metadata field
    given once for all or once per image); one result per image, in order."""
    return await _handle(request, batch=True)


@app.post(
    "/similar",
    summary="The most similar confirmed training cases",
    response_model=SimilarCases,
    responses={**openapi.ERRORS, 503: {"model": ApiErrorBody, "description": "no retrieval index packaged"}},
    openapi_extra=openapi.image_request(batch=False, similar=True),
)
async def similar(request: Request) -> JSONResponse:
    """The request of ``/classify``; the ``k`` (``?similar=K``, default the index's) training
    lesions most similar to the image by the model's own embeddings, one image per lesion, each
    with its confirmed diagnosis, how it was confirmed, the similarity and a thumbnail URL. None for
    an image out of distribution."""
    try:
        c = classifier()
        k = _similar_requested(request, c, default=(c.retrieval.meta.get("k", 6) if c.retrieval else 6))
    except ApiError as exc:
        return exc.response()
    results = await _predict(request, False, k)
    if isinstance(results, JSONResponse):
        return results
    r = results[0]
    keep = ("in_distribution", "quality_reasons", "message", "similar")
    keep += ("request_id", "model_tag", "data_version", "disclaimer")
    return JSONResponse({**{key: r[key] for key in keep}, "k": k, "attribution": ATTRIBUTION})


@app.get(
    "/cases/{name:path}",
    summary="Thumbnail of a training case: /cases/<image_id>.jpg",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
        404: {
            "model": ApiErrorBody,
            "description": "no such training case (JSON); a path the router cannot match at all, e.g. one "
            "with control characters, gets the web framework's plain-text 404",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    },
)
async def case_thumbnail(name: str = FastApiPath(description="<image_id>.jpg, e.g. ISIC_0024306.jpg")) -> Response:
    """The JPEG thumbnail (``<image_id>.jpg``) of a training case returned by ``/similar``
    (HAM10000, CC BY-NC-SA 4.0)."""
    try:
        c = classifier()
    except ApiError as exc:
        return exc.response()
    image_id = name[: -len(".jpg")] if name.endswith(".jpg") else None
    jpeg = c.retrieval.thumbnail(image_id) if c.retrieval is not None and image_id else None
    if jpeg is None:
        return ApiError(404, "name", f"no training case {name!r} in this model's retrieval index").response()
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=86400"})


@app.post(
    "/gradcam",
    summary="Grad-CAM overlay of the predicted class",
    response_class=Response,
    responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}, **openapi.ERRORS},
    openapi_extra=openapi.image_request(batch=False),
)
async def gradcam_overlay(request: Request) -> Response:
    """The request of ``/classify``; a PNG of the image's own size with the Grad-CAM heatmap of the
    predicted class (header ``X-Gradcam-Class``)."""
    try:
        c = classifier()
        with c.gradcam_lane.place():  # refused here, before the body is read, when the lane is full
            items = await parse_request(request, c.vocab, batch=False)
            (field, data, meta), pixels = items[0], check_request_pixels(items)[0]
            rid = _request_ids(request, 1)[0]
            png, target = await c.gradcam_lane.run(c.gradcam_png, field, data, meta, pixels, rid)
    except ApiError as exc:
        return exc.response()
    except Exception:
        logger.exception("Grad-CAM failed")
        return _internal_error("computing Grad-CAM")
    return Response(png, media_type="image/png", headers={"X-Gradcam-Class": target, "Cache-Control": "no-store"})


@app.post(
    "/dispute",
    summary="Disagree with an answer",
    response_model=DisputeRecorded,
    responses=openapi.ERRORS,
    openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"schema": Dispute.model_json_schema()}}}
    },
)
async def dispute(request: Request) -> JSONResponse:
    """A clinician's diagnosis for an answer they disagree with (JSON: ``request_id`` of the answer,
    ``dx``, optional ``note``), recorded in the inference log: the image comes first in the next
    labelling queue (``lesionflow label queue --from log``)."""
    try:
        c = classifier()
        rid, dx, note = parse_dispute(await request.body(), c.classes["dx"])
        return JSONResponse(await anyio.to_thread.run_sync(c.dispute, rid, dx, note))
    except ApiError as exc:
        return exc.response()


@app.get("/model", summary="What is served: model, threshold, vocabularies, limits", response_model=ModelInfo)
async def model_info() -> JSONResponse:
    try:
        return JSONResponse(classifier().info())
    except ApiError as exc:
        return exc.response()


@app.get(
    "/health",
    summary="Readiness as JSON",
    response_model=Health,
    responses={503: {"model": Health, "description": "the model is still loading"}},
)
async def health() -> JSONResponse:
    try:
        c = classifier()
    except ApiError:
        return JSONResponse({"status": "loading", "ready": False, "model_tag": None}, status_code=503)
    return JSONResponse({"status": "ok", "ready": True, "model_tag": c.tag})


@app.get("/", include_in_schema=False)
async def web_page() -> FileResponse:
    """The clinicians' web page (``web/index.html``; its CSS/JS under ``/web/``)."""
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@app.get("/docs", include_in_schema=False)
async def api_docs() -> HTMLResponse:
    """The browsable API documentation (Swagger UI over ``/docs.json``)."""
    return HTMLResponse(openapi.DOCS_PAGE)


@app.get("/docs.json", include_in_schema=False)
async def api_spec() -> JSONResponse:
    """The OpenAPI document of every endpoint, with this model's vocabularies."""
    try:
        c = classifier()
    except ApiError as exc:
        return exc.response()
    return JSONResponse(openapi.document(app, c.vocab, c.info(), FIELDS))


app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
