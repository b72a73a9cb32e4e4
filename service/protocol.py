"""uvicorn's h11 protocol with the service's error shape, and a timeout on slow headers.

Errors found by the HTTP parser itself (a malformed request line or header, a negative or
non-numeric Content-Length, bad chunked encoding, headers over h11's size limit) never reach the
app. uvicorn answers them with a plain-text 400; here they get the service's JSON body and an
`X-Request-Id` (a new one: the request's own header may not have been read). What stays out of
reach: an answer the app has already started cannot be replaced (the connection is closed),
and h11 reports every parse failure as 400 (there is no 414 or 431).

A connection whose request headers are not complete `headers_timeout_s` after its first byte
(or after the previous answer, on a kept-alive connection) is answered 408 and closed, so
slow-header clients cannot hold connections open for ever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import ErrorKind, error_body

logger = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """H11Protocol: JSON parser errors with a request id, and a header timeout."""

    headers_timeout_s: float = 10.0  # set by `with_headers_timeout`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_headers_timeout(cls, seconds: float) -> type[GuardedH11Protocol]:
        """A subclass with this timeout (uvicorn takes a class, not an instance)."""
        return type(cls.__name__, (cls,), {"headers_timeout_s": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_headers_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_headers_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_headers_timer()

    def _arm_headers_timer(self) -> None:
        self._disarm_headers_timer()
        self._headers_timer = self.loop.call_later(self.headers_timeout_s, self._headers_timeout)

    def _disarm_headers_timer(self) -> None:
        if self._headers_timer is not None:
            self._headers_timer.cancel()
            self._headers_timer = None

    def _headers_timeout(self) -> None:
        self._headers_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # headers complete: the app's own deadline governs the body
        pending, _ = self.conn.trailing_data
        if pending:
            logger.info("request headers incomplete after %.0f s; closing", self.headers_timeout_s)
            message = f"the request headers were not complete within {self.headers_timeout_s:g} s"
            self._send_json_error(ErrorKind.REQUEST_TIMEOUT, message)
        # An idle kept-alive connection is uvicorn's keep-alive timeout's business.

    def send_400_response(self, msg: str) -> None:
        self._send_json_error(ErrorKind.MALFORMED_REQUEST, f"{msg} (refused by the HTTP parser)")

    def _send_json_error(self, kind: ErrorKind, message: str) -> None:
        """Write a complete error answer by hand (the request's h11 state is broken), close."""
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            payload = json.dumps(error_body(kind.type, message)).encode()
            reason = HTTPStatus(kind.status).phrase
            head = (
                f"HTTP/1.1 {kind.status} {reason}\r\n"
                "content-type: application/json\r\n"
                f"content-length: {len(payload)}\r\n"
                f"x-request-id: {uuid.uuid4().hex}\r\n"
                "connection: close\r\n\r\n"
            )
            self.transport.write(head.encode("ascii") + payload)
        self.transport.close()
