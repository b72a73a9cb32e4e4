"""The embedded job store: one SQLite database file in the jobs folder (stdlib `sqlite3`).

No server to run. WAL journal, so readers never wait for the writer; every write is one
`BEGIN IMMEDIATE` transaction, so two processes that share the folder (replicas on one host)
serialise their claims and never take one job twice; a process that waits longer than the busy
timeout gets StoreUnavailableError. `synchronous=NORMAL`: a process killed at any point loses
nothing committed (a power cut may lose the last transactions, never the file's consistency).
The folder must be on a local file system: SQLite's locks do not hold over NFS or SMB, so
replicas on several hosts use the Redis backend.

Each job is one row: the record as JSON, plus the columns the queries select on.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

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
from service.jobstore.record import JOB_ID, JobRecord, JobState

DB_NAME = "jobs.sqlite3"
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    lease_until REAL,
    idempotency_key TEXT UNIQUE,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_by_end ON jobs (finished_at);
"""
_COLUMNS = "id, state, created_at, finished_at, lease_until, idempotency_key, data"

T = TypeVar("T")


def _set_wal(db: sqlite3.Connection, timeout_s: float) -> None:
    """Switch the database to WAL. Two processes opening a new file at once (replicas started
    together) race for it, and SQLite answers "locked" at once there, without its busy
    handler: try again until the busy timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SqliteJobStore(JobStore):
    """Jobs in `<jobs_dir>/jobs.sqlite3`; one connection per store, used under a lock."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            _set_wal(self._db, busy_timeout_s)
            self._db.execute("PRAGMA synchronous=NORMAL")
        except (OSError, sqlite3.Error) as exc:
            message = f"the job database {self.path} cannot be opened: {exc}"
            raise StoreUnavailableError(message) from exc
        self._run(self._migrate)

    # --- plumbing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction under this store's lock; a write takes the database's write lock at
        once (BEGIN IMMEDIATE), so its reads and writes see no other process in between."""
        with self._lock:
            if self._db is None:
                raise StoreUnavailableError(f"the job database {self.path} is closed")
            db = self._db
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def _run(self, work: Callable[[sqlite3.Connection], T], *, write: bool = True) -> T:
        try:
            with self._tx(write) as db:
                return work(db)
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk full, I/O
            raise StoreUnavailableError(f"the job database {self.path}: {exc}") from exc

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreUnavailableError(
                f"the job database {self.path} has schema {version}, newer than this "
                f"version's {SCHEMA_VERSION}"
            )
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    def _load(db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobRecord.from_json(row[0])

    @staticmethod
    def _save(db: sqlite3.Connection, record: JobRecord, *, new: bool = False) -> None:
        values = (
            record.id,
            str(record.state),
            record.created_at,
            record.finished_at,
            record.lease_until,
            record.idempotency_key,
            record.to_json(),
        )
        verb = "INSERT" if new else "REPLACE"
        db.execute(f"{verb} INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", values)

    def _owned(self, job_id: str, owner: str, change: Callable[[JobRecord], None]) -> LeaseStatus:
        """Apply `change` to the job if `owner` holds it; the lease status seen."""

        def work(db: sqlite3.Connection) -> LeaseStatus:
            record = self._load(db, job_id)
            if record is None:
                return LeaseStatus.GONE
            if record.state is not JobState.RUNNING or record.owner != owner:
                return LeaseStatus.LOST
            status = LeaseStatus.CANCELLED if record.cancel_requested else LeaseStatus.HELD
            change(record)
            self._save(db, record)
            return status

        return self._run(work)

    @staticmethod
    def _now(now: float | None) -> float:
        return time.time() if now is None else now

    @staticmethod
    def _end(record: JobRecord, state: JobState, now: float) -> None:
        record.state, record.finished_at = state, now
        record.owner = record.lease_until = record.eta_s = None

    # --- the interface -----------------------------------------------------------------------

    def create(self, record: JobRecord, *, max_jobs: int | None = None) -> tuple[JobRecord, bool]:
        checked_new(record)

        def work(db: sqlite3.Connection) -> tuple[JobRecord, bool]:
            same = self._load(db, record.id)
            if same is not None:
                return same, False
            key = record.idempotency_key
            if key is not None:
                row = db.execute("SELECT data FROM jobs WHERE idempotency_key = ?", (key,))
                found = row.fetchone()
                if found is not None:
                    existing = JobRecord.from_json(found[0])
                    if existing.upload_digest != record.upload_digest:
                        raise IdempotencyConflictError(key, existing)
                    return existing, False
            if max_jobs is not None:
                held, oldest = db.execute("SELECT COUNT(*), MIN(finished_at) FROM jobs").fetchone()
                if held >= max_jobs:
                    raise StoreFullError(held, max_jobs, oldest)
            self._save(db, record, new=True)
            return record, True

        return self._run(work)

    def get(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        return self._run(lambda db: self._load(db, job_id), write=False)

    def list(self) -> Records:
        def work(db: sqlite3.Connection) -> Records:
            rows = db.execute("SELECT data FROM jobs ORDER BY created_at, id").fetchall()
            return [JobRecord.from_json(row[0]) for row in rows]

        return self._run(work, write=False)

    def counts(self) -> dict[JobState, int]:
        def work(db: sqlite3.Connection) -> dict[JobState, int]:
            rows = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
            found = {JobState(state): n for state, n in rows}
            return {state: found.get(state, 0) for state in JobState}

        return self._run(work, write=False)

    def claim(self, owner: str, lease_s: float, *, now: float | None = None) -> JobRecord | None:
        t = self._now(now)

        def work(db: sqlite3.Connection) -> JobRecord | None:
            self._reap(db, t)
            row = db.execute(
                "SELECT data FROM jobs WHERE state = 'queued' "
                "OR (state = 'running' AND lease_until <= ?) ORDER BY created_at, id LIMIT 1",
                (t,),
            ).fetchone()
            if row is None:
                return None
            record = JobRecord.from_json(row[0])
            if record.state is JobState.RUNNING:
                record.takeovers += 1
            record.state, record.owner, record.lease_until = JobState.RUNNING, owner, t + lease_s
            if record.started_at is None:
                record.started_at = t
            self._save(db, record)
            return record

        return self._run(work)

    def _reap(self, db: sqlite3.Connection, now: float) -> None:
        """End `cancelled` the expired running jobs whose cancel was requested."""
        rows = db.execute(
            "SELECT data FROM jobs WHERE state = 'running' AND lease_until <= ?", (now,)
        ).fetchall()
        for (data,) in rows:
            record = JobRecord.from_json(data)
            if record.cancel_requested:
                self._end(record, JobState.CANCELLED, now)
                self._save(db, record)

    def renew(
        self, job_id: str, owner: str, lease_s: float, *, now: float | None = None
    ) -> LeaseStatus:
        t = self._now(now)
        return self._owned(job_id, owner, lambda r: setattr(r, "lease_until", t + lease_s))

    def progress(self, job_id: str, owner: str, **fields: Any) -> LeaseStatus:
        values = checked_fields(fields)

        def change(record: JobRecord) -> None:
            for name, value in values.items():
                setattr(record, name, value)

        return self._owned(job_id, owner, change)

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
        final, values, t = checked_final(state), checked_fields(fields), self._now(now)

        def change(record: JobRecord) -> None:
            for name, value in values.items():
                setattr(record, name, value)
            record.error = error
            self._end(record, final, t)

        return self._owned(job_id, owner, change) in (LeaseStatus.HELD, LeaseStatus.CANCELLED)

    def release(self, job_id: str, owner: str, *, now: float | None = None) -> bool:
        t = self._now(now)

        def change(record: JobRecord) -> None:
            if record.cancel_requested:
                self._end(record, JobState.CANCELLED, t)
                return
            record.state, record.fps = JobState.QUEUED, 0.0
            record.owner = record.lease_until = record.eta_s = None

        return self._owned(job_id, owner, change) in (LeaseStatus.HELD, LeaseStatus.CANCELLED)

    def cancel(self, job_id: str, *, now: float | None = None) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        t = self._now(now)

        def work(db: sqlite3.Connection) -> JobRecord | None:
            record = self._load(db, job_id)
            if record is None or record.finished:
                return record
            if record.state is JobState.QUEUED:
                self._end(record, JobState.CANCELLED, t)
            else:
                record.cancel_requested = True
            self._save(db, record)
            return record

        return self._run(work)

    def delete(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None

        def work(db: sqlite3.Connection) -> JobRecord | None:
            record = self._load(db, job_id)
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return record

        return self._run(work)

    def expire(self, retention_s: float, *, now: float | None = None) -> Ids:
        t = self._now(now)

        def work(db: sqlite3.Connection) -> Ids:
            self._reap(db, t)
            cutoff = (t - retention_s,)
            rows = db.execute("SELECT id FROM jobs WHERE finished_at <= ?", cutoff).fetchall()
            db.execute("DELETE FROM jobs WHERE finished_at <= ?", cutoff)
            return [row[0] for row in rows]

        return self._run(work)

    def ping(self) -> None:
        self._run(lambda db: db.execute("SELECT 1").fetchone(), write=False)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
