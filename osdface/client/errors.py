"""What the client raises: one base class, the service's error answers by kind, and the failures
that never reached an answer (connection, deadline, TLS).

Every error answer of the service has the body `{"error": {"type": ..., "message": ...}}` and an
`X-Request-Id` header; `ServiceError` carries all three with the status, so a caller can print
the service's own words and an operator can find the request in the logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any


class ClientError(Exception):
    """Anything the client raises."""


class ServiceError(ClientError):
    """The service answered with an error status.

    `status` is the HTTP status, `type` the service's stable error type (`queue_full`,
    `invalid_image`, ...; `http_<status>` when the body is not the service's JSON, e.g. from a
    proxy), `message` its text, `request_id` the `X-Request-Id` the answer carried.
    """

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        request_id: str | None = None,
        retry_after_s: float | None = None,
        url: str = "",
    ) -> None:
        self.status = status
        self.type = type
        self.message = message
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.url = url
        where = f" from {url}" if url else ""
        rid = f" (request id {request_id})" if request_id else ""
        super().__init__(f"{status} {type}{where}: {message}{rid}")


class InputError(ServiceError):
    """The input was refused (400, 413, 415, 422): the file or a field; never retried."""


class AuthError(ServiceError):
    """401 or 403: a missing or wrong API key."""


class NotFoundError(ServiceError):
    """404: no such path, or no such job (finished jobs expire)."""


class JobNotDoneError(ServiceError):
    """409: the job has no result (yet)."""


class BusyError(ServiceError):
    """429 or 503: the service refused the work for now (queue full, loading, shutting down);
    retried after its `Retry-After`."""


class ServerError(ServiceError):
    """A 5xx other than 503: 500 (a failure of the service, never retried), 502 and 504
    (a gateway or the deadline: retried with backoff)."""


class UnreachableError(ClientError):
    """No answer: the connection was refused, reset or closed before the answer was whole."""


class TLSError(ClientError):
    """The server's certificate could not be verified (never retried: see `ca_bundle`)."""


class DeadlineExceededError(ClientError, TimeoutError):
    """The call's total deadline (`deadline_s`) passed before it succeeded."""


class JobFailedError(ClientError):
    """A video job ended `failed` or `cancelled`; `job` holds its last state and error."""

    def __init__(self, job: Any) -> None:
        self.job = job
        super().__init__(f"video job {job.id} {job.state}: {job.error or 'no reason given'}")


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: InputError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: JobNotDoneError,
    413: InputError,
    415: InputError,
    422: InputError,
    429: BusyError,
    503: BusyError,
}


@dataclass(frozen=True)
class Answer:
    """What an error is built from: the status, headers and (the start of) the body."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str = ""


def error_from_answer(answer: Answer) -> ServiceError:
    """The typed error for an error answer, with the service's JSON error when it has one."""
    cls = _BY_STATUS.get(answer.status, ServerError if answer.status >= 500 else ServiceError)
    type_, message = f"http_{answer.status}", answer.body[:300].decode("utf-8", "replace").strip()
    try:
        detail = json.loads(answer.body)["error"]
        type_, message = str(detail["type"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        pass
    return cls(
        answer.status,
        type_,
        message or "(no message)",
        request_id=answer.headers.get("x-request-id"),
        retry_after_s=retry_after(answer.headers.get("retry-after")),
        url=answer.url,
    )


def retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    from datetime import UTC, datetime

    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class ConfigError(ClientError, ValueError):
    """The client's own settings are wrong: a bad URL, an unreadable key file or CA bundle."""
