"""The model worker and its device, on the CPU with fakes where CUDA would be: its own stream,
the warm-up on its thread, a NaN face as the model's failure (500 `model_output`, counted), and
a CUDA error that poisons the context ending the worker (readiness 503, `on_fatal`) while an
ordinary error fails only its batch.

The restorer is the real tiny one behind a switch that makes its next calls return NaN or raise
what a failing GPU raises; the stream is a recorder standing in for `torch.cuda.Stream`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.device import poisons_device
from model.media.faces.detect import FaceDetector
from model.networks.restorer import OSDFaceRestorer, RestoreOutput
from service.batching import Batcher
from service.queue_items import BatcherClosedError
from tests.service_helpers import assert_error_shape, metric, png_bytes
from tests.test_service_api import make_settings, serving

WORKER = "osdface-model"
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


class FakeStream:
    """Stands in for a `torch.cuda.Stream`: records entries, exits and synchronisations."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.active = False

    def synchronize(self) -> None:
        self.events.append(("synchronize", threading.current_thread().name))


class FakeStreamContext:
    """What `torch.cuda.stream(s)` returns, for a FakeStream."""

    def __init__(self, stream: FakeStream) -> None:
        self.stream = stream

    def __enter__(self) -> None:
        self.stream.active = True
        self.stream.events.append(("enter", threading.current_thread().name))

    def __exit__(self, *exc) -> None:
        self.stream.active = False
        self.stream.events.append(("exit", threading.current_thread().name))


@pytest.fixture
def fake_stream(monkeypatch) -> FakeStream:
    monkeypatch.setattr(torch.cuda, "stream", FakeStreamContext)
    return FakeStream()


class Switched:
    """The real tiny restorer; `fault` (when set) turns each call's result into a failure.

    Records the thread (and whether the fake stream was entered) of each call and warm-up.
    """

    def __init__(self, real: OSDFaceRestorer, stream: FakeStream | None = None) -> None:
        self._real = real
        self.stream = stream
        self.fault: Callable[[RestoreOutput], RestoreOutput] | None = None
        self.calls: list[tuple[str, bool]] = []
        self.warmups: list[tuple[str, bool]] = []

    def __getattr__(self, name: str):
        return getattr(self._real, name)

    def _where(self) -> tuple[str, bool]:
        return threading.current_thread().name, bool(self.stream and self.stream.active)

    def __call__(self, images: torch.Tensor, **kwargs) -> RestoreOutput:
        self.calls.append(self._where())
        out = self._real(images, **kwargs)
        return out if self.fault is None else self.fault(out)

    def warmup(self, batch_size: int = 1) -> None:
        self.warmups.append(self._where())
        self._real.warmup(batch_size)

    def worker_stream(self) -> FakeStream | None:
        return self.stream


def nan_faces(out: RestoreOutput) -> RestoreOutput:
    return RestoreOutput(torch.full_like(out.images, float("nan")), out.timings)


def raises(exc: Exception) -> Callable[[RestoreOutput], RestoreOutput]:
    def fault(out: RestoreOutput) -> RestoreOutput:
        raise exc

    return fault


@pytest.fixture(scope="module")
def detector(tiny_weights_dir: Path, assets: Path) -> FaceDetector:
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25")


@pytest.fixture(scope="module")
def aligned_png() -> bytes:
    """A 512x512 'aligned face' (a gradient): the model runs, no detector involved."""
    row = torch.linspace(0, 255, 512).to(torch.uint8)
    rgb = torch.stack([row.expand(512, 512), row.expand(512, 512).T, row.flip(0).expand(512, 512)])
    return png_bytes(Image.fromarray(rgb.permute(1, 2, 0).numpy(), "RGB"))


def restore(client, image: bytes):
    return client.post("/restore", files={"image": ("f.png", image)}, data={"aligned": "1"})


# --- the batcher on its own stream ------------------------------------------------------------


def test_the_worker_runs_batches_and_calls_on_its_stream(fake_stream: FakeStream) -> None:
    seen: list[tuple[str, bool]] = []

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        seen.append((threading.current_thread().name, fake_stream.active))
        return x + 1, {}

    batcher = Batcher(fn, max_batch=2, max_delay_s=0.0, max_queue=8, stream=fake_stream)
    batcher.start()

    async def main() -> None:
        result = await batcher.submit(torch.zeros(2, 3))
        assert torch.equal(result.output, torch.ones(2, 3))
        called = await batcher.run_call(
            lambda: (threading.current_thread().name, fake_stream.active)
        )
        assert called == (WORKER, True)

    asyncio.run(main())
    assert batcher.stop(5)
    assert seen == [(WORKER, True)]
    once = [("enter", WORKER), ("exit", WORKER), ("synchronize", WORKER)]
    assert fake_stream.events == once * 2, "enter, run, leave, then wait for this stream only"


