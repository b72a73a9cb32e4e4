"""The one error boundary: every error the service can answer is one row of `ErrorKind`.

Body shape, always: `{"error": {"type": <short stable string>, "message": <human text>}}`.
Each `ErrorKind` row gives the status, the `type` and the description the OpenAPI schema
shows; one cause, one row (two causes never share a type). Domain exceptions are raised where
the decision is made (`model/errors.py` for images, parameters and the model's own output,
`service/batching.py` for the queue, `ServiceError(kind, ...)` for HTTP-only conditions) and are
mapped to a row in `_EXCEPTION_KINDS`, nowhere else. Errors are counted here, once:
`osdface_errors_total{type}` for every error answer and `osdface_rejected_total{reason}` for
refused or dropped work; probe and `/metrics` requests are not counted. A 500 is a failure of
ours, logged once with the request id: `model_output` here, anything unmapped (a bug) by the
request middleware.
"""

from __future__ import annotations

import enum
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from model.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    InvalidInputError,
    ModelOutputError,
    NoVideoStreamError,
    UnsupportedFormatError,
    UnsupportedVideoCodecError,
    VideoDecodeError,
)
from model.runtime.messages import phrase
from service.jobstore import IdempotencyConflictError, StoreUnavailableError
from service.queue_items import BatcherClosedError, DeadlineUnreachableError, QueueFullError

logger = logging.getLogger(__name__)

# Requests that are not API traffic: never counted in request or error metrics.
UNCOUNTED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class ErrorKind(enum.Enum):
    """(status, type, description, rejection): the whole error vocabulary of the API.

    `rejection` marks work refused or dropped by the service (not the client's mistake): those
    are also counted in `osdface_rejected_total`.
    """

    MALFORMED_REQUEST = (400, "malformed_request", "the multipart body cannot be parsed", False)
    INVALID_IMAGE = (
        400,
        "invalid_image",
        "an image of an accepted format that cannot be decoded (empty, truncated, corrupt)",
        False,
    )
    INVALID_VIDEO = (400, "invalid_video", "the file is not a decodable video", False)
    UNAUTHORIZED = (401, "unauthorized", "missing or wrong API key (when one is set)", False)
    NOT_FOUND = (404, "not_found", "no such path", False)
    METHOD_NOT_ALLOWED = (405, "method_not_allowed", "the path does not take this method", False)
    REQUEST_TIMEOUT = (408, "request_timeout", "the request headers came too slowly", False)
    JOB_NOT_DONE = (409, "job_not_done", "the video job has no result (yet)", False)
    PAYLOAD_TOO_LARGE = (413, "too_large", "the body or a form field is over its byte limit", False)
    IMAGE_TOO_LARGE = (413, "image_too_large", "too many pixels in or out", False)
    UNSUPPORTED_MEDIA_TYPE = (415, "unsupported_media_type", "the body is not multipart", False)
    UNSUPPORTED_FORMAT = (
        415,
        "unsupported_format",
        "the bytes are no image format on the allow-list (sniffed: text, SVG, GIF, ...)",
        False,
    )
    INVALID_PARAMETER = (422, "invalid_parameter", "a form field is missing, unknown or bad", False)
    IDEMPOTENCY_KEY_REUSED = (
        422,
        "idempotency_key_reused",
        "the Idempotency-Key names a video job made from another upload",
        False,
    )
    QUEUE_FULL = (429, "queue_full", "the model queue has no room for the faces", True)
    OVERLOADED = (
        429,
        "overloaded",
        "the work queued ahead would not finish before this request's deadline",
        True,
    )
    TOO_MANY_REQUESTS = (429, "too_many_requests", "too many requests in progress", True)
    TOO_MANY_JOBS = (429, "too_many_jobs", "the server holds its limit of video jobs", True)
    CLIENT_DISCONNECTED = (499, "client_disconnected", "the client went away (logs only)", True)
    INTERNAL = (500, "internal", "a bug: quote the X-Request-Id when reporting it", False)
    MODEL_OUTPUT = (
        500,
        "model_output",
        "the model returned NaN or infinite pixels: a model or device failure, not the input",
        True,
    )
    NOT_READY = (503, "not_ready", "the model is loading or warming up", True)
    MODEL_FAILED = (503, "model_failed", "loading the model failed or its worker stopped", True)
    SHUTTING_DOWN = (503, "shutting_down", "the server is shutting down", True)
    JOB_STORE_UNAVAILABLE = (
        503,
        "job_store_unavailable",
        "the video jobs' store (Redis, or the jobs folder's database) does not answer",
        True,
    )
    DEADLINE_EXCEEDED = (504, "deadline_exceeded", "the request passed its deadline", True)

    def __init__(self, status: int, type_: str, description: str, rejection: bool) -> None:
        self.status = status
        self.type = type_
        self.description = description
        self.rejection = rejection


