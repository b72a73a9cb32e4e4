"""Background super-resolution in the service: running on the model worker, the one thread that
owns the device (the networks are loaded by `model.runtime.load.load_backgrounds`).

The network runs as a *call* job of the batcher (`Batcher.run_call`), so it never competes with
a face batch for the device; it is queued at the same time as the photo's faces and both are
awaited together.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

import numpy as np

from model.media.pipeline import PreparedPhoto, make_background
from model.networks.background import BackgroundUpscaler
from service.batching import Batcher
from service.tracing_worker import on_worker

A = TypeVar("A")
B = TypeVar("B")


async def background_on_worker(
    batcher: Batcher,
    prepared: PreparedPhoto,
    backgrounds: Mapping[str, BackgroundUpscaler],
    deadline: float | None,
) -> np.ndarray | None:
    """`make_background` on the model worker; None (no work queued) for background 'none'."""
    if prepared.options.background == "none":
        return None
    job = on_worker("background", functools.partial(make_background, prepared, backgrounds))
    return await batcher.run_call(job, deadline=deadline)


async def both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Await two things at once; if one fails, the other is cancelled and the error raised."""
    a_task, b_task = asyncio.ensure_future(first), asyncio.ensure_future(second)
    tasks: list[asyncio.Future[Any]] = [a_task, b_task]
    try:
        return await asyncio.gather(a_task, b_task)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
