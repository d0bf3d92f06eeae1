"""The BentoML service: classify a dermoscopic image with the champion model.

    bentoml serve pipeline.serving.service:LesionflowService --port 3000      # from the project root
    bentoml serve lesionflow:latest                                    # a built Bento

Endpoints (JSON responses):

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
* ``POST /infer``: a batchable BentoML API (BentoML's adaptive batching across requests) for
  programs that send images already preprocessed to the model's input size (base64 uint8
  tensors, JSON).

Adaptive batching of ``/classify`` and ``/classify_batch``: each request is decoded and resized
in a thread of its own, then queued for the model; whenever the model is free it takes every
queued image (at most ``$LESIONFLOW_MAX_BATCH_SIZE``, default 16) in one call
(:class:`pipeline.serving.batching.Batcher`). Request parsing and validation, and the 4xx errors,
are :mod:`pipeline.serving.requests`. This runs in the worker itself: routing every request through BentoML's
in-process HTTP proxy to the batchable ``/infer`` cost more than the model under load and
dropped connections (``ServerDisconnectedError``) at 32 concurrent clients. Both paths end in
:meth:`LesionflowService.predict_items`.
* ``GET /``: a web page for clinicians (``pipeline/serving/web/``: upload an image, see the answer of
  ``/classify`` and the overlay of ``/gradcam``). ``POST /gradcam``: the request of ``/classify``;
  answers a PNG, the image's own size, with the Grad-CAM heatmap (:mod:`pipeline.model.explain`) of the
  predicted class. ``GET /docs``: the browsable API documentation; ``GET /docs.json``: the OpenAPI
  document of every endpoint (:mod:`pipeline.serving.routes`, :mod:`pipeline.serving.openapi`).
* ``GET /model``: model tag, data version, threshold, classes, limits. ``GET /health``: JSON
  readiness (200 once the model is loaded and warmed up, else 503). BentoML's own ``/livez``
  (= ``/healthz``), ``/readyz`` (also reflects the model being loaded: ``__is_ready__``) and
  ``/metrics`` (Prometheus, including the adaptive batch sizes) are there too.

Bad input (empty body, not an image, truncated image, unsupported format, over the byte limit,
decompression bomb, wrong field types or values, unknown fields) gets a 4xx JSON error
``{"error": message, "field": name, "status": code}`` naming the field; never a 500.

Which model: ``$LESIONFLOW_MODEL_TAG``, else the Bento argument ``model_tag`` (set by
:func:`pipeline.serving.bento.build_bento`), else the champion of the model store
(:func:`pipeline.serving.registry.champion`: the newest packaged model unless a rollback named
another).
Limits: ``$LESIONFLOW_MAX_IMAGE_BYTES`` (default 20 MB), ``$LESIONFLOW_MAX_IMAGE_PIXELS``
(default :data:`pipeline.core.images.MAX_PIXELS`), ``$LESIONFLOW_MAX_BATCH_IMAGES`` (images per
``/classify_batch`` request, default 32), ``$LESIONFLOW_MAX_REQUEST_BYTES`` (body of a
``/classify_batch`` request, default 100 MB). Workers: ``$LESIONFLOW_WORKERS`` (default 1; the cores
are split between them, or ``$LESIONFLOW_TORCH_THREADS`` torch threads each). Inference engine:
``$LESIONFLOW_ENGINE`` (``auto``, the default: ONNX Runtime on the CPU, checked against the torch
model when the worker starts; ``torch``; ``onnx``; see :mod:`pipeline.model.inference`).
Preprocessing and prediction are :mod:`pipeline.model.inference`'s (the code that was evaluated).

Every prediction goes to the inference log for drift monitoring through
:class:`pipeline.serving.logqueue.BackgroundLog` (``$LESIONFLOW_INFERENCE_LOG``; a low-priority writer
process computes the image statistics, so answers never wait for it; at most
``$LESIONFLOW_LOG_QUEUE_MB`` (default 64) of images wait, beyond that records are dropped and
counted in ``/model``).
"""

from __future__ import annotations

