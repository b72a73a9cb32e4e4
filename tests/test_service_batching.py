"""The batcher on its own: it is generic over `(B, ...)` tensors, so a plain function drives it.

The restorer itself is exercised through the service tests; here the function records what
it was called with, which is the independent reference for what was batched together.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from service.batching import Batcher
from service.queue_items import BatcherClosedError, BatchReport, QueueFullError


class Recorder:
    """A batch function: out = 2 * x + 1 per item; remembers every batch; can be held."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.batches: list[torch.Tensor] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()
        self.fail_on = fail_on

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        self.entered.set()
        self.release.wait(10)
        self.batches.append(x.clone())
        if self.fail_on is not None and bool((x == self.fail_on).any()):
            raise RuntimeError("boom")
        return 2 * x + 1, {"unet": 0.5, "vre": 0.25}

    def seen(self) -> set[float]:
        return {float(v) for b in self.batches for v in b[:, 0].tolist()}


def items(*values: float) -> torch.Tensor:
    """(N, 2) float32: each item's both entries equal its value, so batches are traceable."""
    return torch.tensor([[v, v] for v in values], dtype=torch.float32)


def make(fn: Recorder, **kw) -> Batcher:
    opts = {"max_batch": 4, "max_delay_s": 0.2, "max_queue": 16}
    opts.update(kw)
    batcher = Batcher(fn, **opts)
    batcher.start()
    return batcher


async def wait_until(predicate, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.005)


def test_concurrent_submits_share_batches_and_get_their_own_outputs() -> None:
    fn = Recorder()
    reports: list[BatchReport] = []
    batcher = make(fn, on_batch=reports.append)

    async def main() -> list:
        return await asyncio.gather(*(batcher.submit(items(i)) for i in range(10)))

    results = asyncio.run(main())
    batcher.stop(5)
    for i, res in enumerate(results):
        assert torch.equal(res.output, 2 * items(i) + 1)
        assert res.queue_wait_s >= 0 and res.batches == 1
        assert res.timings == {"unet": 0.5, "vre": 0.25}
    sizes = [int(b.shape[0]) for b in fn.batches]
    assert sum(sizes) == 10 and max(sizes) <= 4
    assert max(sizes) > 1, f"no batching happened: {sizes}"
    assert [r.size for r in reports] == sizes


def test_a_big_request_is_split_across_full_batches_in_order() -> None:
    fn = Recorder()
    batcher = make(fn, max_batch=4, max_delay_s=0.0)
    values = [float(v) for v in range(10)]
    res = asyncio.run(batcher.submit(items(*values)))
    batcher.stop(5)
    assert torch.equal(res.output, 2 * items(*values) + 1)
    assert [int(b.shape[0]) for b in fn.batches] == [4, 4, 2]
    assert res.batches == 3 and res.timings["unet"] == pytest.approx(1.5)


def test_full_queue_refuses_with_retry_after_and_an_empty_queue_takes_anything() -> None:
    fn = Recorder()
    fn.release.clear()
    batcher = make(fn, max_batch=2, max_delay_s=0.0, max_queue=3)

    async def main() -> None:
        running = asyncio.ensure_future(batcher.submit(items(100, 101)))
        await wait_until(fn.entered.is_set)  # the worker holds the first batch
        queued = [asyncio.ensure_future(batcher.submit(items(v))) for v in (1, 2, 3)]
        await wait_until(lambda: batcher.queued == 3)
        with pytest.raises(QueueFullError) as info:
            await batcher.submit(items(4))
        assert info.value.retry_after_s >= 1.0
        fn.release.set()
        await asyncio.gather(running, *queued)
        # Larger than the whole queue, yet admitted because nothing else is waiting.
        big = await batcher.submit(items(*range(10, 15)))
        assert big.output.shape[0] == 5

    asyncio.run(main())
    batcher.stop(5)
    assert 4.0 not in fn.seen()


def test_cancelled_work_is_dropped_from_the_queue() -> None:
    fn = Recorder()
    fn.release.clear()
    depths: list[int] = []
    batcher = make(fn, max_batch=1, max_delay_s=0.0, on_depth=depths.append)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit(items(1)))
        await wait_until(fn.entered.is_set)
        doomed = asyncio.ensure_future(batcher.submit(items(7, 8)))
        await wait_until(lambda: batcher.queued == 2)
        doomed.cancel()  # what a disconnect does to the request's task
        await wait_until(lambda: batcher.queued == 0)
        fn.release.set()
        await first
        after = await batcher.submit(items(2))
        assert torch.equal(after.output, 2 * items(2) + 1)

    asyncio.run(main())
    batcher.stop(5)
    assert fn.seen() == {1.0, 2.0}
    assert depths[-1] == 0


def test_deadline_drops_queued_work_with_timeout_error() -> None:
    fn = Recorder()
    fn.release.clear()
    batcher = make(fn, max_batch=1, max_delay_s=0.0)

    async def main() -> None:
        first = asyncio.ensure_future(batcher.submit(items(1)))
        await wait_until(fn.entered.is_set)
        late = asyncio.ensure_future(batcher.submit(items(9), deadline=time.monotonic() + 0.05))
        await asyncio.sleep(0.1)  # the deadline passes while the worker is busy
        fn.release.set()
        await first
        with pytest.raises(TimeoutError):
            await late

    asyncio.run(main())
    batcher.stop(5)
    assert 9.0 not in fn.seen()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on() -> None:
    fn = Recorder(fail_on=3.0)
    batcher = make(fn, max_batch=4, max_delay_s=0.3)

    async def main() -> None:
        together = await asyncio.gather(
            batcher.submit(items(3)), batcher.submit(items(4)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in together)
        ok = await batcher.submit(items(5))
        assert torch.equal(ok.output, 2 * items(5) + 1)

    asyncio.run(main())
    batcher.stop(5)


def test_stop_runs_queued_work_then_refuses_new_work() -> None:
    fn = Recorder()
    fn.release.clear()
    batcher = make(fn, max_batch=2, max_delay_s=10.0)

    async def main() -> None:
        jobs = [asyncio.ensure_future(batcher.submit(items(v))) for v in (1, 2, 3)]
        await wait_until(fn.entered.is_set)
        stopper = asyncio.ensure_future(asyncio.to_thread(batcher.stop, 10))
        await wait_until(lambda: not batcher.accepting)
        with pytest.raises(BatcherClosedError):
            await batcher.submit(items(4))
        fn.release.set()
        results = await asyncio.gather(*jobs)
        assert await stopper is True
        for v, res in zip((1, 2, 3), results, strict=True):
            assert torch.equal(res.output, 2 * items(v) + 1)

    asyncio.run(main())
    assert fn.seen() == {1.0, 2.0, 3.0}