# Kinds that carry a Retry-After header, and its default in seconds.
RETRY_AFTER_DEFAULT_S = {
    ErrorKind.QUEUE_FULL: 1.0,
    ErrorKind.OVERLOADED: 1.0,
    ErrorKind.TOO_MANY_REQUESTS: 1.0,
    ErrorKind.TOO_MANY_JOBS: 1.0,
    ErrorKind.NOT_READY: 5.0,
    ErrorKind.MODEL_FAILED: 5.0,
    ErrorKind.SHUTTING_DOWN: 1.0,
    ErrorKind.JOB_STORE_UNAVAILABLE: 5.0,
}


class ServiceError(Exception):
    """An error answer: its kind, a message for people, and extra headers."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.headers = dict(headers or {})
        if kind is ErrorKind.UNAUTHORIZED:
            self.headers["WWW-Authenticate"] = "Bearer"
        if kind in RETRY_AFTER_DEFAULT_S:
            seconds = RETRY_AFTER_DEFAULT_S[kind] if retry_after_s is None else retry_after_s
            self.headers["Retry-After"] = str(max(1, math.ceil(seconds)))

    @property
    def status_code(self) -> int:
        return self.kind.status

    @property
    def error_type(self) -> str:
        return self.kind.type


# Exceptions raised outside this package -> their kind. The first isinstance match wins.
_EXCEPTION_KINDS: tuple[tuple[type[Exception], ErrorKind], ...] = (
    (VideoDecodeError, ErrorKind.INVALID_VIDEO),
    (NoVideoStreamError, ErrorKind.INVALID_VIDEO),
    (UnsupportedVideoCodecError, ErrorKind.UNSUPPORTED_FORMAT),
    (ImageDecodeError, ErrorKind.INVALID_IMAGE),
    (ImageTooLargeError, ErrorKind.IMAGE_TOO_LARGE),
    (UnsupportedFormatError, ErrorKind.UNSUPPORTED_FORMAT),
    (InvalidInputError, ErrorKind.INVALID_PARAMETER),
    (ModelOutputError, ErrorKind.MODEL_OUTPUT),
    (QueueFullError, ErrorKind.QUEUE_FULL),
    (DeadlineUnreachableError, ErrorKind.OVERLOADED),
    (BatcherClosedError, ErrorKind.SHUTTING_DOWN),
    (IdempotencyConflictError, ErrorKind.IDEMPOTENCY_KEY_REUSED),
    (StoreUnavailableError, ErrorKind.JOB_STORE_UNAVAILABLE),
)

_BY_STATUS = {
    400: ErrorKind.MALFORMED_REQUEST,
    401: ErrorKind.UNAUTHORIZED,
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.METHOD_NOT_ALLOWED,
    413: ErrorKind.PAYLOAD_TOO_LARGE,
    415: ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorKind.INVALID_PARAMETER,
}


def error_body(error_type: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": error_type, "message": message}}


def error_response(error: ServiceError) -> JSONResponse:
    body = error_body(error.error_type, error.message)
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


def to_service_error(exc: BaseException) -> ServiceError | None:
    """The HTTP meaning of a known exception; None for anything else (a bug: 500)."""
    if isinstance(exc, ServiceError):
        return exc
    retry = getattr(exc, "retry_after_s", None)
    for cls, kind in _EXCEPTION_KINDS:
        if isinstance(exc, cls):
            return ServiceError(kind, str(exc) or cls.__name__, retry_after_s=retry)
    return None


def count_error(metrics: Any, path: str, kind: ErrorKind) -> None:
    """The one place errors and rejections are counted (probes and /metrics are not)."""
    if metrics is None or path in UNCOUNTED_PATHS:
        return
    metrics.errors.labels(type=kind.type).inc()
    if kind.rejection:
        metrics.rejected.labels(reason=kind.type).inc()


def _count(request: Request, kind: ErrorKind) -> None:
    count_error(getattr(request.app.state, "metrics", None), request.url.path, kind)


async def _service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    mapped = to_service_error(exc)
    if mapped is None:  # not ours to map: the middleware logs it as a bug and answers 500
        raise exc
    if mapped.kind.status == 500:  # a failure of ours: one line an operator can find
        request_id = getattr(request.state, "request_id", "-")
        logger.error("%s on %s (request_id=%s): %s", mapped.error_type, request.url.path,
                     request_id, mapped.message)  # fmt: skip
    _count(request, mapped.kind)
    return error_response(mapped)


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = _BY_STATUS.get(exc.status_code, ErrorKind.MALFORMED_REQUEST)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allowed = _allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        message = _method_hint(request.url.path, allowed) or message
    _count(request, kind)
    return error_response(ServiceError(kind, message, headers=headers))


# What a 405 on these paths says to do: they are the ones opened in a browser or sent by curl
# without -F, and "takes POST" alone does not say how the upload goes.
_METHOD_HINTS = {
    "/restore": "POST a multipart form with the picture in the field 'image'",
    "/v1/jobs": "POST a multipart form with the video in the field 'video'",
}
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this path (Starlette's 405 names only the first
    route's), found by matching: an included router is one opaque entry of the app's routes."""
    allowed = set()
    for method in _METHODS:
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] is Match.FULL for route in request.app.router.routes):
            allowed.add(method)
    if "GET" in allowed:
        allowed.add("HEAD")  # the request middleware answers HEAD wherever GET is routed
    return sorted(allowed)


