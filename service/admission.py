"""Admission by time: how long the model worker will take to reach and finish new work.

The worker's speed is learnt from its own model calls: a running average of the seconds one
call takes, per batch size. A request is admitted only when the work queued ahead of it plus
its own faces are predicted to finish before its deadline; otherwise it is refused at once
(429 with a Retry-After from the same prediction) instead of timing out later (504).
"""

from __future__ import annotations

import math

# Weight of the newest call in the running averages.
EWMA_WEIGHT = 0.3
# Predictions are scaled by this before comparing with a deadline: batch times vary a little
# from call to call, and the answer still has to be pasted and encoded after the model call.
SAFETY_FACTOR = 1.25


class BatchTimeEstimator:
    """Seconds per model call by batch size, as running averages (not thread-safe: the batcher
    calls it under its own lock)."""

    def __init__(self) -> None:
        self._seconds: dict[int, float] = {}
        self._provisional = False

    def seed(self, size: int, seconds: float) -> None:
        """A first value from outside the worker (the warm-up call), replaced entirely by the
        first real call: a first call also pays one-off costs, so it is pessimistic."""
        if not self._seconds:
            self.observe(size, seconds)
            self._provisional = True

    def observe(self, size: int, seconds: float) -> None:
        if size < 1 or not math.isfinite(seconds) or seconds < 0:
            return
        if self._provisional:
            self._seconds.clear()
            self._provisional = False
        old = self._seconds.get(size)
        self._seconds[size] = (
            seconds if old is None else EWMA_WEIGHT * seconds + (1 - EWMA_WEIGHT) * old
        )

    @property
    def known(self) -> bool:
        return bool(self._seconds)

    def batch_seconds(self, size: int) -> float:
        """Predicted seconds of one call of `size` faces (0 when nothing was measured yet).

        Between two measured sizes: linear interpolation. Outside them the guess errs on the
        slow side: above the largest, its time grows in proportion to the faces (batching is
        sublinear, so the truth is faster); below the smallest, the smallest's time.
        """
        if size < 1 or not self._seconds:
            return 0.0
        if size in self._seconds:
            return self._seconds[size]
        below = [k for k in self._seconds if k < size]
        above = [k for k in self._seconds if k > size]
        if below and above:
            lo, hi = max(below), min(above)
            t_lo, t_hi = self._seconds[lo], self._seconds[hi]
            return t_lo + (t_hi - t_lo) * (size - lo) / (hi - lo)
        if below:
            largest = max(below)
            return self._seconds[largest] * size / largest
        return self._seconds[min(above)]

    def drain_seconds(self, faces: int, max_batch: int) -> float:
        """Predicted seconds to run `faces` queued faces in batches of up to `max_batch`."""
        full, rest = divmod(max(0, faces), max_batch)
        return full * self.batch_seconds(max_batch) + self.batch_seconds(rest)

    def finish_seconds(
        self,
        faces: int,
        max_batch: int,
        max_delay_s: float,
        running: tuple[int, float] | None = None,
    ) -> float:
        """Predicted seconds until `faces` queued faces (the new ones last) are done, safety
        factor included. `running`: the size of the call in progress and its seconds so far;
        a batch that would not be full waits `max_delay_s` to fill first."""
        running_left = 0.0
        if running is not None:
            size, elapsed = running
            running_left = max(0.0, self.batch_seconds(size) - elapsed)
        fill_wait = max_delay_s if faces < max_batch else 0.0
        return SAFETY_FACTOR * (running_left + self.drain_seconds(faces, max_batch)) + fill_wait
