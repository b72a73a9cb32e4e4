"""What is retried, how long to wait, and the one deadline of a call.

Retried: 429 and 503 after their `Retry-After` (cut to `max_retry_after_s`, never shorter,
with jitter so many clients do not return together); connection failures and 502/504 with
exponential backoff and jitter. Never retried: any other 4xx (the input, the key, the path: the
same request would fail again), 500 (a failure of the service), TLS verification failures.
Nothing waits past the call's deadline: the last error is raised instead.
"""

from __future__ import annotations

import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from osdface.client.errors import (
    BusyError,
    ClientError,
    DeadlineExceededError,
    ServerError,
    TLSError,
    UnreachableError,
)

BACKOFF_STATUSES = frozenset({502, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How one call retries. `attempts` counts the first try (1: never retry)."""

    attempts: int = 6
    backoff_s: float = 0.5  # the first wait after a connection failure, 502 or 504; doubled
    max_backoff_s: float = 20.0
    max_retry_after_s: float = 60.0  # a longer Retry-After is cut to this
    jitter: float = 0.25  # each wait is stretched by a random factor in [1, 1 + jitter]

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if min(self.backoff_s, self.max_backoff_s, self.max_retry_after_s, self.jitter) < 0:
            raise ValueError("waits and jitter must be >= 0")

    @classmethod
    def never(cls) -> RetryPolicy:
        """One try: every failure is raised as it comes (benchmarks counting 429s)."""
        return cls(attempts=1)


def retryable(error: ClientError) -> bool:
    if isinstance(error, BusyError | UnreachableError):
        return True
    return isinstance(error, ServerError) and error.status in BACKOFF_STATUSES


def from_transport(exc: httpx.TransportError, url: str) -> ClientError:
    """The client's error for a request that got no answer."""
    if isinstance(exc, httpx.ConnectError) and _caused_by_ssl(exc):
        return TLSError(f"TLS with {url} failed: {exc}")
    if isinstance(exc, httpx.ConnectTimeout | httpx.NetworkError | httpx.RemoteProtocolError):
        return UnreachableError(f"{url}: {type(exc).__name__}: {exc or 'no answer'}")
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceededError(f"{url}: no answer before the call's deadline")
    return ClientError(f"{url}: {type(exc).__name__}: {exc}")


def _caused_by_ssl(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


class Attempts:
    """One call's tries against its deadline: the time left for the next try, and after a
    failure either the wait before the next try or the error that ends the call."""

    def __init__(
        self,
        policy: RetryPolicy,
        deadline_s: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.clock, self.rng = clock, rng
        self.end = None if deadline_s is None else clock() + deadline_s
        self.tries = 0
        self.retried: list[str] = []  # why each retry happened: "429 queue_full", "unreachable"

    def time_left(self) -> float | None:
        """Seconds until the deadline (None: no deadline); DeadlineExceededError at 0."""
        if self.end is None:
            return None
        left = self.end - self.clock()
        if left <= 0:
            raise DeadlineExceededError(f"the call's deadline passed after {self.tries} tries")
        return left

    def timeout(self, cap_s: float | None = None) -> httpx.Timeout:
        """The httpx timeout of the next try: the time left, no more than `cap_s`."""
        left = self.time_left()
        limits = [t for t in (left, cap_s) if t is not None]
        return httpx.Timeout(min(limits) if limits else None)

    def after(self, error: ClientError) -> float:
        """The seconds to wait before the next try; raises `error` when the call ends."""
        self.tries += 1
        if not retryable(error) or self.tries >= self.policy.attempts:
            raise error
        wait = self._wait(error)
        if self.end is not None and self.clock() + wait >= self.end:
            raise error
        self.retried.append(_reason(error))
        return wait

    def _wait(self, error: ClientError) -> float:
        stretch = 1.0 + self.policy.jitter * self.rng()
        if isinstance(error, BusyError) and error.retry_after_s is not None:
            return min(error.retry_after_s, self.policy.max_retry_after_s) * stretch
        backoff = self.policy.backoff_s * 2 ** (self.tries - 1)
        return min(backoff, self.policy.max_backoff_s) * stretch


def _reason(error: ClientError) -> str:
    if isinstance(error, ServerError | BusyError):
        return f"{error.status} {error.type}"
    return "unreachable"
