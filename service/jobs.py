"""Video jobs: long restores run one at a time beside /restore, on the same model worker.

A job is a folder `<jobs_dir>/<id>/` holding the upload (`input<suffix>`) and, when done, the
restored video (`output<suffix>`, written atomically by `model.media.video`). Jobs run in submission
order on one thread; their faces go to the model worker as LOW-priority work, so a photo
request waits at most for the batch already running. Jobs are bounded in number
(`max_jobs`, counting finished ones until they are fetched, deleted or expire), in upload bytes
and in frames; finished jobs and their files are removed `job_retention_s` after they end.

States: queued -> running -> succeeded | failed; DELETE removes a job at any point (a running
job stops at its next frame; what it wrote is removed).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from model.errors import OSDFaceError, VideoCancelledError
from model.media.faces.detect import FaceDetector
from model.media.video.restore import VideoOptions, VideoProgress, restore_video
from service.batching import Batcher
from service.settings import Settings
from service.state import ServiceState

logger = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class Job:
    """One video job; mutated by the job thread (progress) and the event loop (state)."""

    id: str
    folder: Path
    input: Path
    options: VideoOptions
    filename: str  # the client's name for the file, for messages (never used as a path)
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    frames_done: int = 0
    frames_total: int | None = None
    fps: float = 0.0
    eta_s: float | None = None
    faces: int = 0
    error: dict[str, str] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def output(self) -> Path:
        return self.folder / f"output{self.input.suffix}"

    def view(self) -> dict:
        """The JSON answer of GET /v1/jobs/{id}."""
        return {
            "id": self.id,
            "state": str(self.state),
            "progress": {
                "frames_done": self.frames_done,
                "frames_total": self.frames_total,
                "fraction": (
                    round(min(1.0, self.frames_done / self.frames_total), 4)
                    if self.frames_total
                    else None
                ),
                "frames_per_second": round(self.fps, 3),
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            },
            "faces": self.faces,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "result": f"/v1/jobs/{self.id}/result" if self.state is JobState.SUCCEEDED else None,
        }


class JobMetrics:
    """Jobs by state (read at scrape time), finished jobs by outcome, frames and frames/s."""

    def __init__(self, registry: CollectorRegistry, jobs: Callable[[], list[Job]]) -> None:
        self.by_state = Gauge(
            "osdface_jobs", "Video jobs held now, by state.", ["state"], registry=registry
        )

        def held(state: JobState) -> Callable[[], float]:
            return lambda: float(sum(1 for j in jobs() if j.state is state))

        for state in JobState:
            self.by_state.labels(state=str(state)).set_function(held(state))
        self.finished = Counter(
            "osdface_jobs_finished_total",
            "Video jobs that ended, by final state.",
            ["state"],
            registry=registry,
        )
        self.frames = Counter(
            "osdface_video_frames_total", "Video frames restored and encoded.", registry=registry
        )
        self.fps = Gauge(
            "osdface_video_frames_per_second",
            "Frames per second of the running video job (0 when none runs).",
            registry=registry,
        )


class JobManager:
    """The app's video jobs: create, look up, delete; one runner task, one cleanup task."""

    def __init__(self, settings: Settings, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.root = settings.jobs_dir
        self.jobs: dict[str, Job] = {}
        self.metrics = JobMetrics(registry, lambda: list(self.jobs.values()))
        self._queue: asyncio.Queue[str] | None = None
        self._tasks: list[asyncio.Task] = []
        self._current: asyncio.Future | None = None  # the running job's thread

    # --- lifecycle -----------------------------------------------------------------------

    async def start_after(self, loader: asyncio.Task, state: ServiceState) -> None:
        """Start once the service has loaded (its model worker and detector exist)."""
        with contextlib.suppress(Exception):
            await asyncio.shield(loader)
        if state.batcher is not None and state.detector is not None:
            self.start(state.batcher, state.detector)

    def start(self, batcher: Batcher, detector: FaceDetector) -> None:
        """Start the runner and the cleanup loop (called once the model worker runs)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale_folders()
        self._queue = asyncio.Queue()
        for job in self.jobs.values():  # submitted while loading
            if job.state is JobState.QUEUED:
                self._queue.put_nowait(job.id)
        self._tasks = [
            asyncio.create_task(self._runner(batcher, detector), name="osdface-jobs"),
            asyncio.create_task(self._cleanup_loop(), name="osdface-jobs-cleanup"),
        ]

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel every job; wait up to `timeout_s` for the running one to stop."""
        for job in self.jobs.values():
            job.cancel.set()
        if self._current is not None:
            await asyncio.wait({self._current}, timeout=timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- requests ------------------------------------------------------------------------

    def has_room(self) -> bool:
        return len(self.jobs) < self.settings.max_jobs

    def retry_after_s(self) -> float:
        """Seconds until the oldest finished job expires (a slot frees), at least 1."""
        ends = [j.finished_at for j in self.jobs.values() if j.finished_at is not None]
        if not ends:
            return 30.0
        return max(1.0, min(ends) + self.settings.job_retention_s - time.time())

    def new_folder(self) -> tuple[str, Path]:
        job_id = uuid.uuid4().hex
        folder = self.root / job_id
        folder.mkdir(parents=True)
        return job_id, folder

    def add(
        self, job_id: str, folder: Path, upload: Path, options: VideoOptions, filename: str
    ) -> Job:
        job = Job(job_id, folder, upload, options, filename)
        self.jobs[job_id] = job
        if self._queue is not None:
            self._queue.put_nowait(job_id)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id) if JOB_ID.match(job_id) else None

    def delete(self, job_id: str) -> Job | None:
        """Cancel (if it runs) and remove a job and its files; the job as it ended, or None."""
        job = self.get(job_id)
        if job is None:
            return None
        del self.jobs[job_id]
        job.cancel.set()
        running = job.state is JobState.RUNNING  # its thread removes the folder when it stops
        if job.state not in FINISHED:
            self._finish(job, JobState.CANCELLED)
        if not running:
            shutil.rmtree(job.folder, ignore_errors=True)
        return job

    # --- work ----------------------------------------------------------------------------

    async def _runner(self, batcher: Batcher, detector: FaceDetector) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            job_id = await self._queue.get()
            job = self.jobs.get(job_id)
            if job is None or job.state is not JobState.QUEUED:
                continue
            job.state, job.started_at = JobState.RUNNING, time.time()
            self._current = asyncio.ensure_future(
                asyncio.to_thread(self._run, job, batcher, detector, loop)
            )
            try:
                await asyncio.shield(self._current)
            except asyncio.CancelledError:
                job.cancel.set()
                raise
            finally:
                self._current = None
                self.metrics.fps.set(0.0)
                if job.id not in self.jobs:  # deleted while running: its files go now
                    shutil.rmtree(job.folder, ignore_errors=True)

    def _run(
        self,
        job: Job,
        batcher: Batcher,
        detector: FaceDetector,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """The job thread: restore the video, faces submitted to the model worker."""

        def restore_fn(crops: torch.Tensor) -> torch.Tensor:
            future = asyncio.run_coroutine_threadsafe(
                batcher.submit(crops, low_priority=True), loop
            )
            while True:  # wake up now and then: a cancelled job must not wait for the worker
                try:
                    return future.result(timeout=0.5).output
                except concurrent.futures.TimeoutError:
                    if job.cancel.is_set():
                        future.cancel()
                        raise VideoCancelledError(f"job {job.id} cancelled") from None

        def progress(p: VideoProgress) -> None:
            self.metrics.frames.inc(p.frames - job.frames_done)
            job.frames_done, job.frames_total = p.frames, p.total
            job.fps, job.eta_s = p.fps, p.eta_s
            self.metrics.fps.set(p.fps)

        try:
            result = restore_video(
                job.input,
                job.output,
                detector,
                restore_fn,
                job.options,
                progress=progress,
                should_stop=job.cancel.is_set,
            )
        except VideoCancelledError:
            self._finish(job, JobState.CANCELLED)
        except OSDFaceError as exc:
            logger.info("job %s failed: %s", job.id, exc)
            self._finish(job, JobState.FAILED, _error(exc, job))
        except Exception as exc:  # a bug or a device failure: logged once, the job fails
            logger.exception("job %s failed", job.id)
            self._finish(job, JobState.FAILED, {"type": "internal", "message": str(exc)})
        else:
            job.faces = result.faces
            job.frames_total = result.frames
            logger.info(
                "job %s done: %d frames, %d faces, %.2f frames/s",
                job.id,
                result.frames,
                result.faces,
                result.frames / max(result.seconds, 1e-9),
            )
            self._finish(job, JobState.SUCCEEDED)
        finally:
            job.input.unlink(missing_ok=True)  # the upload is not needed any more

    def _finish(self, job: Job, state: JobState, error: dict[str, str] | None = None) -> None:
        if job.state in FINISHED:
            return
        job.state, job.error, job.finished_at = state, error, time.time()
        job.eta_s = None
        self.metrics.finished.labels(state=str(state)).inc()

    # --- retention -----------------------------------------------------------------------

    async def _cleanup_loop(self) -> None:
        period = min(30.0, max(0.2, self.settings.job_retention_s / 4))
        while True:
            await asyncio.sleep(period)
            self.expire()

    def expire(self, now: float | None = None) -> int:
        """Remove finished jobs older than the retention time; how many were removed."""
        now = time.time() if now is None else now
        old = [
            j
            for j in self.jobs.values()
            if j.finished_at is not None and now - j.finished_at >= self.settings.job_retention_s
        ]
        for job in old:
            self.jobs.pop(job.id, None)
            shutil.rmtree(job.folder, ignore_errors=True)
        return len(old)

    def _remove_stale_folders(self) -> None:
        """Job folders left by an earlier process (its jobs are gone) older than retention."""
        cutoff = time.time() - self.settings.job_retention_s
        for folder in self.root.iterdir():
            if JOB_ID.match(folder.name) and folder.name not in self.jobs:
                with contextlib.suppress(OSError):
                    if folder.stat().st_mtime < cutoff:
                        shutil.rmtree(folder, ignore_errors=True)


def _error(exc: OSDFaceError, job: Job) -> dict[str, str]:
    """The error body of a failed job; the server's paths replaced by the client's file name."""
    from service.errors import to_service_error

    mapped = to_service_error(exc)
    kind = mapped.error_type if mapped is not None else "internal"
    message = str(exc).replace(str(job.output), "the output").replace(str(job.input), job.filename)
    return {"type": kind, "message": message}
