"""What the service does with a request, without the web framework: the packaged model and
everything it answers with.

:class:`Classifier` is built once per worker from a packaged model folder
(:mod:`pipeline.model.bundle`). Its methods are the service's steps: :meth:`Classifier.prepare`
(decode and resize one image, in a request thread), :meth:`Classifier.predict_items` (one model
call for a batch of prepared images, through THE prediction path :mod:`pipeline.model.inference`),
:meth:`Classifier.finalise` (the one place a prediction becomes a response, and the inference log's
record), :meth:`Classifier.gradcam_png` and :meth:`Classifier.info`. The BentoML service
(:mod:`pipeline.serving.service`) holds one as ``classifier``; the HTTP routes
(:mod:`pipeline.serving.routes`) reach it typed, through :func:`pipeline.serving.routes.classifier`.
"""

from __future__ import annotations

import base64
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core import images
from pipeline.core.metadata import FIELDS
from pipeline.core.taxonomy import DIAGNOSIS_NAMES
from pipeline.model import bundle, engines, quality, sites
from pipeline.model.ood import MESSAGE as OOD_MESSAGE
from pipeline.model.retrieval import RetrievalError, RetrievalIndex
from pipeline.monitoring import logstore
from pipeline.monitoring.logrecord import Answer, dispute_record, to_line, uploaded_file_identity
from pipeline.serving.batching import Batcher
from pipeline.serving.explainer import Explainer
from pipeline.serving.limits import MAX_QUEUED, Lane, PixelGate
from pipeline.serving.logmetrics import LogMetrics
from pipeline.serving.logqueue import BackgroundLog
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

#: A prepared image: the model input (uint8 (3, H, W)), its metadata, and how many similar cases it asks for.
Item = tuple[np.ndarray, dict[str, Any], int | None]


def _settings() -> tuple[Any, Any]:
    """The ``serving`` and ``monitor`` sections of the params.yaml that applies (a Bento's own), or
    their defaults without one."""
    from pipeline.core import params, project
    from pipeline.core.servicesections import MonitorParams, ServingParams

    found = project.params_file()
    if found is None:
        return ServingParams(), MonitorParams()
    return params.load_section("serving", found), params.load_section("monitor", found)


