"""`Batcher.run_call`: other device work (the background network) on the one model worker.

A plain recording function stands in for the restorer, as in test_service_batching.py; the
order in which the worker thread saw batches and calls is the reference.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from service.batching import Batcher
from service.queue_items import QueueFullError


class Worker:
    """Records, in order, the batches and calls the worker thread ran (and on which thread)."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.entered = threading.Event()

    def batch(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        self.entered.set()
        self.release.wait(10)
        self.threads.add(threading.current_thread().name)
        self.log.append("faces:" + ",".join(str(int(v)) for v in x[:, 0].tolist()))
        return x * 2, {"unet": 0.1}

    def call(self, tag: str):
        def run() -> str:
            self.threads.add(threading.current_thread().name)
            self.log.append(f"call:{tag}")
            if tag == "boom":
                raise ValueError("background failed")
            return f"done {tag}"

        return run


def faces(*values: int) -> torch.Tensor:
    return torch.tensor([[float(v)] for v in values])


def make(worker: Worker, **kw) -> Batcher:
    opts = {"max_batch": 4, "max_delay_s": 0.05, "max_queue": 6, **kw}
    batcher = Batcher(worker.batch, name="model-worker", **opts)
    batcher.start()
    return batcher


def test_calls_run_alone_in_queue_order_on_the_worker_thread() -> None:
    async def scenario() -> list[object]:
        worker = Worker()
        batcher = make(worker)
        first = asyncio.ensure_future(batcher.submit(faces(1)))
        await asyncio.to_thread(worker.entered.wait, 5)  # the worker holds batch [1]
        queued = [
            asyncio.ensure_future(batcher.submit(faces(2, 3))),
            asyncio.ensure_future(batcher.run_call(worker.call("a"))),
            asyncio.ensure_future(batcher.submit(faces(4))),
        ]
        await asyncio.sleep(0.05)
        worker.release.set()
        results = await asyncio.gather(first, *queued)
        batcher.stop(5)
        return [worker.log, worker.threads, results[2]]

    log, threads, answer = asyncio.run(scenario())
    assert log == ["faces:1", "faces:2,3", "call:a", "faces:4"]
    assert threads == {"model-worker"} and answer == "done a"


def test_a_call_counts_in_the_queue_and_raises_its_error() -> None:
    async def scenario() -> None:
        worker = Worker()
        batcher = make(worker)
        running = asyncio.ensure_future(batcher.submit(faces(1)))
        await asyncio.to_thread(worker.entered.wait, 5)
        waiting = asyncio.ensure_future(batcher.submit(faces(2, 3, 4, 5, 6)))
        await asyncio.sleep(0.02)
        assert batcher.queued == 5
        extra = asyncio.ensure_future(batcher.run_call(worker.call("fits")))
        await asyncio.sleep(0.02)
        assert batcher.queued == 6
        with pytest.raises(QueueFullError):
            await batcher.run_call(worker.call("too many"))
        worker.release.set()
        await asyncio.gather(running, waiting, extra)
        with pytest.raises(ValueError, match="background failed"):
            await batcher.run_call(worker.call("boom"))
        assert await batcher.run_call(worker.call("after")) == "done after"  # worker lives on
        batcher.stop(5)

    asyncio.run(scenario())


def test_a_cancelled_call_never_runs() -> None:
    async def scenario() -> list[str]:
        worker = Worker()
        batcher = make(worker)
        running = asyncio.ensure_future(batcher.submit(faces(1)))
        await asyncio.to_thread(worker.entered.wait, 5)
        call = asyncio.ensure_future(batcher.run_call(worker.call("dropped")))
        await asyncio.sleep(0.02)
        call.cancel()
        await asyncio.sleep(0.02)
        assert batcher.queued == 0
        worker.release.set()
        await running
        batcher.stop(5)
        return worker.log

    assert asyncio.run(scenario()) == ["faces:1"]
