"""The video jobs' store: one suite run against both backends, each real.

SQLite in a temporary folder; Redis as a real `redis-server` (Debian's package, installed by
.ci/run) on a free loopback port, no persistence, one per module; each test uses its own key
prefix. Time is moved by passing `now`, except where the store's own clock is the point
(concurrent claims).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.jobstore import (
    IdempotencyConflictError,
    JobRecord,
    JobState,
    JobStore,
    LeaseStatus,
    RedisJobStore,
    SqliteJobStore,
    StoreFullError,
    StoreUnavailableError,
    open_store,
    replica_id,
)
from service.jobstore.sqlite import DB_NAME
from tests.live_server import REPO, free_port
from tests.redis_helpers import redis_server

T0 = 1_700_000_000.0
LEASE = 10.0
Opener = Callable[[], JobStore]


def job(n: int = 0, **fields) -> JobRecord:
    """A queued job created at T0 + n."""
    return JobRecord.new(
        "My clip.mp4", ".mp4", {"crf": 18, "start_s": 1.5}, created_at=T0 + n, **fields
    )


# --- servers and stores ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis"), free_port()) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens another store on the same data (another connection or client) each call."""
    opened: list[JobStore] = []
    if request.param == "redis":
        url, prefix = request.getfixturevalue("redis_url"), f"test:{uuid.uuid4().hex}:"

        def make() -> JobStore:
            return RedisJobStore(url, prefix=prefix)
    else:

        def make() -> JobStore:
            return SqliteJobStore(tmp_path / "jobs" / DB_NAME)

    def open_one() -> JobStore:
        opened.append(make())
        return opened[-1]

    yield open_one
    for store in opened:
        store.close()


@pytest.fixture
def store(opener: Opener) -> JobStore:
    return opener()


def claimed(store: JobStore, owner: str, now: float = T0 + 100) -> JobRecord:
    record = store.claim(owner, LEASE, now=now)
    assert record is not None
    return record


# --- the record --------------------------------------------------------------------------------


