"""Prometheus metrics: base units (seconds, bytes), prefix `osdface_`, bounded label values.

Every app owns a `CollectorRegistry`, so two apps in one process (tests) never collide and
`/metrics` shows exactly one app's numbers. Queue time is measured apart from compute time.
The latency histograms (request, queue wait, stages) carry the trace id of the sampled span an
observation was made in as an exemplar (service/tracing.py), shown in the OpenMetrics format,
which `/metrics` answers when the scraper's Accept asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder

from service import tracing
from service.errors import ErrorKind

# `_created` series double every counter and histogram and no dashboard reads them.
disable_created_metrics()

# 1 ms .. 60 s, roughly 1-2.5-5 per decade: a CPU batch of real weights takes ~60 s.
LATENCY_BUCKETS: tuple[float, ...]
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS += (10.0, 20.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
FACE_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64)

STAGES: tuple[str, ...]
STAGES = ("decode", "detect", "align", "vre", "vae_encode", "unet", "vae_decode", "paste", "encode")
STAGES += ("background",)  # Real-ESRGAN, when asked for
# The label values of osdface_rejected_total: the error types of work refused or dropped.
REJECTION_REASONS = tuple(kind.type for kind in ErrorKind if kind.rejection)


class TracedHistogram(Histogram):
    """A histogram whose observations made in a sampled span carry its trace and span ids as
    the bucket's exemplar (`{trace_id, span_id}`; none while tracing is off)."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        super().observe(amount, exemplar if exemplar is not None else tracing.exemplar())


class Metrics:
    """All of the service's metrics on one private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.request_duration = TracedHistogram(
            "osdface_request_duration_seconds",
            "Time from request arrival to the last response byte handed to the server.",
            ["endpoint", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.queue_wait = TracedHistogram(
            "osdface_queue_wait_seconds",
            "Time a request's faces waited for the model worker (enqueue to first batch start).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.stage_duration = TracedHistogram(
            "osdface_stage_duration_seconds",
            "Time per pipeline stage; model stages once per batch, the others once per image.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            "osdface_batch_size",
            "Faces per model call.",
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.faces_per_image = Histogram(
            "osdface_faces_per_image",
            "Faces detected (and restored) per restored image.",
            buckets=FACE_BUCKETS,
            registry=reg,
        )
        self.requests_in_flight = Gauge(
            "osdface_requests_in_flight",
            "POST /restore requests admitted and not yet answered.",
            registry=reg,
        )
        self.queue_depth = Gauge(
            "osdface_queue_depth",
            "Faces waiting for the model worker (not counting the batch being run).",
            registry=reg,
        )
        self.rejected = Counter(
            "osdface_rejected_total",
            f"Work refused or dropped, by reason: {', '.join(REJECTION_REASONS)}.",
            ["reason"],
            registry=reg,
        )
        for reason in REJECTION_REASONS:  # present at 0 from start, so rate() is never empty
            self.rejected.labels(reason=reason)
        self.errors = Counter(
            "osdface_errors_total",
            "Error responses by error type (the `type` of the JSON error body).",
            ["type"],
            registry=reg,
        )
        self.device_memory = Gauge(
            "osdface_device_memory_bytes",
            "Memory in use on the model device: CUDA allocated/reserved, or process RSS on CPU.",
            ["device", "kind"],
            registry=reg,
        )
        self.ready = Gauge(
            "osdface_ready",
            "1 when /readyz answers 200 (weights loaded, warmed up, not draining), else 0.",
            registry=reg,
        )
        self.startup_duration = Gauge(
            "osdface_startup_duration_seconds",
            "Seconds the start-up steps took: load (weights) and warmup (first batch).",
            ["step"],
            registry=reg,
        )
        self.build_info = Info(
            "osdface_build",
            "Versions and the model's placement: version, torch, diffusers, device, dtype, "
            "detector.",
            registry=reg,
        )
        ProcessCollector(registry=reg)  # process_resident_memory_bytes and friends
        for stage in STAGES:  # export zeros from the start so dashboards see every series
            self.stage_duration.labels(stage=stage)

    def describe_build(self, **labels: str) -> None:
        """Set `osdface_build_info` (label values are short strings)."""
        self.build_info.info({k: str(v) for k, v in labels.items()})

    def watch_device(self, device: torch.device) -> None:
        """Read device memory at scrape time (no polling thread)."""
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            name = f"cuda:{index}"
            self.device_memory.labels(name, "allocated").set_function(
                _cuda_reader(torch.cuda.memory_allocated, index)
            )
            self.device_memory.labels(name, "reserved").set_function(
                _cuda_reader(torch.cuda.memory_reserved, index)
            )
        else:
            process = psutil.Process()
            self.device_memory.labels("cpu", "rss").set_function(
                lambda: float(process.memory_info().rss)
            )

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            if stage in STAGES:  # bounded labels: unknown keys are not exported
                self.stage_duration.labels(stage=stage).observe(seconds)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type): OpenMetrics (with exemplars) when `accept` (the scraper's
        Accept header) asks for application/openmetrics-text, else the Prometheus text format."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


def _cuda_reader(fn: Callable[[int], int], index: int) -> Callable[[], float]:
    return lambda: float(fn(index))


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "5xx"
