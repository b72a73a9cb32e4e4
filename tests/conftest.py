"""Shared fixtures: tiny random weights in the released layout, a CPU restorer, the assets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.assets import locate
from tests.tiny_weights import write_tiny_weights


def assets_dir() -> Path:
    """OSDFACE_TEST_ASSETS (default ../shared/assets), else the cache `make assets` fills."""
    return locate()


@pytest.fixture(scope="session")
def assets() -> Path:
    path = assets_dir()
    if not path.is_dir():
        reason = f"test assets not found at {path} (set OSDFACE_TEST_ASSETS or run `make assets`)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random weights, released layout, converted and merged; detectors linked if present."""
    root = tmp_path_factory.mktemp("weights")
    detectors = assets_dir() / "detectors"
    return write_tiny_weights(root, detector_dir=detectors if detectors.is_dir() else None)


@pytest.fixture(scope="session")
def tiny_restorer(tiny_weights_dir: Path):
    from model.networks.restorer import OSDFaceRestorer

    return OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cpu", torch.float32)


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    # CI has 2 cores; oversubscription makes the suite slower, not faster.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module of small convolutions (`pytestmark = usefixtures(...)`):
    on a shared 2-core machine one thread per process is far faster than two competing."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def eval_weights_dir(tiny_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny restorer's weights plus random metric networks under eval/ (one folder, as
    `osdface weights fetch --eval` leaves it)."""
    from tests.eval_weights import write_eval_weights

    root = tmp_path_factory.mktemp("eval-weights")
    for part in tiny_weights_dir.iterdir():
        (root / part.name).symlink_to(part)
    return write_eval_weights(root)


@pytest.fixture
def span_exporter():
    """Tracing on for this test (service.tracing), every span sampled, kept in memory: an
    opentelemetry InMemorySpanExporter."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service import tracing

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.install(provider)
    try:
        yield memory
    finally:
        tracing.uninstall()
        provider.shutdown()
