"""The video jobs' shared state: records, queue, leases and idempotency keys, in SQLite (the
embedded default, one host) or Redis/Valkey (any number of hosts); see `base.JobStore`."""

from __future__ import annotations

from pathlib import Path

from service.jobstore.base import (
    IdempotencyConflictError,
    JobStore,
    JobStoreError,
    LeaseStatus,
    StoreFullError,
    StoreUnavailableError,
)
from service.jobstore.record import FINISHED, JOB_ID, JobRecord, JobState, replica_id
from service.jobstore.redis_store import DEFAULT_PREFIX, RedisJobStore
from service.jobstore.sqlite import DB_NAME, SqliteJobStore

__all__ = [
    "FINISHED",
    "JOB_ID",
    "IdempotencyConflictError",
    "JobRecord",
    "JobState",
    "JobStore",
    "JobStoreError",
    "LeaseStatus",
    "RedisJobStore",
    "SqliteJobStore",
    "StoreFullError",
    "StoreUnavailableError",
    "open_store",
    "replica_id",
]


def open_store(
    jobs_dir: Path, redis_url: str | None = None, *, redis_prefix: str = DEFAULT_PREFIX
) -> JobStore:
    """The Redis store at `redis_url` when given, else the SQLite database
    `<jobs_dir>/jobs.sqlite3` (the folder is made). Neither contacts a server here: call
    `ping()` to check one."""
    if redis_url:
        return RedisJobStore(redis_url, prefix=redis_prefix)
    return SqliteJobStore(Path(jobs_dir) / DB_NAME)
