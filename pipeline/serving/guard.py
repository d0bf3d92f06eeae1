"""What every request to the service passes first (an ASGI middleware around the routes and
BentoML's ``/infer``), before a byte of it is parsed:

* **authentication**: ``Authorization: Bearer <token>`` (:mod:`pipeline.serving.auth`) on every
  route except the probes (``/livez``, ``/readyz``, ``/healthz``, ``/health``), the web page's static
  shell (``/``, ``/web/*``, ``/docs``: no data) and, unless ``$LESIONFLOW_METRICS_AUTH=1``,
  ``/metrics``; a 401 JSON error with ``WWW-Authenticate: Bearer``;
* **bounded bodies**: each route takes at most its own number of bytes (an image route one image's
  worth, ``/classify_batch`` a batch's, ``/infer`` ``$LESIONFLOW_MAX_INFER_BYTES``, everything else
  64 KiB), judged on ``Content-Length`` before a byte is read, and a body sent without one read
  here up to that limit and no further: a 413 naming the limit, whatever the request declares;
  ``/infer`` also takes at most ``$LESIONFLOW_MAX_INFER_ITEMS`` items (64), counted here on the
  raw body (every item is a JSON object, so it has at most as many items as ``{`` less one) before
  BentoML parses it: a few MB of tiny items would otherwise become hundreds of MB of objects; and
  at most ``$LESIONFLOW_MAX_INFER_CONCURRENT`` (2) ``/infer`` bodies are held at once, a 503 with
  ``Retry-After`` beyond (each is held twice, here and by BentoML, while it is parsed);
* **no place**: a request to a route whose lane is full (``/gradcam``,
  :func:`pipeline.serving.limits.lane_for`) gets its 503 with ``Retry-After`` here, before its body
  is read;
* **counted**: every request answered here (401, 413, 503) is counted on ``/metrics`` as
  ``lesionflow_requests_refused_total{route, status}`` (BentoML's request series never see it);
* **a request id** on every answer: the ``X-Request-ID`` header (and ``request_id`` in the JSON of
  an answer about an image, :class:`pipeline.serving.engine.Classifier`), the key that
  ``lesionflow logs forget`` erases a record by;
* **security headers** on every response: a Content-Security-Policy of the page's own origin only
  (``default-src 'self'``, no framing), ``X-Content-Type-Options: nosniff``, ``X-Frame-Options:
  DENY`` and ``Referrer-Policy: no-referrer``.

:func:`route_label` names a path by its route (``/cases/{image_id}.jpg``; ``other`` for a path no
route answers): BentoML labels its request metrics with it, so ``/metrics`` holds one series set per
route, not one per path a client invents (:func:`pipeline.serving.service.label_metrics_by_route`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pipeline.serving.auth import Gatekeeper
from pipeline.serving.limits import RETRY_AFTER_S, lane_for
from pipeline.serving.requests import MAX_BATCH_IMAGES, MAX_IMAGE_BYTES, MAX_REQUEST_BYTES, MULTIPART_SLACK

logger = logging.getLogger("lesionflow.service")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Routes that answer without a token: probes and the page's static shell.
PUBLIC = frozenset({"/livez", "/readyz", "/healthz", "/health", "/", "/docs"})
PUBLIC_PREFIXES = ("/web/", "/static_content/")  # the page's and the docs' static files
METRICS_AUTH = os.environ.get("LESIONFLOW_METRICS_AUTH", "0") == "1"
MAX_INFER_BYTES = int(os.environ.get("LESIONFLOW_MAX_INFER_BYTES", str(8 << 20)))
MAX_INFER_ITEMS = int(os.environ.get("LESIONFLOW_MAX_INFER_ITEMS", "64"))
MAX_INFER_CONCURRENT = int(os.environ.get("LESIONFLOW_MAX_INFER_CONCURRENT", "2"))
MAX_OTHER_BYTES = 64 << 10
IMAGE_ROUTES = ("/classify", "/similar", "/gradcam")
#: Every route of the service, for metric labels (templates where a route takes a parameter).
ROUTES = frozenset({*PUBLIC, *IMAGE_ROUTES, "/classify_batch", "/infer", "/model", "/docs.json", "/metrics"})
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def route_label(path: str) -> str:
    """The route a path belongs to (see the module docstring)."""
    if path in ROUTES:
        return path
    if path.startswith("/cases/"):
        return "/cases/{image_id}.jpg"
    if path.startswith(PUBLIC_PREFIXES):
        return f"/{path.split('/')[1]}/{{file}}"
    return "other"


def body_limit(path: str) -> int:
    """The most bytes a request to ``path`` may send."""
    if path in IMAGE_ROUTES:
        return MAX_IMAGE_BYTES + MULTIPART_SLACK
    if path == "/classify_batch":
        return min(MAX_IMAGE_BYTES * MAX_BATCH_IMAGES, MAX_REQUEST_BYTES) + MULTIPART_SLACK
    if path == "/infer":
        return MAX_INFER_BYTES
    return MAX_OTHER_BYTES


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES) or (path == "/metrics" and not METRICS_AUTH)


def _error(status: int, field: str, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> tuple:
    body = json.dumps({"error": f"field '{field}': {message}", "field": field, "status": status}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
    return status, headers, body


class Guard:
    """The ASGI middleware of the module docstring."""

    def __init__(self, app: Callable[..., Awaitable[None]]):
        self.app = app
        self.gatekeeper = Gatekeeper.from_env()
        self.infer_active = 0  # /infer requests whose body is held (one event loop: no lock needed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        extra = [*SECURITY_HEADERS, (b"x-request-id", request_id.encode())]
        refused = self._refusal(scope) or _no_place(scope)
        if refused is None and scope.get("method") == "POST" and scope["path"] == "/infer":
            await self._infer(scope, receive, send, extra)
            return
        if refused is None and not _declared_length(scope) and scope.get("method") in ("POST", "PUT", "PATCH"):
            receive, refused = await _buffered(receive, body_limit(scope["path"]))
        if refused is not None:
            await self._answer(send, scope["path"], *refused, extra)
            return
        await self.app(scope, receive, _stamped(send, extra))

    async def _infer(self, scope: Scope, receive: Receive, send: Send, extra: list) -> None:
        """``/infer``: a place among :data:`MAX_INFER_CONCURRENT` (else a 503), the body read and its
        items counted (:func:`_too_many_items`), then the app."""
        if self.infer_active >= MAX_INFER_CONCURRENT:
            busy = f"{self.infer_active} /infer requests in progress; try again shortly"
            await self._answer(
                send, "/infer", *_error(503, "request", busy, [(b"retry-after", str(RETRY_AFTER_S).encode())]), extra
            )
            return
        self.infer_active += 1
        try:
            receive, refused = await _buffered(receive, MAX_INFER_BYTES, _too_many_items)
            if refused is not None:
                await self._answer(send, "/infer", *refused, extra)
                return
            await self.app(scope, receive, _stamped(send, extra))
        finally:
            self.infer_active -= 1

    def _refusal(self, scope: Scope) -> tuple | None:
        """The 401 or 413 a request gets before anything reads it, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope["path"]
        known = self.gatekeeper.open_access or is_public(path) or self.gatekeeper.who(headers.get("authorization"))
        if not known:
            challenge = [(b"www-authenticate", b'Bearer realm="lesionflow"')]
            return _error(401, "authorization", self.gatekeeper.refusal(), challenge)
        length, limit = headers.get("content-length", "").strip(), body_limit(path)
        if length and not (length.isascii() and length.isdigit()):
            return _error(400, "body", f"invalid Content-Length {length[:20]!r}")
        if length and (len(length) > 15 or int(length) > limit):
            return _error(413, "body", f"request body of {length[:20]} bytes exceeds the limit of {limit:,} bytes")
        return None

    @staticmethod
    async def _answer(send: Send, path: str, status: int, headers: list, body: bytes, extra: list) -> None:
        """Answer a request refused here (counted: :func:`_refused_counter`)."""
        counter = _refused_counter()
        if counter is not None:
            counter.labels(route_label(path), str(status)).inc()
        await send({"type": "http.response.start", "status": status, "headers": [*headers, *extra]})
        await send({"type": "http.response.body", "body": body})


