"""The shared job store: Redis or Valkey through redis-py (`OSDFACE_JOBS_REDIS_URL`).

Any replica on any host sees every job. A job is one hash; the queue, the leases, the finished
jobs and the idempotency keys are indexes beside it (see `redis_scripts`). Every operation that
reads then writes is one Lua script (EVALSHA through redis-py's `register_script`), so it is
atomic. Leases run on the Redis server's clock. The server should keep its data: append-only
file on a volume, and `maxmemory-policy noeviction` (an evicted job hash is a lost job).

redis-py's client is thread-safe (a pool of connections), so one store serves the event loop
and the job thread. A server that cannot be reached, is read-only, out of memory or refuses
the credentials raises StoreUnavailableError naming the URL without its password.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from service.jobstore.base import (
    IdempotencyConflictError,
    Ids,
    JobStore,
    LeaseStatus,
    Records,
    StoreFullError,
    StoreUnavailableError,
    checked_fields,
    checked_final,
    checked_new,
)
from service.jobstore.record import JOB_ID, JobRecord, JobState, encode_field
from service.jobstore.redis_scripts import PRELUDE, SCRIPTS

DEFAULT_PREFIX = "osdface:jobs:"
T = TypeVar("T")
_UNAVAILABLE = (
    redis.exceptions.ConnectionError,  # also refused credentials, a server still loading
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica, or a primary demoted under us
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.NoPermissionError,
    redis.exceptions.ClusterDownError,
)


def redacted(url: str) -> str:
    """`url` without its password (and without a query string, which may hold one)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rpartition("@")[2]
        netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RedisJobStore(JobStore):
    """Jobs in a Redis or Valkey server, every key under `prefix`."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 5.0,
        retries: int = 2,
    ) -> None:
        self.url = redacted(url)
        self.prefix = prefix
        try:
            self._redis = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                health_check_interval=30,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            )
        except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
            message = f"the job store URL {self.url} is not usable: {exc}"
            raise StoreUnavailableError(message) from exc
        self._scripts: dict[str, Script] = {
            name: self._redis.register_script(PRELUDE + body) for name, body in SCRIPTS.items()
        }

    # --- plumbing ----------------------------------------------------------------------------

    def _guard(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except _UNAVAILABLE as exc:
            message = f"the job store at {self.url} is unavailable: {exc}"
            raise StoreUnavailableError(message) from exc

    def _script(self, name: str, *args: str | float) -> Any:
        script = self._scripts[name]
        return self._guard(lambda: script(keys=[], args=[self.prefix, *args]))

    @staticmethod
    def _record(flat: list[str] | None) -> JobRecord | None:
        if not flat:
            return None
        return JobRecord.from_fields(dict(zip(flat[::2], flat[1::2], strict=True)))

    @staticmethod
    def _pairs(fields: dict[str, Any]) -> list[str]:
        """name, value, ... as the scripts take them; None is "" (the field is removed)."""
        out: list[str] = []
        for name, value in fields.items():
            out += [name, "" if value is None else encode_field(name, value)]
        return out

    @staticmethod
    def _now(now: float | None) -> str | float:
        return "" if now is None else now

    # --- the interface -----------------------------------------------------------------------

    def create(self, record: JobRecord, *, max_jobs: int | None = None) -> tuple[JobRecord, bool]:
        fields = checked_new(record).to_fields()
        verdict, flat = self._script(
            "create",
            record.id,
            fields["created_at"],
            record.idempotency_key or "",
            record.upload_digest or "",
            "" if max_jobs is None else max_jobs,
            *[text for pair in fields.items() for text in pair],
        )
        if verdict == "created":
            return record, True
        if verdict == "full":
            assert max_jobs is not None
            held, oldest = flat
            raise StoreFullError(int(held), max_jobs, float(oldest) if oldest else None)
        existing = self._record(flat)
        assert existing is not None
        if verdict == "conflict":
            raise IdempotencyConflictError(record.idempotency_key or "", existing)
        return existing, False

    def get(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        key = f"{self.prefix}job:{job_id}"
        fields = cast(dict[str, str], self._guard(lambda: self._redis.hgetall(key)))
        return JobRecord.from_fields(fields) if fields else None

    def list(self) -> Records:
        found = [self._record(flat) for flat in self._script("list")]
        return [record for record in found if record is not None]

    def counts(self) -> dict[JobState, int]:
        found = [record.state for record in self.list()]
        return {state: found.count(state) for state in JobState}

    def claim(self, owner: str, lease_s: float, *, now: float | None = None) -> JobRecord | None:
        return self._record(self._script("claim", owner, self._now(now), lease_s))

    def renew(
        self, job_id: str, owner: str, lease_s: float, *, now: float | None = None
    ) -> LeaseStatus:
        return LeaseStatus(self._script("renew", job_id, owner, self._now(now), lease_s))

    def progress(self, job_id: str, owner: str, **fields: Any) -> LeaseStatus:
        pairs = self._pairs(checked_fields(fields))
        return LeaseStatus(self._script("progress", job_id, owner, *pairs))

    def finish(
        self,
        job_id: str,
        owner: str,
        state: JobState,
        error: dict[str, str] | None = None,
        *,
        now: float | None = None,
        **fields: Any,
    ) -> bool:
        final = checked_final(state)
        pairs = self._pairs({**checked_fields(fields), "error": error})
        ended = self._script("finish", job_id, owner, str(final), self._now(now), *pairs)
        return bool(ended)

    def release(self, job_id: str, owner: str, *, now: float | None = None) -> bool:
        return bool(self._script("release", job_id, owner, self._now(now)))

    def cancel(self, job_id: str, *, now: float | None = None) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        return self._record(self._script("cancel", job_id, self._now(now)))

    def delete(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        return self._record(self._script("delete", job_id))

    def expire(self, retention_s: float, *, now: float | None = None) -> Ids:
        return list(self._script("expire", retention_s, self._now(now)))

    def ping(self) -> None:
        self._guard(self._redis.ping)

    def close(self) -> None:
        self._redis.close()
