"""One replica's video-job worker: claim a job from the shared store, run it segment by segment
under a lease, hand it back on shutdown.

    runner = JobRunner(store, settings, metrics, owner, submit_faces, detector)
    await runner.run()          # until begin_handback(); one job at a time

A job's files live in `<jobs_dir>/<id>/`: the upload `input<suffix>`, the finished segments
`segments/<index><suffix>` (each written atomically: a file that exists is complete) and, at the
end, `output<suffix>`, the segments joined without re-encoding, with the audio. The store holds
`segments_done`: a runner that takes a job over (its owner was killed) or resumes it (after a
restart or a hand-back) starts at the first segment without a file, so it redoes at most the one
that was cut. A lease renewed every third of `job_lease_s` keeps the job this replica's; the
renewal also brings news of a cancel or a delete, and the job stops at its next frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import torch

from model.errors import OSDFaceError, VideoCancelledError
from model.media.faces.detect import FaceDetector
from model.media.video.io import VideoSource
from model.media.video.restore import VideoOptions, VideoProgress
from model.media.video.segments import (
    Segment,
    join_segments,
    plan_segments,
    restore_segment,
    segment_suffix,
)
from model.media.video.track import SmoothingConfig
from service.jobstore import JobRecord, JobState, JobStore, LeaseStatus, StoreUnavailableError
from service.settings import Settings
from service.tracing_worker import job_span, segment_span

logger = logging.getLogger(__name__)

POLL_S = 1.0  # how often an idle runner looks for work queued by another replica
PROGRESS_EVERY_S = 0.5  # store writes of a running job's progress, at most this often

# (crops, should_stop) -> restored crops; raises VideoCancelledError once should_stop() is true.
SubmitFaces = Callable[[torch.Tensor, Callable[[], bool]], torch.Tensor]


def options_to_dict(options: VideoOptions) -> dict[str, Any]:
    """The job's options as the store keeps them (JSON)."""
    return dataclasses.asdict(options)


def options_from_dict(data: dict[str, Any]) -> VideoOptions:
    """The options back; names this version does not know are ignored (rolling deploys)."""
    known = {f.name for f in dataclasses.fields(VideoOptions)}
    given = {k: v for k, v in data.items() if k in known}
    smoothing = given.pop("smoothing", None)
    if isinstance(smoothing, dict):
        fields = {f.name for f in dataclasses.fields(SmoothingConfig)}
        given["smoothing"] = SmoothingConfig(**{k: v for k, v in smoothing.items() if k in fields})
    return VideoOptions(**given)


def job_folder(root: Path, job_id: str) -> Path:
    return root / job_id


class _StopError(Exception):
    """The job stops on this replica; `status` says why (CANCELLED, LOST, GONE, or HELD when
    the replica hands it back)."""

    def __init__(self, status: LeaseStatus) -> None:
        super().__init__(str(status))
        self.status = status


class Lease:
    """Keeps one job's lease: a thread renews it every third of `lease_s`; `status` is the
    latest answer (a store outage keeps the last one: the lease may still be ours)."""

    def __init__(self, store: JobStore, job_id: str, owner: str, lease_s: float) -> None:
        self.store, self.job_id, self.owner, self.lease_s = store, job_id, owner, lease_s
        self.status = LeaseStatus.HELD
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def note(self, status: LeaseStatus) -> None:
        if self.status is LeaseStatus.HELD or status is not LeaseStatus.HELD:
            self.status = status

    @property
    def lost(self) -> bool:
        return self.status is not LeaseStatus.HELD

    def _keep(self) -> None:
        while not self._done.wait(self.lease_s / 3):
            try:
                self.note(self.store.renew(self.job_id, self.owner, self.lease_s))
            except StoreUnavailableError as exc:
                logger.warning("job %s: lease not renewed: %s", self.job_id, exc)
            if self.lost:
                return


@dataclasses.dataclass
class _Run:
    """What one runner knows of the job it holds."""

    record: JobRecord
    folder: Path
    options: VideoOptions
    lease: Lease
    frames_base: int = 0  # frames in the segments finished before this segment
    faces: int = 0
    segments_done: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    frames_here: int = 0  # frames this runner restored (for frames/s)
    segment_frames: int = 0  # frames of the current segment reported so far
    last_write: float = 0.0

    @property
    def input(self) -> Path:
        return self.folder / f"input{self.record.suffix}"

    @property
    def output(self) -> Path:
        return self.folder / f"output{self.record.suffix}"

    def segment_path(self, segment: Segment) -> Path:
        return self.folder / "segments" / f"{segment.index:05d}{segment_suffix(self.output)}"


