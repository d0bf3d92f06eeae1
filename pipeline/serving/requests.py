"""Requests to the service: parsing a multipart or raw-body request, validating its image and
metadata fields, and the one error type a client sees: a 4xx JSON ``{"error", "field", "status"}``
that names the field (400 bad or empty image, 413 too many bytes or pixels, 415 unsupported format
or Content-Type, 422 bad metadata or unknown field). Pure functions (no BentoML), tested without a
server."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from pipeline.core import images
from pipeline.core.formats import SizeLimits
from pipeline.core.metadata import FIELDS
from pipeline.core.params import MetadataParams
from pipeline.model.sites import FIELD as SITE
from pipeline.model.sites import HEADER as SITE_HEADER

MAX_IMAGE_BYTES = int(os.environ.get("LESIONFLOW_MAX_IMAGE_BYTES", str(20 * 1024 * 1024)))
MAX_IMAGE_PIXELS = int(os.environ.get("LESIONFLOW_MAX_IMAGE_PIXELS", str(images.MAX_PIXELS)))
MAX_BATCH_IMAGES = int(os.environ.get("LESIONFLOW_MAX_BATCH_IMAGES", "32"))
#: Largest request body of /classify_batch.
MAX_REQUEST_BYTES = int(os.environ.get("LESIONFLOW_MAX_REQUEST_BYTES", str(100 * 1024 * 1024)))
#: Pixels one request may ask the service to decode, summed over its images (as their headers declare).
MAX_REQUEST_PIXELS = int(os.environ.get("LESIONFLOW_MAX_REQUEST_PIXELS", str(64_000_000)))
MULTIPART_SLACK = 64 * 1024  # multipart framing + metadata fields on top of the image bytes
RAW_TYPES = ("application/octet-stream", "image/jpeg", "image/png", "image/jpg")
IMAGE_FIELDS = ("image", "file")
#: Query parameters that are options of the request, not metadata (``/classify?similar=6``).
QUERY_OPTIONS = ("similar", SITE)
MAX_SIMILAR = 50
_AGE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MetadataParams) if f.name in ("age_min", "age_max")}
#: A number as a form or query value: ASCII digits, optional sign and decimals (no "²", "٣", "1_0", "1e5").
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)", re.ASCII)
_MAX_NUMBER_CHARS = 24


class ApiError(Exception):
    """A client error: HTTP ``status``, the offending ``field`` and a message (``retry_after``:
    seconds, for a 503 that a client should retry)."""

    def __init__(self, status: int, field: str, message: str, retry_after: int | None = None):
        self.status, self.field, self.message, self.retry_after = status, field, message, retry_after
        super().__init__(f"{field}: {message}")

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(
            {"error": f"field '{self.field}': {self.message}", "field": self.field, "status": self.status},
            status_code=self.status,
            headers=headers,
        )


@dataclass(frozen=True)
class Vocabulary:
    """The metadata values a model accepts: ``sex`` and ``localization`` values (None: any text,
    for a model that records no vocabulary) and the age range."""

    sex: tuple[str, ...] | None
    localization: tuple[str, ...] | None
    age_min: float = _AGE_DEFAULTS["age_min"]
    age_max: float = _AGE_DEFAULTS["age_max"]
    unknown: str = "unknown"

    def values(self, name: str) -> tuple[str, ...] | None:
        return getattr(self, name)


def vocabulary(config: dict[str, Any]) -> Vocabulary:
    """The accepted metadata of a model: the ``metadata_vocabulary`` its config records (params.yaml's
    ``metadata`` section when it was trained), else its metadata encoder's (plus ``unknown``), else
    any text."""
    vocab = config.get("metadata_vocabulary")
    if vocab:
        return Vocabulary(
            tuple(vocab["sexes"]),
            tuple(vocab["localizations"]),
            float(vocab["age_min"]),
            float(vocab["age_max"]),
            vocab.get("unknown", "unknown"),
        )
    meta = (config.get("architecture") or {}).get("metadata")
    if meta:
        return Vocabulary(tuple(meta["sexes"]) + ("unknown",), tuple(meta["localizations"]) + ("unknown",))
    return Vocabulary(None, None)


def _age(raw: Any, vocab: Vocabulary, where: str) -> float | None:
    if raw is None or (isinstance(raw, str) and raw.strip() == ""):
        return None
    text = raw.strip() if isinstance(raw, str) else raw
    number = isinstance(text, (int, float)) and not isinstance(text, bool)
    if not number and not (isinstance(text, str) and len(text) <= _MAX_NUMBER_CHARS and _NUMBER.fullmatch(text)):
        shown = raw if not isinstance(raw, str) or len(raw) <= 40 else f"{raw[:40]}... ({len(raw)} characters)"
        raise ApiError(422, f"age{where}", f"must be a number of years (digits 0-9), got {shown!r}")
    value = float(text)
    if not math.isfinite(value) or not vocab.age_min <= value <= vocab.age_max:
        raise ApiError(
            422, f"age{where}", f"must be between {vocab.age_min:g} and {vocab.age_max:g} years, got {raw!r}"
        )
    return value


def validate_metadata(raw: dict[str, Any], vocab: Vocabulary, where: str = "") -> dict[str, Any]:
    """``{"age": float|None, "sex": str|None, "localization": str|None}`` or :class:`ApiError` (422)."""
    out: dict[str, Any] = {"age": _age(raw.get("age"), vocab, where), "sex": None, "localization": None}
    for name in ("sex", "localization"):
        value = raw.get(name)
        if value is None or (isinstance(value, str) and value.strip() == ""):
            continue
        if not isinstance(value, str):
            raise ApiError(422, f"{name}{where}", f"must be text, got {value!r}")
        norm = value.strip().lower()
        accepted = vocab.values(name)
        if accepted is not None and norm not in accepted:
            raise ApiError(422, f"{name}{where}", f"{value!r} is not accepted (accepted: {', '.join(accepted)})")
        out[name] = None if norm == vocab.unknown else norm
    return out


def similar_count(request: Request, default: int | None = None) -> int | None:
    """The ``similar`` query parameter: how many similar cases to return (None: not asked), or
    :class:`ApiError` (422) naming it."""
    raw = request.query_params.get("similar")
    if raw is None or raw == "":
        return default
    if len(raw) > 3 or not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_SIMILAR:
        shown = raw if len(raw) <= 20 else f"{raw[:20]}... ({len(raw)} characters)"
        raise ApiError(422, "similar", f"must be a whole number of cases from 1 to {MAX_SIMILAR}, got {shown!r}")
    return int(raw)


def check_request_pixels(items: list[tuple[str, bytes, Any]], budget: int = MAX_REQUEST_PIXELS) -> list[int]:
    """The pixels each image declares in its header (read without decoding), or :class:`ApiError`:
    the image's own problem (not an image, unsupported, over the per-image limit), or 413 when the
    request's images declare more than ``budget`` pixels in all."""
    declared = []
    for field, data, _ in items:
        _check_bytes(data, field)
        try:
            _, _, w, h = images.probe(data, field, max_pixels=MAX_IMAGE_PIXELS)
        except images.ImageError as exc:
            raise image_error(exc, field) from None
        declared.append(w * h)
    if sum(declared) > budget:
        raise ApiError(
            413, "image", f"the request's images declare {sum(declared):,} pixels in all, over the limit of {budget:,}"
        )
    return declared