def test_record_round_trips_every_field() -> None:
    record = JobRecord(
        id=uuid.uuid4().hex,
        filename="Été ü/clip.mov",
        suffix=".mov",
        options={"crf": 20, "duration_s": None, "nested": [1, 2.5]},
        state=JobState.RUNNING,
        created_at=T0 + 0.123456789,
        started_at=T0 + 1,
        finished_at=T0 + 2,
        frames_done=7,
        frames_total=9,
        fps=3.25,
        eta_s=0.5,
        faces=4,
        error={"type": "invalid_video", "message": "truncated"},
        idempotency_key="key-1",
        upload_digest="ab" * 32,
        segments_done=2,
        segments_total=3,
        owner="replica-a",
        lease_until=T0 + 30,
        cancel_requested=True,
        takeovers=1,
        segments_redone=1,
        trace={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )
    default = JobRecord(record.id, "", "")
    unchanged = [k for k, v in default.to_dict().items() if record.to_dict()[k] == v]
    assert unchanged == ["id"]  # every field is exercised below
    assert JobRecord.from_json(record.to_json()) == record
    assert JobRecord.from_fields(record.to_fields()) == record
    newer = record.to_dict() | {"field_of_a_newer_version": 1}
    assert JobRecord.from_dict(newer) == record
    assert (
        JobRecord.from_fields({"id": record.id, "filename": "a", "suffix": ".mp4"}).takeovers == 0
    )
    with pytest.raises(ValueError, match="32 lowercase hex"):
        JobRecord("../etc", "a", ".mp4")
    assert replica_id() != replica_id()


# --- create, read, idempotency, capacity -------------------------------------------------------


def test_create_get_list_counts(store: JobStore) -> None:
    a, b = job(2), job(1)
    assert store.create(a) == (a, True)
    assert store.create(b) == (b, True)
    assert store.get(a.id) == a
    assert store.get(uuid.uuid4().hex) is None
    assert store.get("not-an-id") is None
    assert [r.id for r in store.list()] == [b.id, a.id]  # oldest first
    claimed(store, "r1")
    counts = store.counts()
    assert counts == {s: 0 for s in JobState} | {JobState.QUEUED: 1, JobState.RUNNING: 1}
    assert store.create(a) == (a, False)  # a retried call with the same record


def test_same_idempotency_key_and_upload_is_one_job(store: JobStore) -> None:
    first, created = store.create(job(0, idempotency_key="k", upload_digest="d1"))
    again, created_again = store.create(job(1, idempotency_key="k", upload_digest="d1"))
    assert (created, created_again) == (True, False)
    assert again == first
    assert len(store.list()) == 1
    with pytest.raises(IdempotencyConflictError, match="another upload") as caught:
        store.create(job(2, idempotency_key="k", upload_digest="d2"))
    assert caught.value.existing == first
    assert len(store.list()) == 1
    other, created_other = store.create(job(3, idempotency_key="k2", upload_digest="d1"))
    assert created_other and other.id != first.id
    store.delete(first.id)  # the key is free again
    fresh, created_fresh = store.create(job(4, idempotency_key="k", upload_digest="d2"))
    assert created_fresh and fresh.id != first.id


def test_capacity_counts_every_held_job(store: JobStore) -> None:
    a, _ = store.create(job(0, idempotency_key="k", upload_digest="d"), max_jobs=2)
    store.create(job(1), max_jobs=2)
    with pytest.raises(StoreFullError) as full:
        store.create(job(2), max_jobs=2)
    assert (full.value.held, full.value.limit, full.value.oldest_finished_at) == (2, 2, None)
    assert store.create(job(3, idempotency_key="k", upload_digest="d"), max_jobs=2) == (a, False)
    running = claimed(store, "r1")
    assert store.finish(running.id, "r1", JobState.SUCCEEDED, now=T0 + 105.5)
    with pytest.raises(StoreFullError) as still_full:  # finished jobs hold a slot until expiry
        store.create(job(4), max_jobs=2)
    assert still_full.value.oldest_finished_at == T0 + 105.5
    assert store.expire(10.0, now=T0 + 120) == [running.id]
    assert store.create(job(5), max_jobs=2)[1]


# --- claims and leases -------------------------------------------------------------------------


def test_claims_take_the_oldest_first(store: JobStore) -> None:
    jobs = [job(n) for n in (3, 1, 2)]
    for record in jobs:
        store.create(record)
    order = [claimed(store, "r1", now=T0 + 100 + i) for i in range(3)]
    assert [r.created_at for r in order] == [T0 + 1, T0 + 2, T0 + 3]
    first = order[0]
    assert (first.state, first.owner, first.started_at) == (JobState.RUNNING, "r1", T0 + 100)
    assert first.lease_until == T0 + 100 + LEASE
    assert first.takeovers == 0
    assert store.claim("r2", LEASE, now=T0 + 105) is None  # all held, no lease expired


def test_concurrent_claims_never_share_a_job(opener: Opener) -> None:
    setup = opener()
    ids = {setup.create(job(n))[0].id for n in range(60)}
    shared = opener()  # two threads share this one; four more have their own connection
    stores = [shared, shared, *(opener() for _ in range(4))]
    got: list[list[str]] = [[] for _ in stores]
    errors: list[BaseException] = []
    start = threading.Barrier(len(stores))

    def claim_all(i: int) -> None:
        try:
            start.wait()
            while (record := stores[i].claim(f"owner-{i}", 60.0)) is not None:
                got[i].append(record.id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    every = [job_id for of_one in got for job_id in of_one]
    assert sorted(every) == sorted(ids)  # each job claimed exactly once
    owners = {job_id: f"owner-{i}" for i, of_one in enumerate(got) for job_id in of_one}
    assert {r.id: r.owner for r in setup.list()} == owners


CLAIMER = """
import sys
from pathlib import Path
from service.jobstore.sqlite import SqliteJobStore
store = SqliteJobStore(Path(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
while (record := store.claim(sys.argv[2], 60.0)) is not None:
    print(record.id, flush=True)
store.close()
"""


def test_two_processes_on_one_sqlite_file_never_share_a_job(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    with SqliteJobStore(path) as store:
        ids = {store.create(job(n))[0].id for n in range(80)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(path), f"process-{i}"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [process.communicate(timeout=60)[0].split() for process in processes]
    assert [process.returncode for process in processes] == [0, 0]
    every = outputs[0] + outputs[1]
    assert sorted(every) == sorted(ids)


def test_an_expired_lease_is_taken_over(store: JobStore) -> None:
    record = store.create(job(0))[0]
    claimed(store, "a", now=T0 + 100)
    assert store.claim("b", LEASE, now=T0 + 109) is None  # lease still held
    assert store.progress(record.id, "a", frames_done=30, segments_done=1) is LeaseStatus.HELD
    taken = claimed(store, "b", now=T0 + 110)  # lease_until <= now: expired
    assert (taken.id, taken.owner, taken.takeovers) == (record.id, "b", 1)
    assert taken.started_at == T0 + 100  # the first start is kept
    assert (taken.frames_done, taken.segments_done) == (30, 1)  # resumable
    assert store.renew(record.id, "a", LEASE, now=T0 + 111) is LeaseStatus.LOST
    assert store.progress(record.id, "a", frames_done=999) is LeaseStatus.LOST
    assert not store.finish(record.id, "a", JobState.SUCCEEDED)
    assert not store.release(record.id, "a")
    after = store.get(record.id)
    assert after is not None and (after.frames_done, after.owner) == (30, "b")
    assert store.progress(record.id, "b", segments_redone=1) is LeaseStatus.HELD
    assert store.finish(record.id, "b", JobState.SUCCEEDED, now=T0 + 120, frames_done=60)
    done = store.get(record.id)
    assert done is not None
    assert (done.state, done.frames_done, done.segments_redone) == (JobState.SUCCEEDED, 60, 1)
    assert (done.finished_at, done.owner, done.lease_until, done.eta_s) == (
        T0 + 120,
        None,
        None,
        None,
    )


def test_a_late_renew_keeps_a_lease_no_one_took(store: JobStore) -> None:
    record = store.create(job(0))[0]
    claimed(store, "a", now=T0 + 100)
    assert store.renew(record.id, "a", LEASE, now=T0 + 115) is LeaseStatus.HELD
    assert store.claim("b", LEASE, now=T0 + 120) is None
    held = store.get(record.id)
    assert held is not None and (held.owner, held.lease_until) == ("a", T0 + 125)


def test_release_hands_the_job_back_with_its_segments(store: JobStore) -> None:
    older, newer = store.create(job(1))[0], store.create(job(2))[0]
    claimed(store, "a", now=T0 + 100)
    store.progress(older.id, "a", frames_done=90, segments_done=3, fps=4.5, eta_s=12.0)
    assert store.release(older.id, "a", now=T0 + 101)
    back = store.get(older.id)
    assert back is not None
    assert (back.state, back.owner, back.lease_until, back.eta_s) == (
        JobState.QUEUED,
        None,
        None,
        None,
    )
    assert (back.segments_done, back.frames_done, back.started_at) == (3, 90, T0 + 100)
    again = claimed(store, "b", now=T0 + 102)  # its old place: before the newer job
    assert (again.id, again.segments_done, again.takeovers) == (older.id, 3, 0)
    assert store.renew(older.id, "a", LEASE, now=T0 + 103) is LeaseStatus.LOST
    assert claimed(store, "c", now=T0 + 103).id == newer.id


# --- cancel, delete, expire --------------------------------------------------------------------


def test_cancel_a_queued_job_ends_it_at_once(store: JobStore) -> None:
    record = store.create(job(0))[0]
    cancelled = store.cancel(record.id, now=T0 + 50)
    assert cancelled is not None
    assert (cancelled.state, cancelled.finished_at) == (JobState.CANCELLED, T0 + 50)
    assert store.get(record.id) == cancelled
    assert store.claim("a", LEASE, now=T0 + 100) is None
    assert store.cancel(uuid.uuid4().hex) is None


def test_cancel_a_running_job_stops_its_owner(store: JobStore) -> None:
    record = store.create(job(0))[0]
    claimed(store, "a", now=T0 + 100)
    asked = store.cancel(record.id, now=T0 + 101)
    assert asked is not None and asked.cancel_requested and asked.state is JobState.RUNNING
    assert store.renew(record.id, "a", LEASE, now=T0 + 102) is LeaseStatus.CANCELLED
    assert store.progress(record.id, "a", frames_done=5) is LeaseStatus.CANCELLED
    assert store.finish(record.id, "a", JobState.CANCELLED, now=T0 + 103)
    ended = store.get(record.id)
    assert ended is not None
    assert (ended.state, ended.finished_at, ended.frames_done) == (JobState.CANCELLED, T0 + 103, 5)
    assert store.cancel(record.id, now=T0 + 200) == ended  # finished: left as it is


def test_a_cancelled_job_whose_owner_died_ends_cancelled(store: JobStore) -> None:
    first, second = store.create(job(0))[0], store.create(job(1))[0]
    claimed(store, "a", now=T0 + 100)
    claimed(store, "a", now=T0 + 100)
    store.cancel(first.id)
    store.cancel(second.id)
    assert store.claim("b", LEASE, now=T0 + 111) is None  # not taken over, but ended
    assert store.expire(3600.0, now=T0 + 111) == []
    for record in (first, second):
        ended = store.get(record.id)
        assert ended is not None
        assert (ended.state, ended.finished_at) == (JobState.CANCELLED, T0 + 111)


def test_release_of_a_cancelled_job_ends_it(store: JobStore) -> None:
    record = store.create(job(0))[0]
    claimed(store, "a")
    store.cancel(record.id)
    assert store.release(record.id, "a", now=T0 + 101)
    ended = store.get(record.id)
    assert ended is not None and ended.state is JobState.CANCELLED


def test_delete_tells_the_owner_gone(store: JobStore) -> None:
    record = store.create(job(0, idempotency_key="k", upload_digest="d"))[0]
    claimed(store, "a")
    deleted = store.delete(record.id)
    assert deleted is not None and (deleted.id, deleted.state) == (record.id, JobState.RUNNING)
    assert store.get(record.id) is None
    assert store.list() == []
    assert store.renew(record.id, "a", LEASE) is LeaseStatus.GONE
    assert store.progress(record.id, "a", frames_done=3) is LeaseStatus.GONE
    assert not store.finish(record.id, "a", JobState.SUCCEEDED)
    assert not store.release(record.id, "a")
    assert store.get(record.id) is None  # nothing written back by the owner
    assert store.delete(record.id) is None
    assert store.delete("../../etc") is None
    assert store.claim("b", LEASE, now=T0 + 1000) is None


def test_expire_removes_old_finished_jobs_only(store: JobStore) -> None:
    old, recent, taken, waiting = (
        store.create(job(n, idempotency_key=f"k{n}"))[0] for n in range(4)
    )
    claimed(store, "a", now=T0 + 10)
    claimed(store, "a", now=T0 + 10)
    store.finish(old.id, "a", JobState.FAILED, {"type": "internal", "message": "x"}, now=T0 + 10)
    store.finish(recent.id, "a", JobState.SUCCEEDED, now=T0 + 50)
    assert claimed(store, "b", now=T0 + 60).id == taken.id  # its lease ends at T0 + 70
    assert store.expire(30.0, now=T0 + 40) == [old.id]  # finished exactly 30 s ago
    assert store.get(old.id) is None
    assert [r.id for r in store.list()] == [recent.id, taken.id, waiting.id]
    assert store.create(job(9, idempotency_key="k0"))[1]  # the expired job's key is free
    assert store.expire(30.0, now=T0 + 79) == []
    assert store.expire(30.0, now=T0 + 80) == [recent.id]


def test_bad_calls_are_refused(store: JobStore) -> None:
    record = store.create(job(0))[0]
    claimed(store, "a")
    with pytest.raises(ValueError, match="lease_until"):
        store.progress(record.id, "a", lease_until=T0 + 1e9)
    with pytest.raises(ValueError, match="succeeded, failed or cancelled"):
        store.finish(record.id, "a", JobState.QUEUED)
    with pytest.raises(ValueError, match="queued"):
        store.create(job(1, state=JobState.RUNNING))
    with pytest.raises(ValueError, match="empty idempotency key"):
        store.create(job(1, idempotency_key=""))
    unnamed = store.create(JobRecord.new("", ".mp4", {}))[0]  # an empty string is not None
    assert store.get(unnamed.id) == unnamed


# --- persistence -------------------------------------------------------------------------------


def test_jobs_survive_reopening(opener: Opener) -> None:
    store = opener()
    a, b, c = (
        store.create(job(n, idempotency_key=f"k{n}", upload_digest="d"))[0] for n in range(3)
    )
    claimed(store, "a", now=T0 + 100)
    store.progress(a.id, "a", frames_done=12, segments_done=1, fps=2.0)
    claimed(store, "a", now=T0 + 100)
    store.finish(b.id, "a", JobState.SUCCEEDED, now=T0 + 101)
    before = store.list()
    store.close()
    reopened = opener()
    assert reopened.list() == before
    assert reopened.create(job(5, idempotency_key="k2", upload_digest="d")) == (c, False)
    resumed = claimed(reopened, "new-process", now=T0 + 200)  # oldest first: the interrupted one
    assert (resumed.id, resumed.takeovers, resumed.segments_done) == (a.id, 1, 1)
    assert claimed(reopened, "new-process", now=T0 + 200).id == c.id


def test_redis_jobs_survive_a_server_restart(tmp_path: Path) -> None:
    port = free_port()
    persistent = ("--appendonly", "yes", "--appendfsync", "always")
    with redis_server(tmp_path, port, *persistent) as url:
        store = RedisJobStore(url)
        record = store.create(job(0, idempotency_key="k", upload_digest="d"))[0]
        claimed(store, "a")
        before = store.list()
        store.close()
    with redis_server(tmp_path, port, *persistent) as url:
        store = RedisJobStore(url)
        assert store.list() == before
        assert store.create(job(1, idempotency_key="k", upload_digest="d")) == (before[0], False)
        assert store.renew(record.id, "a", LEASE, now=T0 + 105) is LeaseStatus.HELD
        store.close()


# --- failures and the factory -----------------------------------------------------------------


def test_an_unreachable_redis_is_named_without_its_password() -> None:
    store = RedisJobStore(f"redis://user:s3cret@127.0.0.1:{free_port()}/0", timeout_s=1.0)
    with pytest.raises(StoreUnavailableError) as caught:
        store.get(uuid.uuid4().hex)
    assert "redis://user:***@127.0.0.1:" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(StoreUnavailableError):
        store.claim("a", LEASE)
    with pytest.raises(StoreUnavailableError):
        store.ping()
    store.close()


def test_a_locked_sqlite_database_is_unavailable_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / DB_NAME
    store = SqliteJobStore(path, busy_timeout_s=0.2)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailableError, match="locked"):
            store.create(job(0))
        assert store.list() == []  # readers do not wait for a writer (WAL)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.create(job(0))[1]
    store.close()
    with pytest.raises(StoreUnavailableError, match="closed"):
        store.list()


def test_an_unusable_jobs_folder_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StoreUnavailableError, match="cannot be opened"):
        open_store(tmp_path / "file" / "jobs")


def test_open_store_picks_the_backend(tmp_path: Path, redis_url: str) -> None:
    with open_store(tmp_path / "jobs") as embedded:
        assert isinstance(embedded, SqliteJobStore)
        embedded.ping()
    assert (tmp_path / "jobs" / DB_NAME).is_file()
    with open_store(tmp_path / "jobs", redis_url, redis_prefix="test:factory:") as shared:
        assert isinstance(shared, RedisJobStore)
        shared.ping()


OPENER = """
import sys, time
from pathlib import Path
from service.jobstore import SqliteJobStore
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
with SqliteJobStore(Path(sys.argv[1])) as store:
    print(sum(store.counts().values()))
"""


def test_processes_opening_a_new_sqlite_file_at_once_all_succeed(tmp_path: Path) -> None:
    """Replicas started together race to switch a new database to WAL; none may fail."""
    import time

    for attempt in range(3):
        path = tmp_path / f"{attempt}" / DB_NAME
        start = time.time() + 2.0  # the interpreters start, then all open at this instant
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", OPENER, str(path), repr(start)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        results = [process.communicate(timeout=60) for process in processes]
        for process, (out, err) in zip(processes, results, strict=True):
            assert process.returncode == 0 and out.strip() == "0", err
