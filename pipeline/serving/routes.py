"""The service's HTTP routes (a FastAPI app mounted into the BentoML service at ``/``) and its API
contract: ``GET /docs.json`` (the OpenAPI document of every endpoint, BentoML's included, with
request, response and error schemas) and ``GET /docs`` (a browsable page of it, Swagger UI from
BentoML's bundled assets: nothing is fetched from the internet). ``GET /`` stays the clinicians'
page (``web/``).

The handlers only translate HTTP: parsing and validation are :mod:`pipeline.serving.requests`,
predictions and responses :class:`pipeline.serving.service.LesionflowService` (reached through
``bentoml.get_current_service()``).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import anyio
import bentoml
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from pipeline.core.metadata import FIELDS
from pipeline.serving import openapi
from pipeline.serving.requests import ApiError, parse_request
from pipeline.serving.schemas import BatchClassification, Classification, Health, ModelInfo

logger = logging.getLogger("lesionflow.service")
WEB_DIR = Path(__file__).resolve().parent / "web"

app = FastAPI(title="lesionflow", docs_url=None, redoc_url=None, openapi_url=None)


def _internal_error(what: str) -> JSONResponse:
    return JSONResponse({"error": f"internal error while {what}; see the server log", "status": 500}, status_code=500)


async def _handle(request: Request, batch: bool) -> JSONResponse:
    svc: Any = bentoml.get_current_service()
    try:
        items = await parse_request(request, svc.vocab, batch)
        prepared = [await anyio.to_thread.run_sync(svc.prepare, field, data, meta) for field, data, meta in items]
    except ApiError as exc:
        return exc.response()
    try:
        preds = await asyncio.gather(*(svc.batcher.submit(item) for item, _ in prepared))
    except Exception:
        logger.exception("inference failed")
        return _internal_error("predicting")
    results = [svc.finalise(pred, info) for (_, info), pred in zip(prepared, preds)]
    if batch:
        return JSONResponse(
            {
                "results": results,
                "n": len(results),
                "model_tag": svc.tag,
                "data_version": svc.data_version,
                "disclaimer": svc.disclaimer,
            }
        )
    return JSONResponse(results[0])


@app.post(
    "/classify",
    summary="Classify one dermoscopic image",
    response_model=Classification,
    responses=openapi.ERRORS,
    openapi_extra=openapi.image_request(batch=False),
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
    openapi_extra=openapi.image_request(batch=True),
)
async def classify_batch(request: Request) -> JSONResponse:
    """Several images in one multipart request (repeated ``image`` fields; each metadata field
    given once for all or once per image); one result per image, in order."""
    return await _handle(request, batch=True)


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
    svc: Any = bentoml.get_current_service()
    try:
        field, data, meta = (await parse_request(request, svc.vocab, batch=False))[0]
        png, target = await anyio.to_thread.run_sync(svc.gradcam_png, field, data, meta)
    except ApiError as exc:
        return exc.response()
    except Exception:
        logger.exception("Grad-CAM failed")
        return _internal_error("computing Grad-CAM")
    return Response(png, media_type="image/png", headers={"X-Gradcam-Class": target, "Cache-Control": "no-store"})


@app.get("/model", summary="What is served: model, threshold, vocabularies, limits", response_model=ModelInfo)
async def model_info() -> JSONResponse:
    return JSONResponse(bentoml.get_current_service().info())


@app.get(
    "/health",
    summary="Readiness as JSON",
    response_model=Health,
    responses={503: {"model": Health, "description": "the model is still loading"}},
)
async def health() -> JSONResponse:
    svc: Any = bentoml.get_current_service()
    ready = svc.__is_ready__()
    return JSONResponse(
        {"status": "ok" if ready else "loading", "ready": ready, "model_tag": svc.tag},
        status_code=200 if ready else 503,
    )


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
    svc: Any = bentoml.get_current_service()
    return JSONResponse(openapi.document(app, svc.vocab, svc.info(), FIELDS))


app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