def check_fields(keys: list[str], allowed: tuple[str, ...]) -> None:
    """:class:`ApiError` (422) naming the first field that is not ``allowed``."""
    unknown = sorted({k for k in keys if k not in allowed})
    if unknown:
        raise ApiError(422, unknown[0], f"unknown field (accepted: {', '.join(allowed)})")


def image_error(exc: images.ImageError, field: str) -> ApiError:
    """The HTTP status of an image problem: 415 unsupported format, 413 too large, 422 a size the
    model cannot judge (too small or too elongated), else 400."""
    reason = exc.reason
    if "unsupported format" in reason:
        status = 415
    elif "too large" in reason:
        status = 413
    elif "too small" in reason or "too elongated" in reason:
        status = 422
    else:
        status = 400
    return ApiError(status, field, reason)


def _check_bytes(data: bytes, field: str, max_bytes: int = MAX_IMAGE_BYTES) -> None:
    if len(data) > max_bytes:
        raise ApiError(413, field, f"image of {len(data):,} bytes exceeds the limit of {max_bytes:,} bytes")


def decode_image(
    data: bytes,
    field: str,
    limits: SizeLimits | None = None,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """(H, W, 3) uint8 via :func:`pipeline.core.images.decode_rgb`, checked against the model's
    size ``limits`` (:func:`pipeline.core.images.check_size`), or :class:`ApiError`."""
    _check_bytes(data, field, max_bytes)
    try:
        rgb = images.decode_rgb(data, field, max_pixels=max_pixels)
        if limits is not None:
            images.check_size(rgb, limits, field)
        return rgb
    except images.ImageError as exc:
        raise image_error(exc, field) from None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes without reading them all."""
    length = request.headers.get("content-length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise ApiError(413, "image", f"request body of {int(length):,} bytes exceeds the limit of {limit:,} bytes")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ApiError(413, "image", f"request body exceeds the limit of {limit:,} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette's form parser reads the cached body
    return body


def site_field(request: Request, form_values: list[Any] = ()) -> str | None:
    """The site a request names (``lesionflow site add``): the ``X-Lesionflow-Site`` header, the
    ``site`` query parameter or form field; None when it names none. :class:`ApiError` (422) when it
    is not text or the places disagree. Whether the model knows the site is the engine's question."""
    given = [request.headers.get(SITE_HEADER), request.query_params.get(SITE), *form_values]
    given = [v for v in given if v is not None and v != ""]
    if any(not isinstance(v, str) for v in given):
        raise ApiError(422, SITE, "must be a text form field, not a file")
    if len(set(given)) > 1:
        shown = ", ".join(repr(v[:64]) for v in dict.fromkeys(given))
        raise ApiError(422, SITE, f"named differently in the header, query and form ({shown}): name one site")
    return given[0] if given else None


async def _file_fields(form: Any, batch: bool, max_images: int) -> list[tuple[str, bytes]]:
    """``[(field name, bytes)]`` of the image fields of a multipart form (refusing none, too many
    or an empty one)."""
    files = [(k, v) for k in IMAGE_FIELDS for v in form.getlist(k)]
    if not files:
        raise ApiError(400, "image", "missing: send the image as a multipart file field named 'image'")
    if len(files) > max_images:
        raise ApiError(413, "image", f"{len(files)} images in one request (at most {max_images})")
    blobs = []
    for i, (name, f) in enumerate(files):
        field = f"{name}[{i}]" if batch else name
        data = f.encode("utf-8") if isinstance(f, str) else await f.read()  # a text field: refused when decoded
        if not data:
            raise ApiError(400, field, "empty file (0 bytes): send a JPEG or PNG image")
        blobs.append((field, data))
    return blobs


def _metadata_fields(form: Any, n: int) -> list[dict[str, Any]]:
    """The metadata of each of ``n`` images: a field given once applies to all, or once per image."""
    per_image: list[dict[str, Any]] = [{} for _ in range(n)]
    for key in FIELDS:
        values = form.getlist(key)
        if any(not isinstance(v, str) for v in values):
            raise ApiError(422, key, "must be a text form field, not a file")
        if len(values) == 1:
            for d in per_image:
                d[key] = values[0]
        elif len(values) == n and n > 1:
            for d, v in zip(per_image, values):
                d[key] = v
        elif values:
            raise ApiError(422, key, f"{len(values)} values for {n} image(s): give one for all or one per image")
    return per_image


async def _parse_multipart(request: Request, vocab: Vocabulary, batch: bool) -> list[tuple[str, bytes, dict[str, Any]]]:
    max_images = MAX_BATCH_IMAGES if batch else 1
    await read_body(request, min(MAX_IMAGE_BYTES * max_images, MAX_REQUEST_BYTES) + MULTIPART_SLACK)
    try:
        form = await request.form(max_files=max_images, max_fields=64, max_part_size=MAX_IMAGE_BYTES + 1)
    except Exception as exc:  # starlette's MultiPartException / HTTPException: malformed or too many parts
        detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
        raise ApiError(400, "image", f"malformed multipart request ({detail})") from None
    try:
        check_fields(list(form.keys()), IMAGE_FIELDS + FIELDS + (SITE,))
        site = site_field(request, form.getlist(SITE))
        blobs = await _file_fields(form, batch, max_images)
        metadata = _metadata_fields(form, len(blobs))
        return [
            (field, data, {**validate_metadata(raw, vocab, f"[{i}]" if batch else ""), SITE: site})
            for i, ((field, data), raw) in enumerate(zip(blobs, metadata))
        ]
    finally:
        await form.close()


async def parse_request(request: Request, vocab: Vocabulary, batch: bool) -> list[tuple[str, bytes, dict[str, Any]]]:
    """``[(field name, image bytes, validated metadata)]`` from a multipart or raw-body request; the
    metadata also holds the ``site`` the request names (:func:`site_field`)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in RAW_TYPES and not batch:
        body = await read_body(request, MAX_IMAGE_BYTES)
        query = {k: v for k, v in request.query_params.items() if k not in QUERY_OPTIONS}
        check_fields(list(query), FIELDS)
        if not body:
            raise ApiError(400, "image", "empty request body (0 bytes): send a JPEG or PNG image")
        return [("image", body, {**validate_metadata(query, vocab), SITE: site_field(request)})]
    if ctype != "multipart/form-data":
        accepted = "multipart/form-data" + ("" if batch else ", " + ", ".join(RAW_TYPES[:3]))
        raise ApiError(415, "image", f"unsupported Content-Type {ctype or '(none)'!r} (accepted: {accepted})")
    return await _parse_multipart(request, vocab, batch)


#: What a request id looks like (the service's own: 32 hex digits, ``-<k>`` within a batch), as
#: ``lesionflow logs forget`` takes it.
REQUEST_ID = re.compile(r"^[A-Za-z0-9-]{1,128}$")
MAX_NOTE = 500


def parse_dispute(body: bytes, diagnoses: list[str]) -> tuple[str, str, str]:
    """``(request_id, dx, note)`` of a ``/dispute`` body (JSON: ``request_id``, ``dx``, optional
    ``note``), or ApiError naming the field: 400 for a body that is not a JSON object, 422 for a bad value."""
    try:
        doc = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ApiError(400, "body", 'expected JSON: {"request_id": ..., "dx": ..., "note": ...}') from None
    if not isinstance(doc, dict):
        raise ApiError(400, "body", "expected a JSON object with request_id and dx")
    check_fields(list(doc), ("request_id", "dx", "note"))
    rid, dx, note = doc.get("request_id"), doc.get("dx"), doc.get("note", "")
    if not isinstance(rid, str) or not REQUEST_ID.match(rid):
        raise ApiError(422, "request_id", "expected the request_id of an answer (letters, digits, -)")
    if dx not in diagnoses:
        raise ApiError(422, "dx", f"expected one of {', '.join(diagnoses)}")
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise ApiError(422, "note", f"expected text of at most {MAX_NOTE} characters")
    return rid, dx, note