import base64
import gc
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from pipeline.core import images, lineage
from pipeline.core.metadata import FIELDS
from pipeline.core.taxonomy import DIAGNOSIS_NAMES
from pipeline.core.workers import one_thread_per_worker
from pipeline.model.ood import MESSAGE as OOD_MESSAGE
from pipeline.model.retrieval import RetrievalError, RetrievalIndex
from pipeline.serving import routes
from pipeline.serving.batching import Batcher
from pipeline.serving.logqueue import BackgroundLog
from pipeline.serving.registry import MODEL_NAME, OPERATING_POINT_FILE, RETRIEVAL_DIR, champion
from pipeline.serving.requests import (
    MAX_BATCH_IMAGES,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_REQUEST_BYTES,
    ApiError,
    decode_image,
    validate_metadata,
    vocabulary,
)
from pipeline.serving.schemas import InferItem

logger = logging.getLogger("lesionflow.service")

#: Largest adaptive batch of model calls (on 2 CPU cores, EfficientNet-Lite0 is fastest per image
#: at 8-16 images; larger batches fall out of the caches and get slower).
MAX_BATCH_SIZE = int(os.environ.get("LESIONFLOW_MAX_BATCH_SIZE", "16"))
#: Worker processes; the CPU cores are shared between them (torch threads per worker).
WORKERS = int(os.environ.get("LESIONFLOW_WORKERS", "1"))
#: Inference engine (pipeline.model.inference.ENGINES).
ENGINE = os.environ.get("LESIONFLOW_ENGINE", "auto")
#: Images waiting for the inference log's writer process, at most (MB).
LOG_QUEUE_MB = float(os.environ.get("LESIONFLOW_LOG_QUEUE_MB", "64"))

