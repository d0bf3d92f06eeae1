"""The BentoML service: classify a dermoscopic image with the champion model.

    bentoml serve pipeline.serving.service:LesionflowService --port 3000      # from the project root
    bentoml serve lesionflow:latest                                    # a built Bento

Endpoints (JSON responses; the handlers are :mod:`pipeline.serving.routes`, what they do with a
request :class:`pipeline.serving.engine.Classifier`; a Python client is
:class:`pipeline.serving.client.LesionflowClient`):

* ``POST /classify``: one image, as a multipart file (field ``image``, plus optional form fields
  ``age``, ``sex``, ``localization``) or as the raw request body (``Content-Type:
  application/octet-stream``, ``image/jpeg`` or ``image/png``; metadata as query parameters,
  ``/classify?age=45&sex=female``). JPEG or PNG of any size. Returns the 7 diagnosis
  probabilities, the risk class and its probabilities, the malignancy probability and the
  referral decision at the model's operating threshold, the model tag, the data version and a
  disclaimer. An image the model cannot judge (its out-of-distribution check,
  :mod:`pipeline.model.ood`) gets ``in_distribution: false``, a message and no risk estimate or
  decision; its probabilities stay under ``withheld_probabilities``.
* ``POST /classify_batch``: several images in one multipart request (repeated ``image`` fields;
  metadata fields given once for all or once per image), same result per image.
* ``POST /similar`` (or ``?similar=K``): the most similar confirmed training cases;
  ``GET /cases/<image_id>.jpg`` their thumbnails.
* ``POST /infer``: a batchable BentoML API (BentoML's adaptive batching across requests) for
  programs that send images already preprocessed to the model's input size (base64 uint8
  tensors, JSON).
* ``GET /``: a web page for clinicians (``web/``). ``POST /gradcam``: the request of
  ``/classify``; a PNG of the image's own size with the Grad-CAM heatmap of the predicted class.
  ``GET /docs`` and ``GET /docs.json``: the API documentation and its OpenAPI document.
* ``GET /model``: model tag, data version, threshold, classes, limits. ``GET /health``: JSON
  readiness (200 once the model is loaded and warmed up, else 503). BentoML's own ``/livez``,
  ``/readyz`` (also reflects the model being loaded: ``__is_ready__``) and ``/metrics``.

Adaptive batching of ``/classify`` and ``/classify_batch``: each request is decoded and resized in a
thread of its own, then queued for the model; whenever the model is free it takes every queued
image (at most ``$LESIONFLOW_MAX_BATCH_SIZE``, default 16) in one call
(:class:`pipeline.serving.batching.Batcher`). Bad input gets a 4xx JSON error
``{"error": message, "field": name, "status": code}`` naming the field; never a 500.

Which model: ``$LESIONFLOW_MODEL_TAG``, else the Bento argument ``model_tag`` (set by
:func:`pipeline.registry.bento.build_bento`), else the champion of the model store
(:func:`pipeline.registry.champions.champion`). Limits: ``$LESIONFLOW_MAX_IMAGE_BYTES``,
``$LESIONFLOW_MAX_IMAGE_PIXELS``, ``$LESIONFLOW_MAX_BATCH_IMAGES``, ``$LESIONFLOW_MAX_REQUEST_BYTES``
(:mod:`pipeline.serving.requests`). Workers: ``$LESIONFLOW_WORKERS`` (default 1; the cores are split
between them, or ``$LESIONFLOW_THREADS`` threads each). Inference engine: ``$LESIONFLOW_ENGINE``
(``auto``: ONNX Runtime on the packaged ``model.onnx``, without importing torch:
:func:`pipeline.model.runtime.load_packaged`); ``$LESIONFLOW_DEVICE=cuda`` serves with torch on a GPU.

Every answer goes to the inference log for audit and drift monitoring, at
:func:`pipeline.monitoring.logstore.location` (``$LESIONFLOW_INFERENCE_LOG``, else ``monitor.log_url``
of the params.yaml packaged with the Bento): its record written by the request before the answer is
sent, its image statistics by a low-priority writer process
(:class:`pipeline.serving.logqueue.BackgroundLog`).
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import bentoml

from pipeline.core.workers import one_thread_per_worker, return_freed_memory
from pipeline.registry.champions import champion
from pipeline.registry.store import MODEL_NAME
from pipeline.serving import routes
from pipeline.serving.engine import MAX_BATCH_SIZE, Classifier
from pipeline.serving.guard import Guard, route_label
from pipeline.serving.schemas import InferItem

logger = logging.getLogger("lesionflow.service")

#: Worker processes; the CPU cores are shared between them (model threads per worker).
WORKERS = int(os.environ.get("LESIONFLOW_WORKERS", "1"))


def label_metrics_by_route() -> None:
    """BentoML labels its request metrics with the raw path, read before any middleware of ours
    runs: every path a client invents (``/cases/x1.jpg``, ``/x2``) would add a series set to
    ``/metrics``, without bound. This swaps its metrics middleware for one that labels a request
    by its route (:func:`pipeline.serving.guard.route_label`) and hands the real path on. A
    BentoML without that middleware is left alone (the test of bounded labels then fails)."""
    try:
        from bentoml._internal.server.http import instruments
    except ImportError:
        return
    base = getattr(instruments, "RunnerTrafficMetricsMiddleware", None)
    if base is None or getattr(base, "labels_by_route", False):
        return

    class ByRoute(base):  # type: ignore[misc, valid-type]
        labels_by_route = True

        def __init__(self, app: Any, **options: Any):
            async def real_path(scope: dict, receive: Any, send: Any) -> None:
                if "lesionflow.path" in scope:
                    scope = {**scope, "path": scope["lesionflow.path"]}
                await app(scope, receive, send)

            super().__init__(real_path, **options)

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope.get("type") == "http":
                scope = {**scope, "path": route_label(scope["path"]), "lesionflow.path": scope["path"]}
            await super().__call__(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = ByRoute


label_metrics_by_route()


def model_tag() -> str:
    """The model this service serves (see the module docstring)."""
    env = os.environ.get("LESIONFLOW_MODEL_TAG", "").strip()
    if env:
        return env
    try:
        tag = getattr(bentoml.use_arguments(), "model_tag", None)
    except Exception:  # no Bento arguments in this context
        tag = None
    if tag:
        return str(tag)
    champ = champion()  # rollbacks included
    return champ["tag"] if champ else f"{MODEL_NAME}:latest"


@bentoml.service(
    name="lesionflow",
    workers=WORKERS,
    traffic={"timeout": 60},
    http={"cors": {"enabled": False}},
)
@bentoml.asgi_app(routes.app, path="/")
class LesionflowService:
    """Skin-lesion classification with the champion model (see the module docstring)."""

    bento_model = bentoml.models.BentoModel(model_tag())

    def __init__(self) -> None:
        self.classifier: Classifier | None = None
        threads = int(os.environ.get("LESIONFLOW_THREADS", "0") or 0) or max(1, len(os.sched_getaffinity(0)) // WORKERS)
        # numpy's BLAS on one thread: its calls here are small (the OOD whitening of a batch, the
        # retrieval query), and OpenBLAS's helper threads busy-wait between calls: under load one
        # of them took ~70% of a core from the model and the requests (p99 at 32 clients 310 -> 214 ms)
        one_thread_per_worker()
        # a burst of large uploads must not leave the worker hundreds of MB larger (docs/security.md)
        return_freed_memory()
        stored = self.bento_model
        classifier = Classifier(
            Path(stored.path),
            str(stored.tag),
            dict(stored.info.labels).get("data_md5", "unknown"),
            device=os.environ.get("LESIONFLOW_DEVICE", "cpu"),
            threads=threads,
        )
        # the objects of startup (BentoML, the model: several hundred thousand) never die:
        # keep them out of the garbage collector's full passes, which otherwise stalled every
        # answer in flight for ~180 ms every few seconds under load
        gc.collect()
        gc.freeze()
        self.classifier = classifier  # ready from here on
        logger.info(
            "lesionflow service: model %s (data %s), threshold %.4f, engine %s, inference log %s",
            classifier.tag,
            classifier.data_version,
            classifier.threshold,
            classifier.predictor.engine,
            classifier.inference_log.log.location or "off",
        )

    @bentoml.on_shutdown
    def flush_inference_log(self) -> None:
        """On shutdown (SIGTERM of a rolling update or scale-down): write every queued record, put
        the buffered object-store segment and end the log's writer process and the Grad-CAM process."""
        if self.classifier is None:
            return
        self.classifier.explainer.close()
        log = self.classifier.inference_log
        if not log.close(timeout=20):
            logger.warning("inference log: records still queued at shutdown: %s", log.counters())

    def __is_ready__(self) -> bool:
        return getattr(self, "classifier", None) is not None

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=60000, route="/infer")
    def infer(self, items: list[InferItem]) -> list[dict[str, Any]]:
        """Batch API for programs (BentoML adaptive batching across requests): each item is an
        image already preprocessed to the model's input size (uint8 (3, H, W), base64 ``pixels``)
        plus optional metadata; returns the class probabilities per item, or ``{"error": ...}``
        for an item that is not a valid tensor (the other items of the batch are unaffected)."""
        assert self.classifier is not None
        return self.classifier.infer_items(items)


# authentication, bounded bodies, request ids and security headers on every request (BentoML's
# /infer included): pipeline.serving.guard
LesionflowService.add_asgi_middleware(Guard)
