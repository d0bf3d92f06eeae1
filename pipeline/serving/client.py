"""A Python client of the lesionflow service, with typed results.

    from pipeline.serving.client import LesionflowClient

    with LesionflowClient("http://127.0.0.1:3000") as client:
        r = client.classify(Path("lesion.jpg"), age=55, sex="male", localization="back", similar=6)
        r.p_malignant, r.refer, r.decision, r.dx_probabilities, r.similar
        batch = client.classify_batch([Path("a.jpg"), Path("b.png")])       # .results, one per image
        cases = client.similar(Path("lesion.jpg"), k=6)                     # .similar, .attribution
        png, predicted = client.gradcam(Path("lesion.jpg"))                  # overlay PNG bytes, class
        client.model().threshold, client.health().ready

Results are the service's own response models (:mod:`pipeline.serving.schemas`: the ones its
OpenAPI document at ``/docs.json`` describes), validated on arrival. A request the service refuses
raises :class:`ApiRequestError` with its status and the field it names. Images are files (a
``Path``) or bytes (JPEG or PNG).

Why not ``bentoml.SyncHTTPClient``: BentoML's client sees the service's ``@bentoml.api`` methods
only, which here is the batchable ``/infer`` for preprocessed tensors; ``/classify`` and the other
routes take multipart forms and raw image bodies (what a browser, ``curl`` and other languages
send), so they are routes of the service's web app, which BentoML's client does not list.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from pipeline.serving.schemas import BatchClassification, Classification, Health, ModelInfo, SimilarCases

Image = Path | bytes


class ApiRequestError(Exception):
    """The service refused a request: ``status`` (HTTP), ``field`` (the part of the request it
    names, when it names one) and the service's ``message``."""

    def __init__(self, status: int, message: str, field: str | None = None):
        self.status, self.message, self.field = status, message, field
        super().__init__(f"{status}: {message}" + (f" (field {field!r})" if field else ""))


def _part(image: Image, name: str = "image") -> tuple[str, tuple[str, bytes, str]]:
    data = image.read_bytes() if isinstance(image, Path) else bytes(image)
    kind = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    filename = image.name if isinstance(image, Path) else f"image.{kind.split('/')[1]}"
    return name, (filename, data, kind)


def _metadata(age: float | None = None, sex: str | None = None, localization: str | None = None) -> dict[str, str]:
    given = {"age": age, "sex": sex, "localization": localization}
    return {k: str(v) for k, v in given.items() if v is not None}


class LesionflowClient:
    """A lesionflow service at ``url`` (``token``: its API token, sent as ``Authorization: Bearer``)."""

    def __init__(self, url: str = "http://127.0.0.1:3000", token: str | None = None, timeout: float = 60.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> LesionflowClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, method: str, route: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, route, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {"error": response.text.strip() or response.reason_phrase}
            raise ApiRequestError(response.status_code, str(body.get("error", body)), body.get("field"))
        return response

    def classify(
        self,
        image: Image,
        *,
        age: float | None = None,
        sex: str | None = None,
        localization: str | None = None,
        similar: int | None = None,
    ) -> Classification:
        """``POST /classify``: the diagnosis and risk probabilities and the referral decision (withheld
        for an image the model cannot judge); with ``similar``, that many similar confirmed cases."""
        params = {"similar": similar} if similar is not None else None
        r = self._send("POST", "/classify", files=[_part(image)], data=_metadata(age, sex, localization), params=params)
        return Classification.model_validate(r.json())

    def classify_batch(
        self,
        images: Sequence[Image],
        *,
        age: float | None = None,
        sex: str | None = None,
        localization: str | None = None,
    ) -> BatchClassification:
        """``POST /classify_batch``: one result per image, in order (metadata given once for all)."""
        r = self._send(
            "POST", "/classify_batch", files=[_part(i) for i in images], data=_metadata(age, sex, localization)
        )
        return BatchClassification.model_validate(r.json())

    def similar(self, image: Image, *, k: int | None = None, **metadata: Any) -> SimilarCases:
        """``POST /similar``: the ``k`` most similar confirmed training lesions (the index's default)."""
        params = {"similar": k} if k is not None else None
        r = self._send("POST", "/similar", files=[_part(image)], data=_metadata(**metadata), params=params)
        return SimilarCases.model_validate(r.json())

    def gradcam(self, image: Image, **metadata: Any) -> tuple[bytes, str]:
        """``POST /gradcam``: the Grad-CAM overlay (PNG bytes) and the class it explains."""
        r = self._send("POST", "/gradcam", files=[_part(image)], data=_metadata(**metadata))
        return r.content, r.headers.get("X-Gradcam-Class", "")

    def model(self) -> ModelInfo:
        """``GET /model``: what is served, its threshold, vocabularies and limits."""
        return ModelInfo.model_validate(self._send("GET", "/model").json())

    def health(self) -> Health:
        """``GET /health``: whether the model is loaded (a 503 while it loads is returned, not raised)."""
        response = self._http.get("/health")
        return Health.model_validate(response.json())
