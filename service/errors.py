"""The one error boundary: every exception the service can meet becomes one HTTP status here.

Body shape, always: `{"error": {"type": <short stable string>, "message": <human text>}}`.
Domain exceptions are raised where the decision is made (`model/errors.py` for images and
parameters, `service/batching.py` for the queue, this module for HTTP-only conditions) and are
mapped to a status in `_MODEL_ERRORS` / the `ServiceError` subclasses below, nowhere else.
A 500 means a bug of ours: it is logged once, with the request id, by the request middleware.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    InvalidInputError,
    NoVideoStreamError,
    UnsupportedFormatError,
    UnsupportedVideoCodecError,
    VideoDecodeError,
)
from service.batching import BatcherClosedError, QueueFullError

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An HTTP-level failure decided by the service itself (not by the model package)."""

    status_code: int = 500
    error_type: str = "internal"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class MalformedRequestError(ServiceError):
    """The multipart body cannot be parsed."""

    status_code, error_type = 400, "malformed_request"


class UnauthorizedError(ServiceError):
    """Missing or wrong API key on an endpoint that needs one."""

    status_code, error_type = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class PayloadTooLargeError(ServiceError):
    """The request body (or one of its form fields) is over its byte limit."""

    status_code, error_type = 413, "too_large"


class UnsupportedMediaTypeError(ServiceError):
    """The request body is not multipart/form-data."""

    status_code, error_type = 415, "unsupported_media_type"


class InvalidParameterError(ServiceError):
    """A form field is missing, unknown, or has a bad value."""

    status_code, error_type = 422, "invalid_parameter"


class TooManyRequestsError(ServiceError):
    """Admission refused: too much work already accepted."""

    status_code, error_type = 429, "queue_full"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class NotReadyError(ServiceError):
    """Weights still loading, loading failed, or the server is draining for shutdown."""

    status_code, error_type = 503, "not_ready"

    def __init__(self, message: str, retry_after_s: float = 5.0) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after_s)))})


class DeadlineExceededError(ServiceError):
    """The request did not finish within `request_timeout_s`."""

    status_code, error_type = 504, "deadline_exceeded"


class ClientDisconnectedError(ServiceError):
    """The client went away; nobody reads this answer, it exists for logs and metrics.

    499 is nginx's "client closed request": not a standard status, never seen by a client.
    """

    status_code, error_type = 499, "client_disconnected"


# Model-package exceptions -> (status, type). Order matters: the first isinstance match wins.
_MODEL_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (ImageDecodeError, 400, "invalid_image"),
    (ImageTooLargeError, 413, "too_large"),
    (UnsupportedFormatError, 415, "unsupported_format"),
    (InvalidInputError, 422, "invalid_parameter"),
    (VideoDecodeError, 400, "invalid_video"),
    (NoVideoStreamError, 400, "invalid_video"),
    (UnsupportedVideoCodecError, 415, "unsupported_format"),
)

_HTTP_TYPES = {
    400: "malformed_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_parameter",
    429: "queue_full",
    503: "not_ready",
    504: "deadline_exceeded",
}


def error_body(error_type: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": error_type, "message": message}}


def error_response(
    status_code: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(error_type, message), status_code=status_code, headers=headers)


def to_service_error(exc: BaseException) -> ServiceError | None:
    """The HTTP meaning of a known exception; None for anything else (a bug: 500)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, QueueFullError):
        return TooManyRequestsError(str(exc), exc.retry_after_s)
    if isinstance(exc, BatcherClosedError):
        return NotReadyError("the server is shutting down", retry_after_s=1.0)
    for cls, status, error_type in _MODEL_ERRORS:
        if isinstance(exc, cls):
            err = ServiceError(str(exc) or cls.__name__)
            err.status_code, err.error_type = status, error_type
            return err
    return None


async def _service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    mapped = to_service_error(exc)
    if mapped is None:  # not ours to map: the middleware logs it as a bug and answers 500
        raise exc
    _count(request, mapped.error_type)
    return error_response(mapped.status_code, mapped.error_type, mapped.message, mapped.headers)


async def _http_exception_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = _HTTP_TYPES.get(exc.status_code, "http_error")
    _count(request, error_type)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, error_type, message, dict(exc.headers or {}))


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    _count(request, "invalid_parameter")
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return error_response(422, "invalid_parameter", "; ".join(parts) or "invalid request")


def _count(request: Request, error_type: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(type=error_type).inc()


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; unexpected exceptions are the request middleware's job."""
    app.add_exception_handler(ServiceError, _service_error_handler)
    app.add_exception_handler(QueueFullError, _service_error_handler)
    app.add_exception_handler(BatcherClosedError, _service_error_handler)
    for cls, _, _ in _MODEL_ERRORS:
        app.add_exception_handler(cls, _service_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
