"""Background super-resolution in the service (and the CLI): loading from the settings, and
running on the model worker, the one thread that owns the device.

The network runs as a *call* job of the batcher (`Batcher.run_call`), so it never competes with
a face batch for the device; it is queued at the same time as the photo's faces and both are
awaited together.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Mapping
from typing import TypeVar

import numpy as np
import torch

from model.networks.background import BackgroundUpscaler, TileSettings
from model.media.pipeline import PreparedPhoto, make_background
from service.batching import Batcher
from service.settings import Settings

logger = logging.getLogger(__name__)

A = TypeVar("A")
B = TypeVar("B")


def tile_settings(s: Settings) -> TileSettings:
    return TileSettings(s.background_tile, s.background_tile_overlap, s.background_tile_batch)


def load_backgrounds(
    s: Settings, names: tuple[str, ...], device: torch.device, dtype: torch.dtype
) -> dict[str, BackgroundUpscaler]:
    """The named Real-ESRGAN networks, strictly loaded from `<weights_dir>/realesrgan/`."""
    loaded = {}
    for name in dict.fromkeys(names):
        logger.info("loading the %s background network on %s (%s)", name, device, dtype)
        loaded[name] = BackgroundUpscaler.from_pretrained(
            s.weights_dir, name, device, dtype, tile_settings(s)
        )
    return loaded


async def background_on_worker(
    batcher: Batcher,
    prepared: PreparedPhoto,
    backgrounds: Mapping[str, BackgroundUpscaler],
    deadline: float | None,
) -> np.ndarray | None:
    """`make_background` on the model worker; None (no work queued) for background 'none'."""
    if prepared.options.background == "none":
        return None
    job = functools.partial(make_background, prepared, backgrounds)
    return await batcher.run_call(job, deadline=deadline)


async def both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Await two things at once; if one fails, the other is cancelled and the error raised."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        a, b = await asyncio.gather(*tasks)
        return a, b
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
