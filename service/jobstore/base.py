"""The job store's interface: what every backend does, and how atomically.

Every replica of the service talks to one store; the store is the only place a job's state
lives. A replica runs a job under a lease: `claim` takes the oldest queued job (or one whose
lease expired: a takeover), `renew` keeps it, `progress` reports, `finish` ends it and `release`
hands it back. Every operation is atomic on its own (one SQLite transaction, one Redis script):
two replicas never hold one job, and a job that is cancelled or deleted is seen so by its owner
at its next `renew` or `progress`.

Times are seconds since the epoch. An operation's `now` defaults to the store's clock: this
host's for SQLite, the Redis server's `TIME` for Redis (so the replicas' clocks need not agree
on leases). Tests pass `now` to move time.

Every backend is safe to call from several threads at once.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Mapping
from typing import Any

from service.jobstore.record import FINISHED, PROGRESS_FIELDS, JobRecord, JobState

Records = list[JobRecord]
Ids = list[str]


class JobStoreError(Exception):
    """Base of the job store's errors."""


class StoreUnavailableError(JobStoreError):
    """The store cannot be reached or used (server down, database locked past the busy
    timeout, a folder that is not writable); the message names it, never a password."""


class IdempotencyConflictError(JobStoreError):
    """An idempotency key already names a job made from another upload."""

    def __init__(self, key: str, existing: JobRecord) -> None:
        super().__init__(
            f"the Idempotency-Key {key!r} was used for job {existing.id} with another upload "
            "(other bytes or fields); send a new key with a new upload"
        )
        self.key = key
        self.existing = existing


class StoreFullError(JobStoreError):
    """The store holds `limit` jobs already (queued, running or finished but not yet expired or
    deleted). `oldest_finished_at` is when the oldest finished job ended (None if none did): a
    slot frees at that time plus the retention."""

    def __init__(self, held: int, limit: int, oldest_finished_at: float | None) -> None:
        super().__init__(f"{held} video jobs held (limit {limit})")
        self.held = held
        self.limit = limit
        self.oldest_finished_at = oldest_finished_at


class LeaseStatus(enum.StrEnum):
    """What the owner of a running job learns from `renew` and `progress`."""

    HELD = "held"  # keep working
    CANCELLED = "cancelled"  # cancel requested: stop, then finish(id, owner, CANCELLED)
    LOST = "lost"  # another owner holds it, or it was released or finished: stop, write nothing
    GONE = "gone"  # deleted: stop, write nothing (the deleter removes the files)


class JobStore(abc.ABC):
    """Job records, the queue, the leases and the idempotency keys of every replica."""

    @abc.abstractmethod
    def create(self, record: JobRecord, *, max_jobs: int | None = None) -> tuple[JobRecord, bool]:
        """Store and enqueue a new job: `(record, True)`.

        Atomically, in this order: if `record.idempotency_key` already names a held job,
        nothing is stored and the answer is `(that job, False)` when its `upload_digest` equals
        the record's, `IdempotencyConflictError` otherwise; a job with the record's id already held
        is also answered `(it, False)` (a retried call). Then, when `max_jobs` is given and the
        store holds that many jobs (every state), `StoreFullError`. A retried submission is thus
        answered even when the store is full. The key is freed when its job is deleted or
        expires.
        """

    @abc.abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """The job, or None (also for an id that is not 32 hex digits)."""

    @abc.abstractmethod
    def list(self) -> Records:
        """Every held job, oldest first; one consistent snapshot."""

    @abc.abstractmethod
    def counts(self) -> dict[JobState, int]:
        """Held jobs by state, every state present (0 when none)."""

    @abc.abstractmethod
    def claim(self, owner: str, lease_s: float, *, now: float | None = None) -> JobRecord | None:
        """Atomically take the oldest job (by `created_at`, then id) that is queued or running
        with its lease expired (`lease_until <= now`); None when there is none.

        The job becomes running, owned by `owner` until `now + lease_s`, `started_at` set if
        unset; taking an expired lease adds 1 to `takeovers`. An expired job whose cancel was
        requested is not taken but ended `cancelled` (its owner died before it could).
        `owner` must be unique per process (`replica_id()`).
        """

    @abc.abstractmethod
    def renew(
        self, job_id: str, owner: str, lease_s: float, *, now: float | None = None
    ) -> LeaseStatus:
        """Extend the lease to `now + lease_s` if `owner` still holds the job.

        HELD, or CANCELLED when a cancel was requested (the lease is still extended, so the
        owner can stop cleanly); LOST when the job is not running under `owner` (taken over,
        released, finished); GONE when deleted. A lease that expired but was not yet taken over
        is still `owner`'s: the renew takes it again (HELD), because no one else wrote to the job;
        whichever of that renew and another replica's claim runs first wins.
        """

    @abc.abstractmethod
    def progress(self, job_id: str, owner: str, **fields: Any) -> LeaseStatus:
        """Set `fields` (names in PROGRESS_FIELDS) if `owner` holds the job: HELD or CANCELLED,
        written; LOST or GONE, nothing written. Does not extend the lease. ValueError for an
        unknown field."""

    @abc.abstractmethod
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
        """End the job `owner` holds as `state` (succeeded, failed or cancelled) with `error`
        and progress `fields`; `finished_at = now`, the lease and `eta_s` cleared. False, and
        nothing written, when `owner` does not hold it (LOST or GONE)."""

    @abc.abstractmethod
    def release(self, job_id: str, owner: str, *, now: float | None = None) -> bool:
        """Hand the job `owner` holds back to the queue (SIGTERM): queued, no owner, at its old
        place (by `created_at`), progress and `segments_done` kept so the next runner resumes.
        A job whose cancel was requested ends `cancelled` instead. False when `owner` does not
        hold it."""

    @abc.abstractmethod
    def cancel(self, job_id: str, *, now: float | None = None) -> JobRecord | None:
        """Cancel: a queued job ends `cancelled` at once; a running one gets `cancel_requested`
        (its owner sees CANCELLED at its next renew or progress); a finished one is left as it
        is. The job after that, or None when there is none."""

    @abc.abstractmethod
    def delete(self, job_id: str) -> JobRecord | None:
        """Remove the job and free its idempotency key; the record as it was, or None. A running
        owner then sees GONE. The caller removes the files (or, while the job runs, its owner
        does when it sees GONE)."""

    @abc.abstractmethod
    def expire(self, retention_s: float, *, now: float | None = None) -> Ids:
        """Remove the jobs finished at least `retention_s` ago (`finished_at <= now -
        retention_s`) and free their keys; their ids, for the caller to remove their files.
        Also ends `cancelled` the running jobs whose cancel was requested and whose lease
        expired."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailableError unless the store answers (for readiness)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store is not used after."""

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checked_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` if every name is a progress field; ValueError otherwise."""
    unknown = sorted(set(fields) - PROGRESS_FIELDS)
    if unknown:
        raise ValueError(f"not progress fields of a job: {', '.join(unknown)}")
    return dict(fields)


def checked_new(record: JobRecord) -> JobRecord:
    """`record` if it can be created: queued, no owner, a key that is None or not empty;
    ValueError otherwise."""
    if record.state is not JobState.QUEUED or record.owner is not None:
        raise ValueError(f"a new job is queued and has no owner, not {record.state}")
    if record.idempotency_key == "":
        raise ValueError("an empty idempotency key: pass None for none")
    return record


def checked_final(state: JobState) -> JobState:
    state = JobState(state)
    if state not in FINISHED:
        raise ValueError(f"a job ends succeeded, failed or cancelled, not {state}")
    return state
