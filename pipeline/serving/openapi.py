"""The OpenAPI document of the service (``GET /docs.json``) and its browsable page (``GET /docs``).

The paths of the service's own routes come from the FastAPI app (:mod:`pipeline.serving.routes`,
response models in :mod:`pipeline.serving.schemas`); the request bodies (multipart or a raw
image body, read by :mod:`pipeline.serving.requests`) are declared here, with the served model's
metadata vocabulary and age range filled in. BentoML's own endpoints (``/livez``, ``/healthz``,
``/readyz``, ``/metrics`` and the batchable ``/infer``) are declared as they answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from pipeline.serving.schemas import ApiErrorBody, InferItem, InferResult

_ERROR_TEXT = {
    400: "bad request: not an image, a truncated or empty image, a malformed multipart body",
    413: "too large: the image's bytes or pixels, the request body, or too many images",
    415: "unsupported image format or Content-Type",
    422: "invalid field: bad metadata value, unknown field, an image too small or too elongated to judge",
    500: "internal error (see the server log)",
}
#: The error responses of the routes that take an image (FastAPI ``responses``).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ApiErrorBody, "description": t} for code, t in _ERROR_TEXT.items()
}

_BINARY = {"type": "string", "format": "binary"}
_RAW_TYPES = ("application/octet-stream", "image/jpeg", "image/png")


def _metadata_properties() -> dict[str, Any]:
    return {
        "age": {"type": "number", "description": "age in years"},
        "sex": {"type": "string"},
        "localization": {"type": "string", "description": "body site"},
    }


def image_request(batch: bool, similar: bool = False) -> dict[str, Any]:
    """The ``requestBody`` (and query parameters) of a route that takes images: multipart with
    ``image`` (repeated for a batch) and optional metadata fields, or (one image) the raw body;
    ``similar``: the ``?similar=K`` option."""
    image = {"type": "array", "items": _BINARY, "minItems": 1} if batch else _BINARY
    content: dict[str, Any] = {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": image, **_metadata_properties()},
                "required": ["image"],
                "additionalProperties": False,
            },
            "encoding": {"image": {"contentType": "image/jpeg, image/png"}},
        }
    }
    extra: dict[str, Any] = {}
    if not batch:
        content.update({t: {"schema": _BINARY} for t in _RAW_TYPES})
        examples = {"age": 45, "sex": "female", "localization": "back"}
        extra["parameters"] = [
            {
                "name": k,
                "in": "query",
                "required": False,
                "schema": v,
                "description": f"{k} (with a raw image body)",
                "example": examples[k],
            }
            for k, v in _metadata_properties().items()
        ]
    if similar:
        extra.setdefault("parameters", []).append(
            {
                "name": "similar",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 50},
                "description": "add that many similar confirmed training cases (one per lesion)",
                "example": 6,
            }
        )
    return {"requestBody": {"required": True, "content": content}, **extra}


def _metadata_schemas(op: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(field, schema)`` of every metadata field of an operation: query parameters and multipart
    properties."""
    fields = ("age", "sex", "localization")
    found = [
        (p["name"], p["schema"]) for p in op.get("parameters", []) if p.get("in") == "query" and p["name"] in fields
    ]
    for media in op.get("requestBody", {}).get("content", {}).values():
        props = media.get("schema", {}).get("properties", {})
        found += [(k, props[k]) for k in fields if k in props]
    return found


def _with_vocabulary(spec: dict[str, Any], vocab: Any) -> None:
    """Fill the served model's vocabulary and age range into every metadata schema."""
    for item in spec.get("paths", {}).values():
        for op in item.values():
            for name, schema in _metadata_schemas(op):
                if name == "age":
                    schema.update(minimum=vocab.age_min, maximum=vocab.age_max)
                elif vocab.values(name) is not None:
                    schema["enum"] = list(vocab.values(name))


#: BentoML's own error body (its input validation on /infer).
_BENTOML_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {}},
    "required": ["error"],
}


