"""Video jobs: long restores run beside /restore, on the same model worker, shared by replicas.

Every replica serves every job: the records, the queue, the leases and the idempotency keys
live in the job store (`service/jobstore/`: a SQLite database in `jobs_dir` by default, shared by
the replicas of one host; Redis or Valkey with `OSDFACE_JOBS_REDIS_URL`, shared by any number),
the files in `<jobs_dir>/<id>/` on a folder they all mount. Each replica's runner
(`service/job_runner.py`) claims the oldest queued job, runs it segment by segment under a
lease, and its faces go to the model worker as LOW-priority work, so a photo request waits at
most for the batch already running. A replica that dies lets its lease expire and another one
resumes the job from its last finished segment; one that stops (SIGTERM) hands its job back.

Jobs are bounded in number (`max_jobs`, counting finished ones until they are fetched,
deleted or expire), in upload bytes and in frames; finished jobs and their files are removed
`job_retention_s` after they end, by whichever replica looks first.

States: queued -> running -> succeeded | failed | cancelled; DELETE removes a job at any point (a
running job stops at its next frame, on whichever replica runs it; its files are removed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from model.errors import VideoCancelledError
from model.media.faces.detect import FaceDetector
from service.batching import Batcher
from service.job_runner import JobRunner, job_folder
from service.jobstore import (
    FINISHED,
    JOB_ID,
    JobRecord,
    JobState,
    JobStore,
    StoreFullError,
    StoreUnavailableError,
    open_store,
    replica_id,
)
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)

T = TypeVar("T")
COUNTS_TTL_S = 1.0  # /metrics reads the store's counts at most this often


def job_view(record: JobRecord) -> dict[str, Any]:
    """The JSON answer of GET /v1/jobs/{id} (`service.schemas.JobView`)."""
    total = record.frames_total
    return {
        "id": record.id,
        "state": str(record.state),
        "progress": {
            "frames_done": record.frames_done,
            "frames_total": total,
            "fraction": round(min(1.0, record.frames_done / total), 4) if total else None,
            "frames_per_second": round(record.fps, 3),
            "eta_s": None if record.eta_s is None else round(record.eta_s, 1),
            "segments_done": record.segments_done,
            "segments_total": record.segments_total,
        },
        "faces": record.faces,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "error": record.error,
        "takeovers": record.takeovers,
        "segments_redone": record.segments_redone,
        "result": f"/v1/jobs/{record.id}/result" if record.state is JobState.SUCCEEDED else None,
    }


class JobMetrics:
    """Store-wide jobs by state (every replica exports the same numbers: aggregate with `max`,
    never `sum`); this replica's finished jobs, frames, frames/s, takeovers, redone segments."""

    def __init__(self, registry: CollectorRegistry, counts: Callable[[], dict[JobState, int]]):
        self.by_state = Gauge(
            "osdface_jobs",
            "Video jobs held in the shared store now, by state (the same on every replica: "
            "aggregate with max).",
            ["state"],
            registry=registry,
        )

        def held(state: JobState) -> Callable[[], float]:
            return lambda: float(counts().get(state, 0))

        for state in JobState:
            self.by_state.labels(state=str(state)).set_function(held(state))
        self.finished = Counter(
            "osdface_jobs_finished_total",
            "Video jobs this replica ended, by final state.",
            ["state"],
            registry=registry,
        )
        for state in FINISHED:
            self.finished.labels(state=str(state))
        self.frames = Counter(
            "osdface_video_frames_total", "Video frames restored and encoded.", registry=registry
        )
        self.fps = Gauge(
            "osdface_video_frames_per_second",
            "Frames per second of the job this replica runs (0 when none runs).",
            registry=registry,
        )
        self.takeovers = Counter(
            "osdface_job_takeovers_total",
            "Jobs this replica took over after their lease expired (their replica died).",
            registry=registry,
        )
        self.segments_redone = Counter(
            "osdface_job_segments_redone_total",
            "Segments this replica restored again because an earlier runner was cut inside.",
            registry=registry,
        )