def _method_hint(path: str, allowed: list[str]) -> str:
    if not allowed:
        return ""
    return _METHOD_HINTS.get(path) or f"{path} takes only {', '.join(allowed)}"


# Where FastAPI found a parameter: the first item of an error's `loc`, not part of its name.
_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p not in _LOCATIONS)
        parts.append(f"{where} {phrase(err)}" if where else phrase(err))
    _count(request, ErrorKind.INVALID_PARAMETER)
    message = "; ".join(parts) or "invalid request"
    return error_response(ServiceError(ErrorKind.INVALID_PARAMETER, message))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; unexpected exceptions are the request middleware's job."""
    app.add_exception_handler(ServiceError, _service_error_handler)
    for cls, _ in _EXCEPTION_KINDS:
        app.add_exception_handler(cls, _service_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)


# --- OpenAPI -----------------------------------------------------------------------------------

RETRY_AFTER_HEADER = {
    "description": "seconds to wait before retrying",
    "schema": {"type": "integer", "minimum": 1},
}
REQUEST_ID_HEADER = {
    "description": "the request's id (the client's X-Request-Id if it is a short token)",
    "schema": {"type": "string"},
}


def openapi_responses(*kinds: ErrorKind) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route, built from the table: one entry per status, an example per
    kind, and the headers those kinds carry."""
    from service.schemas import ErrorBody  # schemas imports nothing from here; avoids a cycle

    out: dict[int | str, dict[str, Any]] = {}
    for kind in kinds:
        entry = out.setdefault(
            kind.status,
            {
                "model": ErrorBody,
                "description": "",
                "content": {"application/json": {"examples": {}}},
                "headers": {"X-Request-Id": REQUEST_ID_HEADER},
            },
        )
        line = f"`{kind.type}`: {kind.description}"
        entry["description"] = f"{entry['description']}; {line}" if entry["description"] else line
        example = error_body(kind.type, kind.description)
        entry["content"]["application/json"]["examples"][kind.type] = {"value": example}
        if kind in RETRY_AFTER_DEFAULT_S:
            entry["headers"]["Retry-After"] = RETRY_AFTER_HEADER
        if kind is ErrorKind.UNAUTHORIZED:
            entry["headers"]["WWW-Authenticate"] = {"schema": {"type": "string"}}
    return out


# What every route can answer, whatever its own errors.
COMMON_KINDS = (ErrorKind.INTERNAL,)
