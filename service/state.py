"""What one running app holds: settings, loaded components, the model worker, the CPU pool.

Built by `create_app`; loaded in the lifespan (in a thread, so `/healthz` and `/readyz` answer
while weights load); read by the routes through `request.app.state.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import importlib.metadata
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch

from model.device import resolve_device
from model.errors import WeightsError
from model.media.batch import restore_faces
from model.media.faces.detect import FaceDetector
from model.networks.background import BackgroundUpscaler
from model.networks.restorer import OSDFaceRestorer
from model.runtime.load import image_limits, load_backgrounds, load_detector, load_restorer
from service.batching import Batcher
from service.errors import ErrorKind, ServiceError
from service.metrics import Metrics
from service.queue_items import BatchReport
from service.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")


SERVICE_NAME = "osdface-service"


def service_version() -> str:
    """The installed distribution's version ("0+unknown" when run from a source tree)."""
    try:
        return importlib.metadata.version(SERVICE_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Phase(enum.StrEnum):
    LOADING = "loading"
    WARMING_UP = "warming_up"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


def _remedy(exc: BaseException, s: Settings) -> str:
    """What to run about a known loading failure (empty when the message already says)."""
    if "run `" in str(exc):
        return ""
    folder = s.weights_dir
    if isinstance(exc, WeightsError):
        return (
            f"; run `osdface weights fetch --dir {folder}`, "
            f"then `osdface weights verify --dir {folder}`"
        )
    return f"; check that {folder} is readable by this user"


class ServiceState:
    """The app's runtime; one per app, so tests can run several apps in one process."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        restorer: OSDFaceRestorer | None = None,
        detector: FaceDetector | None = None,
        backgrounds: dict[str, BackgroundUpscaler] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.restorer = restorer
        self.detector = detector
        self.backgrounds = dict(backgrounds or {})  # Real-ESRGAN networks by name
        self.limits = image_limits(settings)
        self.batcher: Batcher | None = None
        self.pool = ThreadPoolExecutor(settings.cpu_workers, thread_name_prefix="osdface-cpu")
        self.phase = Phase.LOADING
        self.reason = "loading weights"
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_started: float | None = None
        self.started_at = time.time()
        # Called (from any thread) when the service can never become ready: the loading failed
        # or the model worker died. `osdface serve` makes it end the process with an error.
        self.on_fatal: Callable[[str], None] = lambda reason: None
        # Called by `begin_drain` (maybe from a signal handler: they only set flags), e.g. the
        # video jobs' hand-back.
        self.on_drain: list[Callable[[], None]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Load what was not injected, warm up, start the model worker, then report ready."""
        self._loop = asyncio.get_running_loop()
        try:
            started = time.perf_counter()
            await asyncio.to_thread(self._load_components)
            self.metrics.startup_duration.labels(step="load").set(time.perf_counter() - started)
            self.batcher = self._make_batcher()  # before the warm-up, which runs on its thread
            self.batcher.start()
            if self.settings.warmup:
                self.phase, self.reason = Phase.WARMING_UP, "running the warm-up batch"
                started = time.perf_counter()
                await self._warm_up()
                warmup = time.perf_counter() - started
                self.metrics.startup_duration.labels(step="warmup").set(warmup)
        except (WeightsError, OSError) as exc:  # known causes: one line says what to do
            self._fail(f"loading the model failed: {exc}{_remedy(exc, self.settings)}")
            return
        except Exception as exc:
            logger.exception("loading the model failed")
            self._fail(f"loading the model failed: {type(exc).__name__}: {exc}")
            return
        assert self.restorer is not None
        self.metrics.watch_device(self.restorer.device)
        self._describe_build()
        if self.phase is not Phase.DRAINING:
            self.phase, self.reason = Phase.READY, "ready"
            self.metrics.ready.set(1)
            logger.info("ready: %s", self.restorer.describe())

    def _describe_build(self) -> None:
        assert self.restorer is not None
        described = self.restorer.describe()
        versions = described.get("versions", {})
        self.metrics.describe_build(
            version=service_version(),
            torch=versions.get("torch", ""),
            diffusers=versions.get("diffusers", ""),
            device=described.get("device", ""),
            dtype=described.get("dtype", ""),
            detector=self.settings.detector,
        )

    def _fail(self, reason: str) -> None:
        """Never going to be ready: say why in one line, turn readiness off, tell the owner
        (once: a worker that dies during the warm-up also fails the loading)."""
        if self.phase is Phase.FAILED:
            return
        logger.error("%s", reason)
        self.phase, self.reason = Phase.FAILED, reason
        self.metrics.ready.set(0)
        self.on_fatal(reason)

    def _load_components(self) -> None:
        s = self.settings
        device = resolve_device(s.device)
        if self.restorer is None:
            self.restorer = load_restorer(s, device)
        if self.detector is None:
            self.detector = load_detector(s, device)
        missing = tuple(n for n in s.background_models if n not in self.backgrounds)
        if missing:  # on the restorer's device and dtype, run by the same model worker
            self.backgrounds |= load_backgrounds(
                s, missing, self.restorer.device, self.restorer.dtype
            )

    async def _warm_up(self) -> None:
        """The model's warm-up on the model worker's thread and stream, where it will serve:
        inductor's CUDA graphs (`compile_mode="reduce-overhead"`) belong to the thread that
        recorded them. The detector's on a thread of its own, as the CPU pool runs it."""
        assert self.restorer is not None and self.detector is not None
        assert self.batcher is not None
        start = time.perf_counter()
        seconds = await self.batcher.run_call(self._warm_up_model)
        self.batcher.seed_estimate(1, seconds)  # a first speed estimate for admission by time
        await asyncio.to_thread(self.detector.detect, np.zeros((64, 64, 3), dtype=np.uint8))
        logger.info("warm-up done in %.2f s", time.perf_counter() - start)

    def _warm_up_model(self) -> float:
        """Warm up, then time one more call (the first paid the one-off costs): its seconds."""
        assert self.restorer is not None
        self.restorer.warmup(batch_size=1)
        size = self.restorer.config.image_size
        timed = time.perf_counter()
        self.restorer(torch.full((1, 3, size, size), 0.5))
        return time.perf_counter() - timed

    def _make_batcher(self) -> Batcher:
        restorer, s, metrics = self.restorer, self.settings, self.metrics
        assert restorer is not None
        seed = s.restorer_seed
        dtype = str(restorer.dtype).removeprefix("torch.")  # of each model call's span

        def run_model(faces: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            return restore_faces(restorer, faces, seed=seed)  # one call: the batcher cut it

        def on_batch(report: BatchReport) -> None:
            metrics.batch_size.observe(report.size)
            metrics.observe_stages(report.timings)

        return Batcher(
            run_model,
            max_batch=s.max_batch_faces,
            max_delay_s=s.max_batch_delay_ms / 1000.0,
            max_queue=s.max_queue_faces,
            on_batch=on_batch,
            on_queue_wait=metrics.queue_wait.observe,
            on_depth=metrics.queue_depth.set,
            on_death=self._worker_died,
            stream=restorer.worker_stream(),
            span_attributes={"osdface.device": str(restorer.device), "osdface.dtype": dtype},
        )

    def _worker_died(self, exc: BaseException) -> None:
        """Called on the dead worker's thread, also when a CUDA error poisoned the device
        (model.device.poisons_device): readiness off at once, then the process ends (`on_fatal`)
        and the orchestrator starts a fresh one."""
        self._fail(f"the model worker stopped: {type(exc).__name__}: {exc}")

    def begin_drain(self) -> None:
        """Refuse new /restore requests; running ones finish, without waiting for batches to
        fill. Safe to call from a signal handler: it sets a flag and schedules the rest."""
        self.phase, self.reason = Phase.DRAINING, "shutting down"
        self.metrics.ready.set(0)
        self._drain_started = self._drain_started or time.monotonic()
        for hook in self.on_drain:
            hook()
        if self._loop is not None and self.batcher is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self.batcher.hurry)

    def grace_left(self, grace_s: float) -> float:
        """Seconds left of `grace_s` since draining began (all of it before)."""
        if self._drain_started is None:
            return grace_s
        return max(0.0, grace_s - (time.monotonic() - self._drain_started))

    async def shutdown(self, grace_s: float) -> None:
        """Finish queued model work within what is left of `grace_s` since draining began
        (uvicorn spent some of it waiting for requests), then stop the worker and the pool."""
        self.begin_drain()
        if self.batcher is not None:
            left = grace_s - (time.monotonic() - (self._drain_started or time.monotonic()))
            finished = await asyncio.to_thread(self.batcher.stop, max(left, 1.0))
            logger.info("model worker %s", "drained" if finished else "stopped before draining")
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --- per request -------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.phase is Phase.DRAINING:
            raise ServiceError(ErrorKind.SHUTTING_DOWN, self.reason)
        if self.phase is Phase.FAILED:
            raise ServiceError(ErrorKind.MODEL_FAILED, self.reason)
        if self.phase is not Phase.READY:
            raise ServiceError(ErrorKind.NOT_READY, self.reason)

    @property
    def inflight(self) -> int:
        """POST /restore requests admitted and not yet answered."""
        return self._inflight

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a /restore request from admission to answer; refuse past the in-flight bound.

        This bounds what waits before the model queue (uploads held in memory, jobs waiting for
        a CPU thread), which the face-counting model queue cannot see.
        """
        if self._inflight >= self.settings.max_inflight_requests:
            retry = self.batcher.retry_after_s() if self.batcher else 1.0
            raise ServiceError(
                ErrorKind.TOO_MANY_REQUESTS,
                f"{self._inflight} requests in progress (limit "
                f"{self.settings.max_inflight_requests})",
                retry_after_s=retry,
            )
        self._inflight += 1
        self.metrics.requests_in_flight.inc()
        try:
            yield
        finally:
            self._inflight -= 1
            self.metrics.requests_in_flight.dec()

    async def run_cpu(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work (decode, detect, paste, encode) on the bounded CPU pool, in a copy
        of the caller's context (`run_in_executor` does not copy it): the lines it logs carry
        the request id (service/logs.py)."""
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()
        return await loop.run_in_executor(self.pool, context.run, functools.partial(fn, *args))
