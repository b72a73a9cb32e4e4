"""Traces and exemplars of a real `osdface serve` process (tiny weights, CPU), configured only by
the standard OTEL_* variables, as an operator would:

- its spans reach an OTLP/HTTP receiver on loopback (tests/otlp_receiver.py, decoding the
  protobuf with opentelemetry-proto): the caller's trace joined, the stages, the model call;
- a real Prometheus with exemplar storage scrapes its OpenMetrics `/metrics` and keeps the
  trace ids of the request and stage histograms (Prometheus' exemplar API).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import (
    E2E_ENV,
    LiveServer,
    running_server,
    skip,
    wait_until,
)
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.test_prometheus import running_prometheus

PHOTO = Path("images/gfpgan/whole_imgs/Blake_Lively.jpg")
CALLER_TRACE, CALLER_SPAN = "5b8aa5a2d2c872e8321cf37308d69df2", "051581bf3cb55c13"
SERVER_KIND, ERROR = 2, 2  # OTLP's SpanKind SERVER and StatusCode ERROR
STAGES = {"admission", "upload", "decode", "detect", "align", "queue_wait", "inference"}
STAGES |= {"paste", "encode"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def server(
    tiny_weights_dir: Path, tmp_path_factory, assets: Path, receiver: OtlpReceiver
) -> Iterator[LiveServer]:
    if not (tiny_weights_dir / "facexlib" / "detection_mobilenet0.25_Final.pth").exists():
        skip("the RetinaFace MobileNet detector is not in the shared assets")
    env = {
        **E2E_ENV,
        "OMP_NUM_THREADS": "2",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s (default 5 s)
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    log = tmp_path_factory.mktemp("tracing-live") / "serve.log"
    with running_server(tiny_weights_dir, log, env) as s:
        yield s


@pytest.fixture(scope="module")
def prometheus(server: LiveServer, tmp_path_factory) -> Iterator[str]:
    """Prometheus with exemplar storage, scraping the server every second."""
    root = tmp_path_factory.mktemp("prometheus-exemplars")
    with running_prometheus(server.base, root, "--enable-feature=exemplar-storage") as base:
        yield base


@pytest.fixture(scope="module")
def traffic(server: LiveServer, assets: Path) -> dict[str, httpx.Response]:
    """A photo in the caller's trace, and a bad upload."""
    photo = (assets / PHOTO).read_bytes()
    caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "X-Request-Id": "live-1"}
    with httpx.Client(base_url=server.base, timeout=120) as client:
        ok = client.post("/restore", files={"image": ("p.jpg", photo)}, headers=caller)
        bad = client.post("/restore", files={"image": ("x.jpg", b"not an image")})
    assert ok.status_code == 200, ok.text[:300]
    assert 400 <= bad.status_code < 500
    return {"ok": ok, "bad": bad}


def in_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def test_spans_reach_an_otlp_receiver(
    server: LiveServer, receiver: OtlpReceiver, traffic: dict[str, httpx.Response]
) -> None:
    ok, bad = traffic["ok"], traffic["bad"]
    assert ok.headers["x-trace-id"] == CALLER_TRACE, "the request joined the caller's trace"
    bad_trace = bad.headers["x-trace-id"]

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {s.name for s in in_trace(spans, CALLER_TRACE)}
        return STAGES | {"POST /restore"} <= names and bool(in_trace(spans, bad_trace))

    spans = receiver.wait_for(complete)
    mine = in_trace(spans, CALLER_TRACE)
    (root,) = [s for s in mine if s.kind == SERVER_KIND]
    assert root.name == "POST /restore" and root.parent_span_id == CALLER_SPAN
    assert root.attributes["osdface.request_id"] == "live-1"
    assert root.attributes["http.response.status_code"] == 200
    stages = [s for s in mine if s.name in STAGES]
    assert {s.parent_span_id for s in stages} == {root.span_id}
    assert all(root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns for s in stages)
    (batch,) = [s for s in spans if s.name == "model_batch"]
    assert (root.trace_id, root.span_id) in {(t, sid) for t, sid, _ in batch.links}
    assert batch.attributes["osdface.batch.size"] == int(ok.headers["x-faces-restored"])
    assert batch.attributes["osdface.device"] == "cpu"
    (inference,) = [s for s in mine if s.name == "inference"]
    assert [(t, sid) for t, sid, _ in inference.links] == [(batch.trace_id, batch.span_id)]
    resource = root.resource
    assert resource["service.name"] == "osdface-service"
    assert resource["deployment.environment.name"] == "test"
    assert resource["service.version"]
    (failed,) = [s for s in in_trace(spans, bad_trace) if s.kind == SERVER_KIND]
    assert failed.status_code == ERROR
    assert failed.attributes["error.type"] == bad.json()["error"]["type"]
    assert "tracing on: spans to http://127.0.0.1:" in server.log_text()


def test_prometheus_keeps_the_trace_id_exemplars(
    prometheus: str, traffic: dict[str, httpx.Response]
) -> None:
    trace_id = traffic["ok"].headers["x-trace-id"]

    def exemplar_traces(metric: str) -> set[str]:
        now = time.time()
        params = {"query": metric, "start": now - 600, "end": now + 60}
        body = httpx.get(f"{prometheus}/api/v1/query_exemplars", params=params, timeout=10)
        data: list[dict[str, Any]] = body.json()["data"]
        return {e["labels"]["trace_id"] for series in data for e in series["exemplars"]}

    requests = 'osdface_request_duration_seconds_bucket{endpoint="/restore"}'
    found = wait_until(lambda: exemplar_traces(requests), 60, "exemplars in Prometheus")
    assert trace_id in found
    assert trace_id in exemplar_traces('osdface_stage_duration_seconds_bucket{stage="decode"}')
    assert trace_id in exemplar_traces('osdface_stage_duration_seconds_bucket{stage="unet"}')
    up = httpx.get(f"{prometheus}/api/v1/query", params={"query": "up"}, timeout=10).json()
    assert up["data"]["result"][0]["value"][1] == "1", "the OpenMetrics scrape succeeds"