class JobManager:
    """The app's video jobs: the store for the routes, this replica's runner, the cleanup."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.root = settings.jobs_dir
        self.owner = replica_id()
        self.store: JobStore | None = None
        self.runner: JobRunner | None = None
        self.metrics = JobMetrics(registry, self._cached_counts)
        self._counts: tuple[float, dict[JobState, int]] = (0.0, {})
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle -----------------------------------------------------------------------

    def open(self) -> None:
        """Open the store (no server is contacted yet: an outage shows on use). A store that
        cannot be opened now (an unwritable folder, a locked database) is logged, and opened
        again at its next use: photos never wait for it."""
        url = self.settings.jobs_redis_url
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.store = open_store(self.root, url.get_secret_value() if url else None)
        except (OSError, StoreUnavailableError) as exc:
            logger.error("video jobs unavailable for now: %s", exc)

    async def start_after(self, loader: asyncio.Task, state: ServiceState) -> None:
        """Start the runner once the service has loaded (its model worker and detector)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(loader)
        if state.batcher is not None and state.detector is not None:
            self.start(state.batcher, state.detector)

    def start(self, batcher: Batcher, detector: FaceDetector) -> None:
        """Start the runner and the cleanup loop (once the model worker runs)."""
        try:
            store = self._store()
        except StoreUnavailableError:
            logger.error("video jobs will not run on this replica: the job store cannot be opened")
            return
        loop = asyncio.get_running_loop()
        self.runner = JobRunner(
            store, self.settings, self.metrics, self.owner, _submitter(batcher, loop), detector
        )
        self._tasks = [
            asyncio.create_task(self.runner.run(), name="osdface-jobs"),
            asyncio.create_task(self._cleanup_loop(), name="osdface-jobs-cleanup"),
        ]

    def begin_handback(self) -> None:
        """SIGTERM: claim no more; the running job goes back to the queue after its segment."""
        if self.runner is not None:
            self.runner.begin_handback()

    async def stop(self, timeout_s: float) -> None:
        """Hand the running job back within `timeout_s`, stop the loops, close the store."""
        if self.runner is not None:
            await self.runner.stop(timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.store is not None:
            self.store.close()

    # --- requests ------------------------------------------------------------------------

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A store operation off the event loop."""
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def check_room(self) -> None:
        """StoreFullError when `max_jobs` jobs are held (checked again, atomically, at create)."""
        held = await self.call(self._store().list)
        if len(held) >= self.settings.max_jobs:
            ends = [r.finished_at for r in held if r.finished_at is not None]
            raise StoreFullError(len(held), self.settings.max_jobs, min(ends, default=None))

    async def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        created = await self.call(self._store().create, record, max_jobs=self.settings.max_jobs)
        if created[1] and self.runner is not None:
            self.runner.wake.set()
        return created

    async def get(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        return await self.call(self._store().get, job_id)

    async def delete(self, job_id: str) -> JobRecord | None:
        """Cancel (wherever it runs) and remove a job and its files; the job as it ended."""
        if not JOB_ID.match(job_id):
            return None
        record = await self.call(self._store().delete, job_id)
        if record is None:
            return None
        if not record.finished:
            self.metrics.finished.labels(state=str(JobState.CANCELLED)).inc()
            record.state, record.finished_at, record.eta_s = JobState.CANCELLED, time.time(), None
        if record.owner is None or record.lease_until is None or record.lease_until < time.time():
            await asyncio.to_thread(shutil.rmtree, self.folder(job_id), True)
        # else its runner sees the job gone at its next lease renewal and removes the files
        return record

    def folder(self, job_id: str) -> Path:
        return job_folder(self.root, job_id)

    def new_folder(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex
        folder = self.folder(job_id)
        folder.mkdir(parents=True)
        return job_id, folder

    def _store(self) -> JobStore:
        if self.store is None:
            self.open()
        if self.store is None:
            raise StoreUnavailableError(f"the job store in {self.root} cannot be opened")
        return self.store

    def _cached_counts(self) -> dict[JobState, int]:
        when, counts = self._counts
        if self.store is not None and time.monotonic() - when > COUNTS_TTL_S:
            # On an outage: the last known numbers (the runner logs the outage).
            with contextlib.suppress(StoreUnavailableError):
                counts = self.store.counts()
            self._counts = (time.monotonic(), counts)
        return counts

    # --- retention -----------------------------------------------------------------------

    async def _cleanup_loop(self) -> None:
        period = min(30.0, max(0.2, self.settings.job_retention_s / 4))
        while True:
            with contextlib.suppress(StoreUnavailableError):
                await asyncio.to_thread(self.expire)
                await asyncio.to_thread(self.remove_stale_folders)
            await asyncio.sleep(period)

    def expire(self, now: float | None = None) -> int:
        """Remove finished jobs older than the retention time; how many were removed."""
        ids = self._store().expire(self.settings.job_retention_s, now=now)
        for job_id in ids:
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
        return len(ids)

    def remove_stale_folders(self) -> None:
        """Job folders no held job owns (a crash between upload and record, a delete while the
        runner was dying), once older than the retention time."""
        cutoff = time.time() - self.settings.job_retention_s
        store = self._store()
        for folder in self.root.iterdir():
            if not JOB_ID.match(folder.name):
                continue
            with contextlib.suppress(OSError):
                if folder.stat().st_mtime < cutoff and store.get(folder.name) is None:
                    shutil.rmtree(folder, ignore_errors=True)


def _submitter(
    batcher: Batcher, loop: asyncio.AbstractEventLoop
) -> Callable[[torch.Tensor, Callable[[], bool]], torch.Tensor]:
    """The runner's way to the model worker: low-priority submissions from its thread, given
    up when the job must stop (a cancelled job must not wait for the worker)."""

    def submit(crops: torch.Tensor, should_stop: Callable[[], bool]) -> torch.Tensor:
        future = asyncio.run_coroutine_threadsafe(batcher.submit(crops, low_priority=True), loop)
        while True:
            try:
                return future.result(timeout=0.5).output
            except concurrent.futures.TimeoutError:
                if should_stop():
                    future.cancel()
                    raise VideoCancelledError("the job stopped") from None

    return submit