def _text(description: str, media: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _infer_operation() -> dict[str, Any]:
    """BentoML's batchable ``POST /infer``."""
    items = {"type": "array", "items": {"$ref": "#/components/schemas/InferItem"}}
    body = {"type": "object", "properties": {"items": items}, "required": ["items"]}
    example = {"items": [{"pixels": "AAAA", "age": 45, "sex": "female"}]}
    return {
        "summary": "Batchable prediction of preprocessed images (BentoML adaptive batching)",
        "requestBody": {"required": True, "content": {"application/json": {"example": example, "schema": body}}},
        "responses": {
            "200": _json(
                {"type": "array", "items": {"$ref": "#/components/schemas/InferResult"}},
                "one result per item, in order",
            ),
            "400": _json(_BENTOML_ERROR, "the request does not match the input schema (BentoML's validation)"),
            "500": _json(_BENTOML_ERROR, "internal error"),
        },
    }


def _bentoml_paths(components: dict[str, Any]) -> dict[str, Any]:
    """BentoML's own endpoints, as they answer."""
    components["InferItem"] = InferItem.model_json_schema(ref_template="#/components/schemas/{model}")
    components["InferResult"] = InferResult.model_json_schema(ref_template="#/components/schemas/{model}")
    probe = {"200": _text("alive / ready"), "503": _text("not ready")}
    infra = {"tags": ["Infrastructure"]}
    return {
        "/livez": {"get": {**infra, "summary": "Liveness", "responses": probe}},
        "/healthz": {"get": {**infra, "summary": "Liveness (= /livez)", "responses": probe}},
        "/readyz": {"get": {**infra, "summary": "Readiness (model loaded)", "responses": probe}},
        "/metrics": {
            "get": {**infra, "summary": "Prometheus metrics", "responses": {"200": _text("Prometheus text format")}}
        },
        "/infer": {"post": _infer_operation()},
    }


def document(app: FastAPI, vocab: Any, info: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """The OpenAPI document served at ``/docs.json``."""
    spec = get_openapi(
        title="lesionflow skin-lesion classification",
        version=str(info.get("model_tag", "unknown")),
        summary="Research prototype: not a medical device, not for clinical use.",
        description=(
            "Classify dermoscopic images of skin lesions with the champion model "
            f"({info.get('model_tag')}, data version {info.get('data_version')}). Metadata fields: "
            f"{', '.join(fields)}. Errors are JSON `ApiErrorBody` objects naming the field."
        ),
        routes=app.routes,
    )
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    spec["paths"].update(_bentoml_paths(components))
    _with_vocabulary(spec, vocab)
    _with_security(spec)
    return spec


def _with_security(spec: dict[str, Any]) -> None:
    """Bearer tokens on every operation but the public ones (:mod:`pipeline.serving.guard`), with
    the 401 of a missing token and the 503 of a busy worker documented."""
    from pipeline.serving.guard import is_public

    spec["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API token (lesionflow token add NAME)"}
    }
    spec["security"] = [{"bearer": []}]
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ApiErrorBody"}}}
    for path, operations in spec["paths"].items():
        for op in operations.values():
            if is_public(path):
                op["security"] = []
                continue
            op["responses"].setdefault("401", {"description": "missing or unknown API token", "content": error})
            if op is operations.get("post"):
                op["responses"].setdefault("413", {"description": "body over its route's limit", "content": error})
                op["responses"].setdefault("503", {"description": "busy: retry after Retry-After s", "content": error})


#: Swagger UI over /docs.json with BentoML's bundled assets (served by BentoML at /static_content).
DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>lesionflow API</title>
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <link rel="stylesheet" href="/static_content/swagger-ui.css">
</head>
<body>
  <link rel="stylesheet" href="/web/app.css">
  <p class="docs-nav">lesionflow API &middot; <a href="/">clinician page</a>
     &middot; <a href="/docs.json">OpenAPI document</a> &middot; research prototype, not for clinical use</p>
  <div id="swagger-ui"></div>
  <script src="/static_content/swagger-ui-bundle.js"></script>
  <script src="/static_content/swagger-ui-standalone-preset.js"></script>
  <script src="/web/docs.js"></script>
</body>
</html>
"""