def _no_place(scope: Scope) -> tuple | None:
    """The 503 of a request to a route whose lane is full (:func:`pipeline.serving.limits.lane_for`),
    answered here: past this middleware a request costs BentoML's tracing, metrics and access log."""
    lane = lane_for(scope["path"]) if scope.get("method") == "POST" else None
    if lane is None or not lane.full:
        return None
    exc = lane.refusal()
    return _error(exc.status, exc.field, exc.message, [(b"retry-after", str(exc.retry_after).encode())])


@functools.cache
def _refused_counter() -> Any:
    """The series of the requests this middleware answers itself (401, 413, 503: BentoML never sees
    them) on ``/metrics``, ``lesionflow_requests_refused_total{route, status}``; made once, in the
    worker (BentoML's multiprocess registry). None when it cannot be made: metrics never stop a request."""
    try:
        from prometheus_client import Counter

        return Counter(
            "lesionflow_requests_refused",
            "Requests refused before the service read them (authentication, body limits, no place)",
            ["route", "status"],
        )
    except Exception as exc:  # noqa: BLE001
        logger.warning("no Prometheus series for refused requests: %s", exc)
        return None


def _stamped(send: Send, extra: list) -> Send:
    """``send`` with ``extra`` headers added to the response's start."""

    async def stamped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), *extra]
        await send(message)

    return stamped


def _declared_length(scope: Scope) -> bool:
    return any(k.lower() == b"content-length" for k, _ in scope.get("headers", []))


def _too_many_items(body: bytes) -> tuple | None:
    """The 413 of an ``/infer`` body that may hold more than :data:`MAX_INFER_ITEMS` items."""
    items = body.count(b"{") - 1
    if items > MAX_INFER_ITEMS:
        return _error(413, "items", f"up to {items:,} items in one request exceed the limit of {MAX_INFER_ITEMS}")
    return None


async def _buffered(
    receive: Receive, limit: int, check: Callable[[bytes], tuple | None] | None = None
) -> tuple[Receive, tuple | None]:
    """A body read here, up to ``limit`` bytes (a 413 beyond), then checked by ``check`` and
    replayed to the app: so every route, BentoML's included, sees a body within its limits."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return receive, _error(413, "body", f"request body exceeds the limit of {limit:,} bytes")
        more = message.get("more_body", False)
    body, sent = b"".join(chunks), False
    refused = check(body) if check is not None else None
    if refused is not None:
        return receive, refused

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()  # after the body: a disconnect, when it comes
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay, None