DISCLAIMER = (
    "Research prototype, not a medical device: not for clinical use. The output is a statistical "
    "estimate from a model trained on HAM10000 dermoscopic images; it must not be used to diagnose, "
    "treat or rule out any condition. Any concern about a skin lesion needs a clinician."
)
REFER = "refer: malignancy probability at or above the operating threshold; a specialist should assess this lesion"
NO_REFER = "no referral indicated at this threshold"


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
        import torch

        from pipeline.model.inference import load_model

        self._ready = False
        threads = int(os.environ.get("LESIONFLOW_TORCH_THREADS", "0")) or max(
            1, len(os.sched_getaffinity(0)) // WORKERS
        )
        # numpy's BLAS on one thread: its calls here are small (the OOD whitening of a batch, the
        # retrieval query), and OpenBLAS's helper threads busy-wait between calls: under load one
        # of them took ~70% of a core from the model and the requests (p99 at 32 clients 310 -> 214 ms)
        one_thread_per_worker()
        torch.set_num_threads(threads)
        stored = self.bento_model
        self.path = Path(stored.path)
        self.tag = str(stored.tag)
        labels = dict(stored.info.labels)
        self.data_version = labels.get("data_md5", "unknown")
        op_file = self.path / OPERATING_POINT_FILE
        if not op_file.exists():
            raise RuntimeError(f"{op_file}: missing: package the model with pipeline.serving.registry.package")
        self.operating_point = json.loads(op_file.read_text())
        self.threshold = float(self.operating_point["threshold"])
        self.predictor = load_model(self.path, device="cpu" if not torch.cuda.is_available() else None, engine=ENGINE)
        self.inference_log = BackgroundLog(self.path, max_queue_bytes=int(LOG_QUEUE_MB * (1 << 20)))
        self.vocab = vocabulary(self.predictor.config)
        self.retrieval = self._load_retrieval()
        self.classes = {lvl: list(self.predictor.taxonomy.classes(lvl)) for lvl in ("dx", "risk", "binary")}
        h, w = self.predictor.input_size
        self._shape = (3, h, w)
        self.batcher = Batcher(self.predict_items, MAX_BATCH_SIZE)
        # warm-up: the first forward pass allocates; readiness only after it
        self.predictor.predict(torch.zeros((1, 3, h, w), dtype=torch.uint8))
        # the objects of startup (torch, pandas, BentoML, the model: about a million) never die:
        # keep them out of the garbage collector's full passes, which otherwise stalled every
        # answer in flight for ~180 ms every few seconds under load
        gc.collect()
        gc.freeze()
        self._ready = True
        logger.info(
            "lesionflow service: model %s (data %s), threshold %.4f, engine %s",
            self.tag,
            self.data_version,
            self.threshold,
            self.predictor.engine,
        )

    disclaimer = DISCLAIMER

    def _load_retrieval(self) -> RetrievalIndex | None:
        """The model's index of similar confirmed training cases, when packaged with it."""
        folder = self.path / RETRIEVAL_DIR
        if not folder.is_dir():
            return None
        try:
            return RetrievalIndex.load(folder, model_md5=lineage.file_md5(self.path / "model.pt"))
        except RetrievalError as exc:
            logger.warning("similar cases disabled: %s", exc)
            return None

    @bentoml.on_shutdown
    def flush_inference_log(self) -> None:
        """On shutdown (SIGTERM of a rolling update or scale-down): write every queued record, put
        the buffered object-store segment and end the log's writer process, so that no answered
        request is missing from the log."""
        if not self.inference_log.close(timeout=20):
            logger.warning("inference log: records still queued at shutdown: %s", self.inference_log.counters())

    def __is_ready__(self) -> bool:
        return bool(getattr(self, "_ready", False))

    # -- preprocessing (request threads) ------------------------------------------------------
    def prepare(
        self, field: str, data: bytes, meta: dict[str, Any], similar: int | None = None
    ) -> tuple[tuple[np.ndarray, dict, int | None], dict[str, Any]]:
        """Decode + resize one image (pipeline.core.images + pipeline.model.inference); raises ApiError.
        Returns the model input ``(uint8 (3, H, W) array, metadata, similar cases wanted)`` and the
        request info."""
        rgb = decode_image(data, field, self.predictor.size_limits)
        u8 = self.predictor.resize([rgb])[0].numpy()
        info = {
            **meta,
            "field": field,
            "width": int(rgb.shape[1]),
            "height": int(rgb.shape[0]),
            "bytes": len(data),
            "rgb": rgb,
            "data": data,
        }  # the decoded image and the uploaded file, for the monitoring hook in finalise() (not sent back)
        return (u8, meta, similar), info

    # -- the model call (one batch) -----------------------------------------------------------
    def predict_items(self, items: list[tuple[np.ndarray, dict[str, Any], int | None]]) -> list[dict[str, Any]]:
        """Predict a batch of preprocessed images with pipeline.model.inference (the evaluated path);
        each item is ``(uint8 (3, H, W) array, metadata, k)``: with ``k``, the result's ``similar``
        holds the k most similar training cases (none for an image out of distribution), found for
        the whole batch in one pass over the index."""
        import pandas as pd
        import torch

        if not items:
            return []
        x = torch.from_numpy(np.stack([it[0] for it in items]))
        meta = pd.DataFrame([{k: it[1].get(k) for k in FIELDS} for it in items])
        pred = self.predictor.predict(x, metadata=meta)
        inside = pred["in_distribution"]
        wanted = [j for j, it in enumerate(items) if it[2] and (inside is None or inside[j])]
        similar: dict[int, list[Any]] = {}
        if wanted and self.retrieval is not None:
            found = self.retrieval.query(pred["embeddings"][wanted], max(items[j][2] for j in wanted))
            similar = {j: cases[: items[j][2]] for j, cases in zip(wanted, found)}
        return [
            {
                "dx": None if pred["dx_probs"] is None else pred["dx_probs"][j].tolist(),
                "risk": None if pred["risk_probs"] is None else pred["risk_probs"][j].tolist(),
                "binary": pred["binary_probs"][j].tolist(),
                "p_malignant": float(pred["p_malignant"][j]),
                "in_distribution": None if pred["in_distribution"] is None else bool(pred["in_distribution"][j]),
                "ood_score": None if pred["ood_score"] is None else float(pred["ood_score"][j]),
                "embedding": pred["embeddings"][j],  # penultimate embedding (numpy), for monitoring; not sent back
                "similar": similar.get(j, []),  # retrieval.Case objects, made into JSON by finalise()
            }
            for j in range(len(items))
        ]

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=60000, route="/infer")
    def infer(self, items: list[InferItem]) -> list[dict[str, Any]]:
        """Batch API for programs (BentoML adaptive batching across requests): each item is an
        image already preprocessed to the model's input size (uint8 (3, H, W), base64 ``pixels``)
        plus optional metadata; returns the class probabilities per item, or ``{"error": ...}``
        for an item that is not a valid tensor (the other items of the batch are unaffected)."""
        out: list[dict[str, Any]] = [{} for _ in items]
        ok: list[int] = []
        batch: list[tuple[np.ndarray, dict[str, Any]]] = []
        size = int(np.prod(self._shape))
        for i, it in enumerate(items):
            try:
                raw = base64.b64decode(it.pixels, validate=True)
            except (ValueError, TypeError):
                out[i] = {"error": "pixels: not base64"}
                continue
            if len(raw) != size:
                out[i] = {"error": f"pixels: {len(raw)} bytes, expected {size} (uint8 {self._shape})"}
                continue
            try:
                meta = validate_metadata({"age": it.age, "sex": it.sex, "localization": it.localization}, self.vocab)
            except ApiError as exc:
                out[i] = {"error": f"{exc.field}: {exc.message}"}
                continue
            ok.append(i)
            batch.append((np.frombuffer(raw, dtype=np.uint8).reshape(self._shape), meta, None))
        for i, res in zip(ok, self.predict_items(batch)):
            res.pop("embedding", None)
            res.pop("similar", None)
            out[i] = res
        return out

    # -- the one place a prediction becomes a response -----------------------------------------
    @staticmethod
    def similar_cases(cases: list[Any]) -> list[dict[str, Any]]:
        """The response entries of similar confirmed training cases (:class:`pipeline.model.retrieval.Case`),
        each with its diagnosis's name and its thumbnail's URL."""
        return [
            {
                **case.to_dict(),
                "diagnosis": DIAGNOSIS_NAMES.get(case.dx, case.dx),
                "thumbnail_url": f"/cases/{case.image_id}.jpg",
            }
            for case in cases
        ]

    def finalise(
        self, pred: dict[str, Any], request_info: dict[str, Any], similar: int | None = None
    ) -> dict[str, Any]:
        """Build the response of one image. Every prediction of /classify and /classify_batch
        passes here exactly once: the place to append it to the inference log for drift
        monitoring. ``pred`` also holds the penultimate ``embedding``; ``request_info`` holds the
        validated metadata, the decoded ``rgb`` image, the uploaded file (``data``), its size and
        byte count.

        An image out of distribution gets no risk estimate: the probability fields, ``refer`` and
        ``decision`` are null, ``message`` says why, and the probabilities are kept under
        ``withheld_probabilities`` for API clients. ``similar``: add that many similar confirmed
        cases (none for an image out of distribution)."""
        p_mal = float(pred["p_malignant"])
        dx, risk = pred.get("dx"), pred.get("risk")
        probs = {
            "dx_probabilities": None if dx is None else dict(zip(self.classes["dx"], dx)),
            "risk_probabilities": None if risk is None else dict(zip(self.classes["risk"], risk)),
            "binary_probabilities": dict(zip(self.classes["binary"], pred["binary"])),
            "p_malignant": p_mal,
        }
        inside = pred.get("in_distribution")
        withheld = inside is False
        refer = bool(p_mal >= self.threshold)
        ood = self.predictor.ood
        result = {
            "in_distribution": inside,
            "ood_score": pred.get("ood_score"),
            "ood_threshold": None if ood is None else float(ood.threshold),
            "message": OOD_MESSAGE if withheld else None,
            **(dict.fromkeys(probs) if withheld else probs),
            "dx_top": None if dx is None or withheld else self.classes["dx"][int(np.argmax(dx))],
            "risk_class": None if risk is None or withheld else self.classes["risk"][int(np.argmax(risk))],
            "threshold": self.threshold,
            "refer": None if withheld else refer,
            "decision": None if withheld else (REFER if refer else NO_REFER),
            "withheld_probabilities": probs if withheld else None,
            "similar": None if similar is None else ([] if withheld else self.similar_cases(pred.get("similar") or [])),
            "metadata": {k: request_info.get(k) for k in FIELDS},
            "model_tag": self.tag,
            "data_version": self.data_version,
            "disclaimer": DISCLAIMER,
        }
        # drift monitoring: image statistics, metadata and prediction (the probabilities even when
        # withheld; never the image, unless LESIONFLOW_LOG_IMAGES=1) go to the inference log,
        # written by a low-priority writer process; logging never fails or delays a request
        self.inference_log.submit(
            request_info["rgb"],
            result["metadata"],
            {**result, **probs, "embedding": pred.get("embedding")},
            self.tag,
            source=request_info.get("field"),
            image_bytes=request_info.get("data") if self.inference_log.log.store_images else None,
        )
        return result

    # -- Grad-CAM overlay of one image (the web page's /gradcam) ---------------------------------
    _explain_lock = threading.Lock()

    def gradcam_png(self, field: str, data: bytes, meta: dict[str, Any]) -> tuple[bytes, str]:
        """PNG bytes of :func:`pipeline.model.explain.overlay` of :func:`pipeline.model.explain.gradcam` for the
        predicted native-level class (as :meth:`predict_items` predicts it), at the image's own size,
        and that class's name; raises ApiError for a bad image. Runs on a private copy of the model
        (Grad-CAM hooks must not see the batcher's forward passes), one image at a time."""
        import io

        import pandas as pd
        from PIL import Image

        from pipeline.model import explain

        rgb = decode_image(data, field, self.predictor.size_limits)
        frame = pd.DataFrame([{k: meta.get(k) for k in FIELDS}])
        with self._explain_lock:
            if getattr(self, "_explainer", None) is None:
                self._explainer = self.predictor.clone(engine="torch")
            pred = self._explainer.predict([rgb], metadata=frame)
            target = int(np.argmax(pred["native_probs"][0]))
            heat = explain.gradcam(self._explainer, rgb, target_class=target, metadata=frame)
        buf = io.BytesIO()
        Image.fromarray(explain.overlay(rgb, heat)).save(buf, format="PNG")
        return buf.getvalue(), self.predictor.classes[target]

    def info(self) -> dict[str, Any]:
        return {
            "model_tag": self.tag,
            "data_version": self.data_version,
            "threshold": self.threshold,
            "decision_rule": self.operating_point.get("rule", "refer if p_malignant >= threshold"),
            "native_level": self.predictor.native_level,
            "classes": self.classes,
            "input_size": list(self.predictor.input_size),
            "tta": self.predictor.default_tta,
            "engine": self.predictor.engine,
            "input_limits": self.predictor.size_limits.to_dict(),
            "calibration": self.predictor.config.get("calibration"),
            "ood": self.predictor.config.get("ood"),
            "metadata_fields": {
                "age": f"number of years, {self.vocab.age_min:g}-{self.vocab.age_max:g}",
                "sex": list(self.vocab.sex) if self.vocab.sex is not None else "any text",
                "localization": list(self.vocab.localization) if self.vocab.localization is not None else "any text",
            },
            "uses_metadata": self.predictor.metadata_encoder is not None,
            "similar_cases": None
            if self.retrieval is None
            else {"index_size": len(self.retrieval), "k": self.retrieval.meta.get("k", 6), "route": "/similar"},
            "batching": self.batcher.stats(),
            "inference_log": {"enabled": self.inference_log.enabled, **self.inference_log.counters()},
            "limits": {
                "max_image_bytes": MAX_IMAGE_BYTES,
                "max_image_pixels": MAX_IMAGE_PIXELS,
                "max_request_bytes": MAX_REQUEST_BYTES,
                "max_batch_images": MAX_BATCH_IMAGES,
                "formats": list(images.FORMATS),
            },
            "disclaimer": DISCLAIMER,
        }