class Classifier:
    """The packaged model at ``path`` (tag ``tag``) and what the service answers with."""

    disclaimer = DISCLAIMER

    def __init__(self, path: Path, tag: str, data_version: str, device: str = "cpu", threads: int | None = None):
        self.path, self.tag, self.data_version = Path(path), tag, data_version
        self.settings, monitor = _settings()
        self.operating_point = bundle.require_operating_point(self.path)
        self.sites = sites.load(self.path)  # the operating points per site (lesionflow site add)
        self.predictor = engines.load_predictor(self.path, ENGINE, device, threads)
        self.inference_log = BackgroundLog(
            self.path, logstore.location(), int(LOG_QUEUE_MB * (1 << 20)), metadata=monitor.log_metadata
        )
        self.vocab = vocabulary(self.predictor.config)
        self.retrieval = self._load_retrieval()
        self.classes = {lvl: list(self.predictor.taxonomy.classes(lvl)) for lvl in ("dx", "risk", "binary")}
        h, w = self.predictor.input_size
        self.input_shape = (3, h, w)
        self.batcher = Batcher(self.predict_items, MAX_BATCH_SIZE, MAX_QUEUED)
        self.gate = PixelGate()  # pixels decoded at once: bounded memory whatever the uploads
        self.gradcam_lane = Lane("Grad-CAM", route="/gradcam")  # off the threads that decode /classify's images
        self.explainer = Explainer(self.path, ENGINE)  # its process starts on the first /gradcam
        # warm-up: the first forward pass allocates
        self.predictor.predict(np.zeros((1, 3, h, w), dtype=np.uint8))

    @property
    def threshold(self) -> float:
        return self.operating_point.threshold

    def site(self, name: str | None) -> sites.Site | None:
        """The site a request names (None: the model's own operating point), or ApiError 422 naming
        the field for a site this model has no record of."""
        try:
            return sites.choose(self.sites, name)
        except sites.SiteError as exc:
            raise ApiError(422, sites.FIELD, str(exc)) from None

    def _load_retrieval(self) -> RetrievalIndex | None:
        """The model's index of similar confirmed training cases, when packaged with it."""
        if not (self.path / bundle.RETRIEVAL_DIR).is_dir():
            return None
        try:
            return RetrievalIndex.for_model(self.path)
        except RetrievalError as exc:
            logger.warning("similar cases disabled: %s", exc)
            return None

    # -- preprocessing (request threads) ------------------------------------------------------
    def decode(self, field: str, data: bytes, pixels: int) -> np.ndarray:
        """The image at its working size (:func:`pipeline.core.images.decode_rgb`), decoded when the
        worker's :class:`~pipeline.serving.limits.PixelGate` has room for the ``pixels`` its header
        declares; raises ApiError."""
        with self.gate.hold(pixels):
            return decode_image(data, field, self.predictor.size_limits)

    def prepare(
        self, field: str, data: bytes, meta: dict[str, Any], similar: int | None = None, pixels: int = 0
    ) -> tuple[Item, dict[str, Any]]:
        """Decode + resize one image; raises ApiError. Returns the model input and the request info
        (the metadata, the field, the image's size and byte count, the decoded image and the
        uploaded file: for :meth:`finalise`, never sent back)."""
        rgb = self.decode(field, data, pixels)
        u8 = self.predictor.resize_u8([rgb])[0]
        info = {**meta, "field": field, "width": int(rgb.shape[1]), "height": int(rgb.shape[0]), "bytes": len(data)}
        return (u8, meta, similar), {**info, "rgb": rgb, "data": data}

    # -- the model call (one batch) -----------------------------------------------------------
    def _similar(self, pred: dict[str, Any], items: list[Item]) -> dict[int, list[Any]]:
        """The similar cases each item asked for (none out of distribution), in one pass over the index."""
        inside, refused = pred["in_distribution"], pred.get("quality_reasons")
        wanted = [
            j for j, it in enumerate(items) if it[2] and (inside is None or inside[j]) and not (refused and refused[j])
        ]
        if not wanted or self.retrieval is None:
            return {}
        found = self.retrieval.query(pred["embeddings"][wanted], max(items[j][2] for j in wanted))
        return {j: cases[: items[j][2]] for j, cases in zip(wanted, found)}

    def predict_items(self, items: list[Item]) -> list[dict[str, Any]]:
        """Predict a batch of prepared images (the evaluated path); with an item's ``k``, its
        ``similar`` holds the k most similar training cases."""
        if not items:
            return []
        x = np.stack([it[0] for it in items])
        meta = {k: [it[1].get(k) for it in items] for k in FIELDS}
        pred = self.predictor.predict(x, metadata=meta)
        similar = self._similar(pred, items)
        return [
            {
                "dx": None if pred["dx_probs"] is None else pred["dx_probs"][j].tolist(),
                "risk": None if pred["risk_probs"] is None else pred["risk_probs"][j].tolist(),
                "binary": pred["binary_probs"][j].tolist(),
                "p_malignant": float(pred["p_malignant"][j]),
                "in_distribution": None if pred["in_distribution"] is None else bool(pred["in_distribution"][j]),
                "ood_score": None if pred["ood_score"] is None else float(pred["ood_score"][j]),
                "quality_reasons": None if pred.get("quality_reasons") is None else list(pred["quality_reasons"][j]),
                "embedding": pred["embeddings"][j],  # for the inference log; not sent back
                "similar": similar.get(j, []),  # retrieval.Case objects, made into JSON by finalise()
            }
            for j in range(len(items))
        ]

    def infer_items(self, items: list[InferItem]) -> list[dict[str, Any]]:
        """``/infer``: images already at the model's input size (uint8 (3, H, W), base64 ``pixels``)
        plus optional metadata; the class probabilities per item, or ``{"error": ...}`` for an item
        that is not a valid tensor (the other items are unaffected)."""
        out: list[dict[str, Any]] = [{} for _ in items]
        ok: list[int] = []
        batch: list[Item] = []
        for i, it in enumerate(items):
            try:
                batch.append(self._infer_item(it))
                ok.append(i)
            except ApiError as exc:
                out[i] = {"error": f"{exc.field}: {exc.message}"}
        for i, item, res in zip(ok, batch, self.predict_items(batch)):
            embedding = res.pop("embedding", None)
            res.pop("similar", None)
            out[i] = res
            info = {**item[1], "field": "pixels", "rgb": np.transpose(item[0], (1, 2, 0)), "route": "/infer"}
            prediction = {**res, **self._probabilities(res)}
            self.log_answer(info, prediction, embedding, uuid.uuid4().hex, statistics=False)  # a tensor, not an image
        return out

    def _infer_item(self, it: InferItem) -> Item:
        size = int(np.prod(self.input_shape))
        try:
            raw = base64.b64decode(it.pixels, validate=True)
        except (ValueError, TypeError):
            raise ApiError(422, "pixels", "not base64") from None
        if len(raw) != size:
            raise ApiError(422, "pixels", f"{len(raw)} bytes, expected {size} (uint8 {self.input_shape})")
        meta = validate_metadata({"age": it.age, "sex": it.sex, "localization": it.localization}, self.vocab)
        return np.frombuffer(raw, dtype=np.uint8).reshape(self.input_shape), meta, None

    # -- the one place a prediction becomes a response -----------------------------------------
    def similar_cases(self, cases: list[Any]) -> list[dict[str, Any]]:
        """The response entries of similar confirmed training cases, each with its diagnosis's name
        and its thumbnail's URL; other patients' age, sex and site only when
        ``serving.share_case_demographics``."""
        return [
            {
                **case.to_dict(demographics=self.settings.share_case_demographics),
                "diagnosis": DIAGNOSIS_NAMES.get(case.dx, case.dx),
                "thumbnail_url": f"/cases/{case.image_id}.jpg",
            }
            for case in cases
        ]

    def _probabilities(self, pred: dict[str, Any]) -> dict[str, Any]:
        dx, risk = pred.get("dx"), pred.get("risk")
        return {
            "dx_probabilities": None if dx is None else dict(zip(self.classes["dx"], dx)),
            "risk_probabilities": None if risk is None else dict(zip(self.classes["risk"], risk)),
            "binary_probabilities": dict(zip(self.classes["binary"], pred["binary"])),
            "p_malignant": float(pred["p_malignant"]),
        }

    def _verdict(self, pred: dict[str, Any], withheld: bool, site: sites.Site | None) -> dict[str, Any]:
        """The top classes and the referral decision at the operating point: the site's when the
        request names one (no decision at a site not suitable for the model), else the model's;
        none when withheld."""
        dx, risk = pred.get("dx"), pred.get("risk")
        point = self.operating_point if site is None else site.point(self.operating_point.positive_class)
        refer = point.refer(float(pred["p_malignant"]))
        undecided = withheld or (site is not None and not site.suitable)
        return {
            "dx_top": None if dx is None or withheld else self.classes["dx"][int(np.argmax(dx))],
            "risk_class": None if risk is None or withheld else self.classes["risk"][int(np.argmax(risk))],
            "site": None if site is None else site.name,
            "threshold": point.threshold,
            "refer": None if undecided else refer,
            "decision": None if undecided else (REFER if refer else NO_REFER),
        }

    def finalise(
        self, pred: dict[str, Any], request_info: dict[str, Any], similar: int | None = None, request_id: str = ""
    ) -> dict[str, Any]:
        """The response of one image. Every prediction of /classify, /classify_batch and /similar
        passes here exactly once, and here its answer goes to the inference log.

        An image refused by an image-quality check (:mod:`pipeline.model.quality`; ``quality_reasons``)
        or out of distribution gets no risk estimate: the probability fields, ``refer`` and
        ``decision`` are null, ``message`` says why, and the probabilities are kept under
        ``withheld_probabilities`` for API clients. ``similar``: add that many similar confirmed
        cases (none for an image out of distribution). A request naming a site (``site`` of
        ``request_info``) is decided at that site's threshold; at a site not suitable for the model
        the probabilities are given without a decision, and ``message`` says why."""
        probs = self._probabilities(pred)
        refused = pred.get("quality_reasons") or []
        withheld = bool(refused) or pred.get("in_distribution") is False
        site = self.site(request_info.get(sites.FIELD))
        ood = self.predictor.ood
        result = {
            "in_distribution": pred.get("in_distribution"),
            "ood_score": pred.get("ood_score"),
            "ood_threshold": None if ood is None else float(ood.threshold),
            "quality_reasons": pred.get("quality_reasons"),
            "message": _why_withheld(refused, pred.get("in_distribution") is False)
            or (None if site is None else site.message),
            **(dict.fromkeys(probs) if withheld else probs),
            **self._verdict(pred, withheld, site),
            "withheld_probabilities": probs if withheld else None,
            "similar": None if similar is None else ([] if withheld else self.similar_cases(pred.get("similar") or [])),
            "metadata": {k: request_info.get(k) for k in FIELDS},
            "request_id": request_id or uuid.uuid4().hex,
            "model_tag": self.tag,
            "data_version": self.data_version,
            "disclaimer": DISCLAIMER,
        }
        self.log_answer(request_info, {**result, **probs}, pred.get("embedding"), result["request_id"])
        return result

    def log_answer(
        self,
        request_info: dict[str, Any],
        prediction: dict[str, Any],
        embedding: Any,
        request_id: str,
        statistics: bool = True,
    ) -> None:
        """The inference log's record of one answer (:class:`~pipeline.serving.logqueue.BackgroundLog`):
        the route, the prediction (the probabilities even when withheld), the metadata, the uploaded
        file's sha256 and size (the file itself only with LESIONFLOW_LOG_IMAGES=1); statistics by the
        writer (``statistics=False``: none, for an explanation or a model-input tensor)."""
        data = request_info.get("data")
        sha256, nbytes = uploaded_file_identity(data)
        self.inference_log.submit(
            Answer(
                rgb=request_info["rgb"],
                prediction=prediction,
                model_tag=self.tag,
                metadata={k: request_info.get(k) for k in FIELDS},
                embedding=embedding,
                request_id=request_id,
                source=request_info.get("field"),
                image_bytes=data,  # the log keeps the file only with LESIONFLOW_LOG_IMAGES=1
                image_sha256=sha256,
                image_nbytes=nbytes,
                route=request_info.get("route"),
            ),
            statistics=statistics,
        )

    # -- Grad-CAM overlay of one image (the web page's /gradcam) ---------------------------------
    def gradcam_png(
        self, field: str, data: bytes, meta: dict[str, Any], pixels: int = 0, request_id: str = ""
    ) -> tuple[bytes, str]:
        """PNG bytes of the Grad-CAM overlay for the predicted native-level class, at the image's
        working size (the page scales it), and that class's name; raises ApiError for a bad image.
        The image is decoded here (the pixel gate bounds it); the overlay is computed by the
        Grad-CAM process (:mod:`pipeline.serving.explainer`), off this worker's interpreter lock."""
        rgb = self.decode(field, data, pixels)
        png, target = self.explainer.overlay(rgb, {k: [meta.get(k)] for k in FIELDS})
        shown = self.predictor.classes[target]
        info = {**meta, "field": field, "rgb": rgb, "data": data, "route": "/gradcam"}
        self.log_answer(info, {"explained_class": shown}, None, request_id or uuid.uuid4().hex, statistics=False)
        return png, shown

    def dispute(self, request_id: str, dx: str, note: str) -> dict[str, Any]:
        """``/dispute``: a clinician's diagnosis for an answer they disagree with, appended to the
        inference log (it puts the image first in the labelling queue) and counted on ``/metrics``
        (``lesionflow_disputes_total{state="written|failed"}``); ApiError 503 without a log."""
        target = self.inference_log.log
        if not target.enabled:
            raise ApiError(503, "request_id", "the inference log is off: a disagreement cannot be recorded")
        metrics = LogMetrics.get()
        try:
            logstore.append_line(str(target.location), *to_line(dispute_record(request_id, dx, note)))
        except OSError as exc:
            logger.warning("inference log: could not record the dispute of %s: %s", request_id, exc)
            if metrics is not None:
                metrics.disputes.labels("failed").inc()
            raise ApiError(503, "request_id", "the disagreement could not be recorded; try again", 5) from None
        if metrics is not None:
            metrics.disputes.labels("written").inc()
        return {"recorded": True, "request_id": request_id, "dx": dx}

    def info(self) -> dict[str, Any]:
        """``/model``: what is served, its threshold, vocabularies and limits."""
        p = self.predictor
        return {
            "model_tag": self.tag,
            "data_version": self.data_version,
            "threshold": self.threshold,
            "decision_rule": self.operating_point.rule,
            "sites": [site.summary() for site in self.sites.values()],
            "native_level": p.native_level,
            "classes": self.classes,
            "input_size": list(p.input_size),
            "tta": p.default_tta,
            "engine": p.engine,
            "input_limits": p.size_limits.to_dict(),
            "calibration": p.config.get("calibration"),
            "ood": p.config.get("ood"),
            "quality": p.config.get("quality"),
            "metadata_fields": {
                "age": f"number of years, {self.vocab.age_min:g}-{self.vocab.age_max:g}",
                "sex": list(self.vocab.sex) if self.vocab.sex is not None else "any text",
                "localization": list(self.vocab.localization) if self.vocab.localization is not None else "any text",
            },
            "uses_metadata": p.metadata_encoder is not None,
            "similar_cases": None
            if self.retrieval is None
            else {"index_size": len(self.retrieval), "k": self.retrieval.meta.get("k", 6), "route": "/similar"},
            "batching": self.batcher.stats(),
            "admission": {
                "decode_pixels": self.gate.capacity,
                "decode_refused": self.gate.refused,
                "gradcam_refused": self.gradcam_lane.refused,
                "gradcam_restarts": self.explainer.restarts,
            },  # fmt: skip
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


def _why_withheld(refused: list[str], outside: bool) -> str | None:
    """The answer's ``message``: the image-quality reasons, and whether it is out of distribution."""
    if refused:
        return quality.message(refused) + ("; it does not look like a dermoscopic image either" if outside else "")
    return OOD_MESSAGE if outside else None
