"""Cross-request batching: one model worker thread owns the device.

Requests `submit` a tensor of items (faces, `(F, ...)`) from the event loop and await the result.
The worker thread gathers queued items from any number of requests into one call of the batch
function, up to `max_batch` items, waiting at most `max_delay_s` after the oldest queued item
arrived for the batch to fill. A request's items may be split across consecutive batches, so
batches are always full when enough work is queued.

The queue is bounded in items: a submit that would overflow it fails at once with
`QueueFullError` (the HTTP layer answers 429). A submit whose awaiting task is cancelled (deadline,
client disconnect) removes its not-yet-started items from the queue; items already inside a
running batch finish and are thrown away, because a device call cannot be interrupted.

Other device work (the background network) is queued as a *call* with `run_call`: it counts as
one queued item, runs alone on the same worker thread between batches, in queue order.

Low-priority work (`submit(..., low_priority=True)`, the video jobs) waits in its own queue,
outside the 429 bound, and only fills what room the normal queue leaves in a batch: a photo
waits at most for the batch already running, never behind a video.

The batcher knows nothing about HTTP or faces: `fn(batch) -> (outputs, timings)` is any function
from a `(B, ...)` tensor to a `(B, ...)` tensor and a dict of named durations in seconds. Given a
CUDA `stream`, the worker runs every batch and call on it (`model.device.on_stream`). Each
batch is a `model_batch` span when a request it carries is traced (service/tracing.py). A failed
batch fails its requests only, unless its error poisons the device (`poisons_device`): then the
worker stops as if it had died: `on_death` is told first, then the running and queued work fails
with `BatcherClosedError`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from model.device import on_stream, poisons_device
from service import tracing_worker
from service.admission import BatchTimeEstimator
from service.queue_items import (
    BatcherClosedError,
    BatchReport,
    BatchResult,
    DeadlineUnreachableError,
    QueuedWork,
    QueueFullError,
)

logger = logging.getLogger(__name__)

BatchFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]
T = TypeVar("T")
_ONE_ITEM = torch.empty((1, 0))  # what a call job counts as in the queue


# One batch: (job, first item, end item) slices in batch order.
_Chunks = list[tuple[QueuedWork, int, int]]


class Batcher:
    """A bounded, deadline-aware queue in front of one worker thread that runs `fn`."""

    def __init__(
        self,
        fn: BatchFn,
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        on_batch: Callable[[BatchReport], None] | None = None,
        on_queue_wait: Callable[[float], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        on_death: Callable[[BaseException], None] | None = None,
        name: str = "osdface-model",
        stream: torch.cuda.Stream | None = None,
        span_attributes: Mapping[str, str] | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_delay_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_delay_s >= 0")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._fn = fn
        self._on_batch = on_batch or (lambda report: None)
        self._on_queue_wait = on_queue_wait or (lambda seconds: None)
        self._on_depth = on_depth or (lambda depth: None)
        self._on_death = on_death or (lambda exc: None)
        self._stream = stream  # the worker's own CUDA stream (None: the thread's current one)
        self._span_attributes = dict(span_attributes or {})  # of each model call's span
        self._cond = threading.Condition()
        self._queue: deque[QueuedWork] = deque()
        self._queued = 0  # items waiting, not counting the running batch
        self._low: deque[QueuedWork] = deque()  # low-priority jobs, served after `_queue`
        self._queued_low = 0
        self._running: list[QueuedWork] = []
        self._accepting = True
        self._stopping = False
        self._hurry = False  # run what is queued without waiting for batches to fill
        self.estimator = BatchTimeEstimator()  # seconds per call by size (under the lock)
        self._running_since: float | None = None
        self._running_size = 0
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)

    # --- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        """Items waiting for a batch."""
        with self._cond:
            return self._queued

    @property
    def accepting(self) -> bool:
        with self._cond:
            return self._accepting

    async def submit(
        self, items: torch.Tensor, *, deadline: float | None = None, low_priority: bool = False
    ) -> BatchResult:
        """Queue `items` (shape `(N, ...)`, N >= 1) and wait for their outputs.

        `deadline` is a `time.monotonic()` instant: items still queued after it are dropped
        and `TimeoutError` is raised. Cancelling the awaiting task drops queued items too.
        """
        if items.ndim < 1 or items.shape[0] < 1:
            raise ValueError("submit needs at least one item")
        loop = asyncio.get_running_loop()
        job = QueuedWork(items, loop.create_future(), loop, time.monotonic(), deadline)
        job.low = low_priority
        return await self._enqueue(job)

    async def run_call(self, fn: Callable[[], T], *, deadline: float | None = None) -> T:
        """Run `fn()` on the worker thread, alone, when its turn in the queue comes.

        It counts as one queued item (so a full queue refuses it with `QueueFullError`);
        `deadline` and cancellation work as for `submit`; `fn`'s exception is raised here.
        """
        loop = asyncio.get_running_loop()
        job = QueuedWork(_ONE_ITEM, loop.create_future(), loop, time.monotonic(), deadline, call=fn)
        return await self._enqueue(job)

    async def _enqueue(self, job: QueuedWork) -> Any:
        with self._cond:
            if job.low:
                if not self._accepting:
                    raise BatcherClosedError("the model worker is shutting down")
                self._low.append(job)
                self._queued_low += job.size
                self._cond.notify_all()
            else:
                self._admit_locked(job.size, job.deadline)
                self._queue.append(job)
                self._queued += job.size
                self._on_depth(self._queued)
                self._cond.notify_all()
        try:
            return await job.future
        finally:
            if not job.future.done() or job.future.cancelled():
                self._abandon(job)

    def admit(self, faces: int, deadline: float | None) -> None:
        """Raise what `submit` would raise for `faces` faces now, without queueing anything.

        Called before the upload is read (with the fewest faces a request can bring), so a full
        or late queue is refused before any byte is decoded.
        """
        with self._cond:
            self._admit_locked(faces, deadline)

    def predicted_finish_s(self, faces: int) -> float:
        """Seconds from now until `faces` more faces would be done, safety factor included."""
        with self._cond:
            return self._predicted_locked(faces)

    def seed_estimate(self, size: int, seconds: float) -> None:
        """A first speed estimate from a call made outside the worker (the warm-up batch)."""
        with self._cond:
            self.estimator.seed(size, seconds)

    def retry_after_s(self) -> float:
        with self._cond:
            return self._retry_after_locked()

    def _admit_locked(self, faces: int, deadline: float | None) -> None:
        if not self._accepting:
            raise BatcherClosedError("the model worker is shutting down")
        # A request bigger than the whole queue is let into an empty queue, never starved.
        if self._queued and self._queued + faces > self.max_queue:
            raise QueueFullError(
                f"model queue full ({self._queued} of {self.max_queue} faces waiting)",
                self._retry_after_locked(),
            )
        # An idle worker always takes work: refusing it on a (possibly stale) estimate would
        # leave nothing to run, so nothing would ever correct the estimate.
        if deadline is None or (not self._queued and self._running_since is None):
            return
        left = deadline - time.monotonic()
        predicted = self._predicted_locked(faces)
        if predicted > left:
            raise DeadlineUnreachableError(
                f"{self._queued} faces queued ahead: {faces} more would take about "
                f"{predicted:.1f} s, past this request's deadline ({max(left, 0.0):.1f} s left)",
                max(1.0, predicted - left),
            )

    def _predicted_locked(self, faces: int) -> float:
        running = None
        if self._running_since is not None:
            running = (self._running_size, time.monotonic() - self._running_since)
        return self.estimator.finish_seconds(
            self._queued + faces, self.max_batch, self.max_delay_s, running
        )

    def hurry(self) -> None:
        """Stop waiting for batches to fill (shutting down: no more work is coming)."""
        with self._cond:
            self._hurry = True
            self._cond.notify_all()

    def stop(self, timeout: float | None = None) -> bool:
        """Refuse new work, run what is queued, and end the worker. Returns False if it did not
        finish within `timeout` seconds; work still pending then fails with `BatcherClosedError`."""
        with self._cond:
            self._accepting = False
            self._stopping = self._hurry = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        finished = not self._thread.is_alive()
        if not finished:
            with self._cond:
                left = list(self._queue) + list(self._low) + self._running
                self._queue.clear()
                self._low.clear()
                self._queued = self._queued_low = 0
            for job in left:
                job.resolve(BatcherClosedError("shut down before this work ran"))
            logger.warning(
                "model worker still busy after %.1f s; %d jobs failed", timeout, len(left)
            )
        return finished

    # --- worker side -------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                chunks = self._next_batch()
                if chunks is None:
                    return
                self._execute(chunks)
        except BaseException as exc:  # the worker is gone: nothing queued can run any more
            logger.critical("the model worker stopped: %r", exc, exc_info=exc)
            with self._cond:
                self._accepting = False
                left = list(self._queue) + list(self._low) + self._running
                self._queue.clear()
                self._low.clear()
                self._queued = self._queued_low = 0
            self._on_death(exc)  # readiness off before the waiting requests hear of it
            for job in left:
                job.resolve(BatcherClosedError("the model worker stopped"))

    def _next_batch(self) -> _Chunks | None:
        """Block until a batch is due, then take it off the queue (None: stopped and empty)."""
        with self._cond:
            while True:
                if not self._queue and not self._low:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                # Wait for the batch to fill, but never longer than max_delay after the oldest.
                head = (self._queue or self._low)[0]
                wait = head.enqueued_at + self.max_delay_s - time.monotonic()
                waiting = self._queued + self._queued_low
                filling = waiting < self.max_batch and head.call is None
                if filling and not self._hurry and wait > 0:
                    self._cond.wait(wait)
                    continue
                self._drop_expired_locked()
                if self._queue or self._low:
                    return self._take_locked()

    def _drop_expired_locked(self) -> None:
        now = time.monotonic()
        queued = (*self._queue, *self._low)
        for job in [j for j in queued if j.deadline is not None and j.deadline <= now]:
            self._unqueue_locked(job)
            job.cancelled = True
            job.resolve(TimeoutError("deadline passed while queued"))
        self._on_depth(self._queued)

    def _take_locked(self) -> _Chunks:
        chunks: _Chunks = []
        room = self.max_batch
        if self._queue and self._queue[0].call is not None:  # a call runs alone
            room = 1
        while self._queue and room and (self._queue[0].call is None or not chunks):
            room = self._take_from_locked(self._queue, room, chunks)
        while self._low and room and not (chunks and chunks[0][0].call is not None):
            room = self._take_from_locked(self._low, room, chunks)  # low priority fills up
        self._running = [job for job, _, _ in chunks]
        self._running_since = time.monotonic()
        self._running_size = self.max_batch - room
        self._on_depth(self._queued)
        return chunks

    def _take_from_locked(self, queue: deque[QueuedWork], room: int, chunks: _Chunks) -> int:
        job = queue[0]
        count = min(room, job.size - job.taken)
        chunks.append((job, job.taken, job.taken + count))
        job.taken += count
        if job.low:
            self._queued_low -= count
        else:
            self._queued -= count
        if job.taken == job.size:
            queue.popleft()
        return room - count

    def _execute(self, chunks: _Chunks) -> None:
        started = time.monotonic()
        for job, _, _ in chunks:
            if job.started_at is None:
                job.started_at = started
                with tracing_worker.within(job.trace):  # its exemplar: the submitter's trace
                    self._on_queue_wait(started - job.enqueued_at)
        if chunks[0][0].call is not None:
            self._execute_call(chunks[0][0], started)
            return
        parts = [job.items[lo:hi] for job, lo, hi in chunks]
        inputs = parts[0] if len(parts) == 1 else torch.cat(parts)
        with tracing_worker.batch_span(chunks, self._span_attributes) as span:
            try:
                with on_stream(self._stream):
                    outputs, timings = self._fn(inputs)
                if outputs.shape[0] != inputs.shape[0]:
                    raise RuntimeError(f"batch fn returned {outputs.shape[0]} for {len(inputs)}")
            except Exception as exc:  # every request of the batch gets it; the HTTP layer logs it
                if poisons_device(exc):  # every later batch would fail too: the worker stops
                    raise
                span.failed(exc)
                for job, _, _ in chunks:
                    self._abandon(job)  # its items still queued (if split) will not run either
                    job.resolve(exc)
                self._finish_batch(started, None)
                return
            seconds = time.monotonic() - started
            span.ran(timings)
            self._on_batch(BatchReport(int(inputs.shape[0]), seconds, dict(timings)))
        offset = 0
        for job, lo, hi in chunks:
            self._deliver(job, lo, hi, outputs[offset : offset + hi - lo], seconds, timings)
            offset += hi - lo
        self._finish_batch(started, int(inputs.shape[0]))

    def _execute_call(self, job: QueuedWork, started: float) -> None:
        assert job.call is not None
        try:
            with on_stream(self._stream):
                value: Any = job.call()
        except Exception as exc:  # the awaiting request gets it; the HTTP layer maps or logs it
            if poisons_device(exc):
                raise
            value = exc
        job.done = 1
        job.resolve(value)
        self._finish_batch(started, None)  # not a batch of faces: no speed sample

    def _deliver(
        self,
        job: QueuedWork,
        lo: int,
        hi: int,
        outputs: torch.Tensor,
        seconds: float,
        timings: dict[str, float],
    ) -> None:
        if job.cancelled:
            return
        if job.out is None:
            job.out = torch.empty((job.size, *outputs.shape[1:]), dtype=outputs.dtype)
        job.out[lo:hi].copy_(outputs)
        job.done += hi - lo
        job.inference_s += seconds
        job.batches += 1
        for name, value in timings.items():
            job.timings[name] = job.timings.get(name, 0.0) + value
        if job.done == job.size:
            assert job.started_at is not None
            waited, links = job.started_at - job.enqueued_at, tuple(job.links)
            result = BatchResult(
                job.out, waited, job.inference_s, job.timings, job.batches, job.enqueued_at, links
            )
            job.resolve(result)

    def _finish_batch(self, started: float, size: int | None) -> None:
        """`size`: faces of a call that succeeded (a failed call teaches nothing about speed)."""
        seconds = time.monotonic() - started
        with self._cond:
            self._running = []
            self._running_since, self._running_size = None, 0
            if size is not None:
                self.estimator.observe(size, seconds)

    def _retry_after_locked(self) -> float:
        # Time to work through the queue ahead at the estimated speed; at least 1 s.
        if not self.estimator.known:
            per_batch = self.max_delay_s
            return max(1.0, per_batch * (math.ceil(self._queued / self.max_batch) + 1))
        return max(1.0, self._predicted_locked(0))

    def _abandon(self, job: QueuedWork) -> None:
        with self._cond:
            job.cancelled = True
            if job in self._queue or job in self._low:
                self._unqueue_locked(job)
                self._on_depth(self._queued)
                self._cond.notify_all()

    def _unqueue_locked(self, job: QueuedWork) -> None:
        if job.low:
            self._low.remove(job)
            self._queued_low -= job.size - job.taken
        else:
            self._queue.remove(job)
            self._queued -= job.size - job.taken