# --- errors that poison the device -------------------------------------------------------------


def test_which_errors_poison_the_device() -> None:
    assert poisons_device(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    assert poisons_device(RuntimeError(ILLEGAL_ACCESS))
    assert poisons_device(RuntimeError("CUDA error: device-side assert triggered"))
    assert poisons_device(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemm"))
    wrapped = ValueError("stage failed")
    wrapped.__cause__ = RuntimeError(ILLEGAL_ACCESS)
    assert poisons_device(wrapped)
    assert not poisons_device(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert not poisons_device(RuntimeError("boom"))
    assert not poisons_device(ValueError("expected (B, 3, 512, 512)"))


def test_a_poisoning_error_stops_the_worker_and_fails_all_its_work() -> None:
    died: list[BaseException] = []
    release = threading.Event()

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        release.wait(10)
        raise torch.AcceleratorError(ILLEGAL_ACCESS)

    batcher = Batcher(fn, max_batch=1, max_delay_s=0.0, max_queue=8, on_death=died.append)
    batcher.start()

    async def main() -> None:
        running = asyncio.ensure_future(batcher.submit(torch.ones(1, 2)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(torch.ones(1, 2)))
        video = asyncio.ensure_future(batcher.submit(torch.ones(1, 2), low_priority=True))
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.wait_for(
            asyncio.gather(running, queued, video, return_exceptions=True), 10
        )
        assert all(isinstance(r, BatcherClosedError) for r in results), results
        with pytest.raises(BatcherClosedError):
            batcher.admit(1, None)

    asyncio.run(main())
    assert len(died) == 1 and isinstance(died[0], torch.AcceleratorError)


# --- through the app ---------------------------------------------------------------------------


def test_nan_faces_are_the_models_failure_500_counted(
    tiny_weights_dir, tiny_restorer, detector, aligned_png, caplog
) -> None:
    model = Switched(tiny_restorer)
    model.fault = nan_faces
    with serving(make_settings(tiny_weights_dir), model, detector) as c:
        with caplog.at_level(logging.ERROR):
            response = restore(c, aligned_png)
        assert_error_shape(response, 500, "model_output")
        assert "NaN" in response.json()["error"]["message"]
        assert c.get("/readyz").status_code == 200, "a NaN face does not poison the device"
        text = c.get("/metrics").text
    assert metric(text, "osdface_errors_total", type="model_output") == 1
    assert metric(text, "osdface_rejected_total", reason="model_output") == 1
    request_id = response.headers["x-request-id"]
    assert len([r for r in caplog.records if request_id in r.getMessage()]) == 1


def test_a_poisoned_device_turns_readiness_off_and_ends_the_process(
    tiny_weights_dir, tiny_restorer, detector, aligned_png
) -> None:
    model = Switched(tiny_restorer)
    reasons: list[str] = []
    with serving(make_settings(tiny_weights_dir), model, detector) as c:
        c.app.state.service.on_fatal = reasons.append
        model.fault = raises(RuntimeError("boom"))  # an ordinary failure: that batch only
        assert restore(c, aligned_png).status_code == 500
        assert c.get("/readyz").status_code == 200 and reasons == []
        model.fault = raises(torch.AcceleratorError(ILLEGAL_ACCESS))
        assert_error_shape(restore(c, aligned_png), 503, "shutting_down")
        assert_error_shape(c.get("/readyz"), 503, "model_failed")
        model.fault = None
        assert_error_shape(restore(c, aligned_png), 503, "model_failed")
    assert len(reasons) == 1 and "illegal memory access" in reasons[0], reasons


def test_the_warm_up_runs_on_the_serving_thread_and_stream(
    tiny_weights_dir, tiny_restorer, detector, aligned_png, fake_stream
) -> None:
    """Inductor's CUDA graphs belong to the thread that recorded them: the warm-up runs where
    the batches will, on the model worker's thread and inside its stream."""
    model = Switched(tiny_restorer, fake_stream)
    with serving(make_settings(tiny_weights_dir, warmup=True), model, detector) as c:
        assert restore(c, aligned_png).status_code == 200
    assert model.warmups == [(WORKER, True)]
    assert model.calls and set(model.calls) == {(WORKER, True)}, model.calls
