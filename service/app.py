"""The app factory: settings, metrics, error handlers, middleware, routes, and the lifespan.

    app = create_app()                                  # loads weights in the lifespan
    app = create_app(settings, restorer=r, detector=d)  # tests inject loaded components

The lifespan starts loading in a thread and returns at once, so `/healthz` answers and
`/readyz` says why it is not ready while weights load and the warm-up batch runs. On shutdown
(uvicorn has already stopped accepting connections and waited for running requests up to its
graceful timeout) the model worker finishes what is queued within `shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from model.media.faces.detect import FaceDetector
from model.networks.restorer import OSDFaceRestorer
from service import job_routes, routes, tracing, web
from service.errors import (
    UNCOUNTED_PATHS,
    ErrorKind,
    count_error,
    error_body,
    install_error_handlers,
)
from service.jobs import JobManager
from service.logs import ACCESS_LOGGER, REQUEST_ID
from service.metrics import Metrics, status_class
from service.openapi import RESULT_HEADERS, install_openapi
from service.settings import Settings
from service.state import ServiceState, service_version

logger = logging.getLogger(__name__)
access_logger = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def create_app(
    settings: Settings | None = None,
    *,
    restorer: OSDFaceRestorer | None = None,
    detector: FaceDetector | None = None,
) -> FastAPI:
    """Build the service. Given components are used as they are; missing ones load at start."""
    settings = settings or Settings()
    tracing.configure(service_version())  # on when an OTLP endpoint is set (OTEL_* variables)
    metrics = Metrics()
    state = ServiceState(settings, metrics, restorer=restorer, detector=detector)
    jobs = JobManager(settings, metrics.registry)
    state.on_drain.append(jobs.begin_handback)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs.open()
        loader = asyncio.create_task(state.load(), name="osdface-load")
        jobs_start = asyncio.create_task(jobs.start_after(loader, state), name="osdface-jobs")
        try:
            yield
        finally:
            jobs_start.cancel()
            state.begin_drain()  # the running job finishes its segment, then goes back
            await jobs.stop(state.grace_left(settings.shutdown_grace_s))
            if not loader.done():  # shut down while loading: the thread finishes on its own
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loader
            await state.shutdown(settings.shutdown_grace_s)
            await asyncio.to_thread(tracing.flush)  # the last requests' spans, before exit

    app = FastAPI(
        title="OSDFace",
        summary="One-step diffusion face restoration",
        version=service_version(),
        lifespan=lifespan,
        docs_url=None,  # served by service/web.py from local files, not a CDN
        redoc_url=None,
    )
    app.state.service = state
    app.state.metrics = metrics
    app.state.jobs = jobs
    install_error_handlers(app)
    app.include_router(routes.router)
    app.include_router(job_routes.router)
    app.include_router(web.router)  # the browser page at GET /
    install_openapi(app, settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Accept",
                "X-Request-Id",
                "Idempotency-Key",
            ],
            expose_headers=[
                *RESULT_HEADERS,
                "X-Request-Id",
                tracing.TRACE_ID_HEADER,
                "Retry-After",
            ],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # outermost: sees everything
    return app


class RequestContextMiddleware:
    """Request id, request-duration metric, access log, HEAD, and the last line of defence.

    Pure ASGI (not BaseHTTPMiddleware) so the disconnect message still reaches the handler.
    Each request gets an `X-Request-Id` (the client's, if it is a short token, else a new one),
    also set in `service.logs.REQUEST_ID` so every line logged for the request carries it.
    With tracing on, each API request (not probes or /metrics) is a server span, current while
    it is served (the caller's `traceparent` its parent); a sampled one's trace id is answered in
    `X-Trace-Id`, and an error answer marks it failed with the body's error type.
    One access line per request (service/logs.py; probes and /metrics at debug level).
    `HEAD` is answered as `GET` without the body, wherever `GET` is routed. An exception no
    handler mapped is a bug: logged once with the request id, answered 500. A request cut by
    the end of the shutdown grace (uvicorn cancels it) is answered 503 `shutting_down`.
    Probes and /metrics are not timed in the request metric.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = _request_id(scope)
        REQUEST_ID.set(request_id)  # this request's task: its own copy of the context
        method = scope["method"]
        traced = None
        if scope["path"] not in UNCOUNTED_PATHS:
            headers = scope.get("headers", ())
            traced = tracing.start_request(headers, method, scope["path"], started, request_id)
        head = method == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        state = scope.setdefault("state", {})
        state["request_id"], state["started_at"] = request_id, started
        status = 500
        response_started = False
        sent_bytes = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started, sent_bytes
            if message["type"] == "http.response.body":
                sent_bytes += 0 if head else len(message.get("body", b""))
                if traced is not None and status >= 400:
                    traced.error_body(message.get("body", b""))
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
                if traced is not None and traced.trace_id is not None:
                    headers[tracing.TRACE_ID_HEADER] = traced.trace_id
                if "x-content-type-options" not in headers:
                    headers["X-Content-Type-Options"] = "nosniff"
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when the shutdown grace ends.
            if response_started:
                raise
            status = ErrorKind.SHUTTING_DOWN.status
            count_error(self.metrics, scope["path"], ErrorKind.SHUTTING_DOWN)
            message = "the server shut down before this request finished; retry"
            body = error_body(ErrorKind.SHUTTING_DOWN.type, message)
            await _send_json(send_with_id, status, body, {"retry-after": "1"})
        except Exception as exc:
            if traced is not None:
                traced.exception(exc)
            logger.exception(
                "unhandled error on %s %s (request_id=%s)",
                method,
                _endpoint(scope),
                request_id,
                extra={"path": scope["path"]},
            )
            count_error(self.metrics, scope["path"], ErrorKind.INTERNAL)
            status = 500
            if not response_started:
                body = error_body(ErrorKind.INTERNAL.type, _internal(request_id))
                await _send_json(send_with_id, 500, body)
        finally:
            duration = time.monotonic() - started
            endpoint = _endpoint(scope)
            if scope["path"] not in UNCOUNTED_PATHS:
                self.metrics.request_duration.labels(endpoint, status_class(status)).observe(
                    duration
                )
            _log_access(scope, method, endpoint, status, sent_bytes, duration)
            if traced is not None:  # after the log line and the metric: they carry its ids
                traced.end(status, endpoint, started + duration)


def _endpoint(scope: Scope) -> str:
    """The matched route's template (`/v1/jobs/{job_id}`), or 'unmatched'."""
    return getattr(scope.get("route"), "path", None) or "unmatched"


def _log_access(
    scope: Scope, method: str, endpoint: str, status: int, sent: int, duration: float
) -> None:
    """One line per request. The message names the route template, never the client's own
    path (that is a field): text a client chose stays out of messages."""
    path = scope["path"]
    level = logging.DEBUG if path in UNCOUNTED_PATHS else logging.INFO
    fields = {
        "method": method,
        "path": path,
        "route": endpoint,
        "status": status,
        "bytes": sent,
        "duration_s": round(duration, 6),
    }
    access_logger.log(level, "%s %s %d", method, endpoint, status, extra=fields)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _REQUEST_ID.match(given):
                return given
    return uuid.uuid4().hex


def _internal(request_id: str) -> str:
    return f"internal error; quote request id {request_id} when reporting it"


async def _send_json(
    send: Send, status: int, body: dict[str, Any], extra: dict[str, str] | None = None
) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
