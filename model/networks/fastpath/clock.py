"""Seconds per stage of one restorer call, and the side stream a stage may run on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageClock:
    """Seconds per stage of one call.

    Plain path (`events=False`): the wall clock with a sync of the calling thread's current
    stream after each stage. Fast path
    on CUDA: CUDA events on the stage's stream, read once at the end, so stages can overlap and
    the host can queue the next stage while the device works. A stage timed with `side=True`
    runs on the `side` stream, when there is one; `join` hands its result back to the main one.
    """

    def __init__(
        self, device: torch.device, *, events: bool, side: torch.cuda.Stream | None = None
    ) -> None:
        self.device = device
        self.events = events and device.type == "cuda"
        self.side = side if self.events else None
        self._seconds: dict[str, float] = {}
        self._spans: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    @contextmanager
    def __call__(self, stage: str, *, side: bool = False) -> Iterator[None]:
        if not self.events:
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":  # this thread's stream, not other threads' work
                torch.cuda.current_stream(self.device).synchronize()
            self._seconds[stage] = time.perf_counter() - start
            return
        main = torch.cuda.current_stream(self.device)
        stream = self.side if side and self.side is not None else main
        if stream is not main:
            stream.wait_stream(main)  # its inputs were produced on the main stream
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            begin.record(stream)
            yield
            end.record(stream)
        self._spans[stage] = (begin, end)

    def join(self, t: torch.Tensor) -> torch.Tensor:
        """Make the main stream wait for a tensor produced on the side stream."""
        if self.side is None:
            return t
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.side)
        t.record_stream(main)  # the allocator must not hand its memory to the side stream early
        return t

    def seconds(self) -> dict[str, float]:
        for stage, (begin, end) in self._spans.items():
            end.synchronize()
            self._seconds[stage] = begin.elapsed_time(end) / 1e3
        return dict(self._seconds)
