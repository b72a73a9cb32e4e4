"""What flows through the model worker's queue: the queued work, its results, its refusals.

Used by `service/batching.py` (the worker) and by the error table (`service/errors.py`), which
maps the refusals to HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from service import tracing


class RefusedError(Exception):
    """Work not taken now; try again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFullError(RefusedError):
    """The queue has no room for the submitted items."""


class DeadlineUnreachableError(RefusedError):
    """The work queued ahead would not finish before this request's deadline."""


class BatcherClosedError(Exception):
    """The batcher stopped taking work (shutdown) or stopped before this work ran."""


@dataclass(frozen=True)
class BatchReport:
    """One model call, as seen by the `on_batch` hook (called on the worker thread)."""

    size: int
    seconds: float
    timings: dict[str, float]


@dataclass
class BatchResult:
    """What `submit` returns: outputs in submission order and where the time went.

    `queue_wait_s` runs from submit (`enqueued_at`, a `time.monotonic()` instant) to the start
    of the first batch holding one of the items; `inference_s` and `timings` add up the batches
    that held them (shared with other requests); `links`: those batches' spans, when traced.
    """

    output: torch.Tensor
    queue_wait_s: float
    inference_s: float
    timings: dict[str, float]
    batches: int
    enqueued_at: float = 0.0
    links: tuple[Any, ...] = ()


@dataclass(eq=False)
class QueuedWork:
    """Items (or one call) of one submit, with what the worker has done of them so far."""

    items: torch.Tensor
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued_at: float
    deadline: float | None
    taken: int = 0  # items handed to a batch (guarded by the lock)
    done: int = 0  # items finished (worker thread only)
    cancelled: bool = False
    started_at: float | None = None
    inference_s: float = 0.0
    batches: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    out: torch.Tensor | None = None
    call: Callable[[], Any] | None = None  # a call job: run alone, its result is the answer
    low: bool = False  # in the low-priority queue
    # The submitter's span when sampled (service/tracing.py), and the model calls' spans.
    trace: Any = field(default_factory=tracing.sampled_context)
    links: list[Any] = field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.items.shape[0])

    def resolve(self, value: Any) -> None:
        """Complete the future from any thread (an exception fails it); a no-op if it is done
        or its loop is gone."""

        def settle() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
            self.loop.call_soon_threadsafe(settle)