class JobRunner:
    """Claims jobs from the store and runs them, one at a time, on this replica."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        metrics: Any,
        owner: str,
        submit_faces: SubmitFaces,
        detector: FaceDetector,
    ) -> None:
        self.store, self.settings, self.metrics, self.owner = store, settings, metrics, owner
        self.submit_faces, self.detector = submit_faces, detector
        self.wake = asyncio.Event()
        self._handing_back = threading.Event()  # no new claims; stop after this segment
        self._hard_stop = threading.Event()  # stop at the next frame (the grace ran out)
        self._current: asyncio.Future | None = None
        self._store_down = False

    # --- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Claim and run jobs until `begin_handback`."""
        while not self._handing_back.is_set():
            record = await self._claim()
            if record is None:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), POLL_S)
                continue
            self._current = asyncio.ensure_future(asyncio.to_thread(self._run_job, record))
            try:
                await asyncio.shield(self._current)
            except Exception:  # e.g. the store failed while ending the job: its lease expires
                logger.exception("job %s: the runner failed; the job is resumed later", record.id)
            finally:
                self._current = None
                self.metrics.fps.set(0.0)

    def begin_handback(self) -> None:
        """Stop claiming; the running job hands its lease back after its current segment.
        Safe from a signal handler (sets flags only)."""
        self._handing_back.set()

    async def stop(self, timeout_s: float) -> None:
        """Hand back: wait up to `timeout_s` for the current segment, then stop it at its next
        frame (that segment is redone elsewhere); the job goes back to the queue either way."""
        self.begin_handback()
        self.wake.set()
        current = self._current
        if current is None:
            return
        done, _ = await asyncio.wait({current}, timeout=max(timeout_s, 0.0))
        if not done:
            logger.info("shutdown grace over: the running job stops mid-segment")
            self._hard_stop.set()
            await asyncio.wait({current}, timeout=30)

    async def _claim(self) -> JobRecord | None:
        try:
            record = await asyncio.to_thread(
                self.store.claim, self.owner, self.settings.job_lease_s
            )
        except StoreUnavailableError as exc:
            if not self._store_down:
                logger.warning("video jobs paused: %s", exc)
            self._store_down = True
            return None
        if self._store_down:
            logger.info("video jobs: the store answers again")
            self._store_down = False
        return record

    # --- one job (on a worker thread) ----------------------------------------------------------

    def _run_job(self, record: JobRecord) -> None:
        if record.takeovers:
            self.metrics.takeovers.inc()
        folder = job_folder(self.settings.jobs_dir, record.id)
        attributes = {"osdface.takeovers": record.takeovers, "osdface.replica": self.owner}
        with (
            Lease(self.store, record.id, self.owner, self.settings.job_lease_s) as lease,
            job_span(record.id, record.trace, attributes) as span,
        ):
            run = _Run(record, folder, options_from_dict(record.options), lease)
            try:
                self._restore(run)
                span.set("osdface.frames", run.frames_base)
            except _StopError as stop:
                self._stopped(run, stop.status)
            except VideoCancelledError:
                self._stopped(run, lease.status)
            except OSDFaceError as exc:
                logger.info("job %s failed: %s", record.id, exc)
                self._end(run, JobState.FAILED, job_error(exc, run))
            except StoreUnavailableError as exc:  # the lease expires; another replica resumes
                logger.warning("job %s: the store stopped answering: %s", record.id, exc)
            except Exception as exc:  # a bug or a device failure: logged once, the job fails
                logger.exception("job %s failed", record.id)
                self._end(run, JobState.FAILED, {"type": "internal", "message": str(exc)})

    def _restore(self, run: _Run) -> None:
        record = run.record
        with VideoSource(
            run.input, start_s=run.options.start_s, duration_s=run.options.duration_s
        ) as source:
            info, total = source.info, source.expected_frames()
        segments = plan_segments(info, run.options, self.settings.job_segment_frames)
        (run.folder / "segments").mkdir(exist_ok=True)
        first = self._resume_point(run, segments)
        self._write(run, frames_total=total, segments_total=len(segments), force=True)

        def should_stop() -> bool:
            return run.lease.lost or self._hard_stop.is_set()

        for segment in segments[first:]:
            self._check(run, between_segments=True)
            run.segment_frames = 0
            with segment_span(segment.index) as span:  # the faces' model calls link to it
                done = restore_segment(
                    run.input,
                    run.segment_path(segment),
                    self.detector,
                    lambda crops: self.submit_faces(crops, should_stop),
                    run.options,
                    segment,
                    progress=lambda p: self._progress(run, p, total),
                    should_stop=should_stop,
                )
                span.set("osdface.frames", done.frames)
                span.set("osdface.faces", done.faces)
            run.frames_base += done.frames
            run.faces += done.faces
            run.segments_done = segment.index + 1
            self._write(
                run,
                frames_done=run.frames_base,
                faces=run.faces,
                segments_done=segment.index + 1,
                force=True,
            )
        self._check(run, between_segments=False)
        paths = [run.segment_path(s) for s in segments]
        joined = join_segments(paths, run.input, run.output, run.options)
        if self.store.finish(
            record.id,
            self.owner,
            JobState.SUCCEEDED,
            frames_done=joined.frames,
            frames_total=joined.frames,
            faces=run.faces,
            segments_done=len(segments),
            eta_s=None,
        ):
            self.metrics.finished.labels(state=str(JobState.SUCCEEDED)).inc()
            _remove_work_files(run)
            seconds = time.monotonic() - run.started
            logger.info(
                "job %s done: %d frames, %d faces, %.2f frames/s here",
                record.id,
                joined.frames,
                run.faces,
                run.frames_here / max(seconds, 1e-9),
            )

    def _resume_point(self, run: _Run, segments: list[Segment]) -> int:
        """The first segment to restore: after those an earlier runner finished (their files
        exist); their frames and faces carried over. Counts the cut segment as redone."""
        record = run.record
        first = 0
        while first < min(record.segments_done, len(segments)):
            if not run.segment_path(segments[first]).is_file():
                break
            run.frames_base += _frames_in(run.segment_path(segments[first]))
            first += 1
        run.segments_done = first
        if first:
            run.faces = record.faces
        if record.frames_done > run.frames_base:  # a runner was cut inside segment `first`
            self.metrics.segments_redone.inc()
            self._write(run, segments_redone=record.segments_redone + 1, force=True)
            logger.info(
                "job %s: resumed at segment %d of %d (redoing it), takeovers %d",
                record.id,
                first,
                len(segments),
                record.takeovers,
            )
        return first

    def _progress(self, run: _Run, p: VideoProgress, total: int | None) -> None:
        new = max(0, p.frames - run.segment_frames)
        run.segment_frames = p.frames
        run.frames_here += new
        self.metrics.frames.inc(new)
        frames = run.frames_base + p.frames
        fps = run.frames_here / max(time.monotonic() - run.started, 1e-9)
        self.metrics.fps.set(fps)
        eta = None if total is None else max(0, total - frames) / max(fps, 1e-9)
        self._write(run, frames_done=frames, fps=fps, eta_s=eta)

    def _write(self, run: _Run, *, force: bool = False, **fields: Any) -> None:
        """Progress to the store (throttled unless `force`); the answer may stop the job."""
        now = time.monotonic()
        if not force and now - run.last_write < PROGRESS_EVERY_S:
            return
        run.last_write = now
        run.lease.note(self.store.progress(run.record.id, self.owner, **fields))

    def _check(self, run: _Run, *, between_segments: bool) -> None:
        if run.lease.lost:
            raise _StopError(run.lease.status)
        if self._hard_stop.is_set() or (between_segments and self._handing_back.is_set()):
            raise _StopError(LeaseStatus.HELD)
        if not between_segments:  # about to join: the lease must still be ours
            run.lease.note(self.store.renew(run.record.id, self.owner, self.settings.job_lease_s))
            if run.lease.lost:
                raise _StopError(run.lease.status)

    def _stopped(self, run: _Run, status: LeaseStatus) -> None:
        """The job stopped before its end: hand it back, end it cancelled, or leave it."""
        job_id = run.record.id
        if status is LeaseStatus.CANCELLED:
            self._end(run, JobState.CANCELLED, None)
        elif status is LeaseStatus.GONE:  # deleted: its files go now
            shutil.rmtree(run.folder, ignore_errors=True)
            logger.info("job %s deleted while running; stopped", job_id)
        elif status is LeaseStatus.LOST:
            logger.warning("job %s: lease lost to another replica; stopped here", job_id)
        elif self.store.release(job_id, self.owner):
            logger.info("job %s handed back after %d segments", job_id, run.segments_done)

    def _end(self, run: _Run, state: JobState, error: dict[str, str] | None) -> None:
        if self.store.finish(run.record.id, self.owner, state, error, eta_s=None):
            self.metrics.finished.labels(state=str(state)).inc()
            _remove_work_files(run)


def _frames_in(path: Path) -> int:
    """Video frames in a finished segment file (an empty file: a segment without frames)."""
    if path.stat().st_size == 0:
        return 0
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def _remove_work_files(run: _Run) -> None:
    """The upload and the segments are not needed once a job has ended."""
    run.input.unlink(missing_ok=True)
    shutil.rmtree(run.folder / "segments", ignore_errors=True)


def job_error(exc: OSDFaceError, run: _Run) -> dict[str, str]:
    """The error body of a failed job; the server's paths replaced by the client's file name."""
    from service.errors import to_service_error

    mapped = to_service_error(exc)
    kind = mapped.error_type if mapped is not None else "internal"
    message = str(exc)
    for path, name in ((run.output, "the output"), (run.input, run.record.filename)):
        message = message.replace(str(path), name)
    message = message.replace(str(run.folder / "segments"), "a segment").replace(
        str(run.folder), run.record.filename
    )
    return {"type": kind, "message": message}
