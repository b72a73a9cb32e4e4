"""Trace-id exemplars on the latency histograms (service/metrics.py), in the OpenMetrics answer
of `/metrics`, from the real app in-process with tracing on (in-memory exporter).

The reference is the request's own `X-Trace-Id` and the spans the exporter recorded. A real
Prometheus scraping them is in tests/test_tracing_live.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from model.media.faces.detect import FaceDetector
from tests.service_helpers import aligned_crop
from tests.test_service_api import make_settings, serving

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
# The latency histograms and the stages observed for an aligned face.
LATENCY = ("osdface_request_duration_seconds", "osdface_queue_wait_seconds")
STAGES = ("decode", "vre", "vae_encode", "unet", "vae_decode", "paste", "encode")


@pytest.fixture(scope="module")
def detector(tiny_weights_dir: Path, assets: Path) -> FaceDetector:
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25")


def exemplars(text: str) -> dict[tuple[str, str], set[str]]:
    """(family, stage label or "") -> the trace ids of the exemplars on its buckets."""
    found: dict[tuple[str, str], set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.exemplar is not None:
                key = (family.name, sample.labels.get("stage", ""))
                found.setdefault(key, set()).add(sample.exemplar.labels["trace_id"])
    return found


def test_latency_histograms_carry_the_trace_id_of_sampled_requests(
    tiny_weights_dir, tiny_restorer, detector, assets, span_exporter: InMemorySpanExporter
) -> None:
    crop = aligned_crop(assets)
    unsampled = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    with serving(make_settings(tiny_weights_dir), tiny_restorer, detector) as client:

        def restore(headers: dict[str, str]):
            files = {"image": ("f.jpg", crop)}
            return client.post("/restore", files=files, data={"aligned": "1"}, headers=headers)

        assert restore(unsampled).status_code == 200
        before = client.get("/metrics", headers={"Accept": OPENMETRICS})
        answer = restore({})
        after = client.get("/metrics", headers={"Accept": OPENMETRICS}).text
        plain = client.get("/metrics")
    assert before.headers["content-type"].startswith("application/openmetrics-text")
    assert before.text.endswith("# EOF\n")
    assert exemplars(before.text) == {}, "an unsampled request leaves no exemplar"
    assert answer.status_code == 200
    trace_id = answer.headers["x-trace-id"]
    found = exemplars(after)
    assert found[("osdface_request_duration_seconds", "")] == {trace_id}
    assert found[("osdface_queue_wait_seconds", "")] == {trace_id}
    for stage in STAGES:  # the CPU stages in the request's span, the model's in its call's span
        assert found[("osdface_stage_duration_seconds", stage)] == {trace_id}, stage
    assert set(found) == {(n, "") for n in LATENCY} | {
        ("osdface_stage_duration_seconds", s) for s in STAGES
    }, "exemplars on the latency histograms only"
    # The exemplar's span is the server span of the request (for the request histogram).
    spans = span_exporter.get_finished_spans()
    (root,) = [s for s in spans if s.name == "POST /restore"]
    request_family = next(
        f
        for f in text_string_to_metric_families(after)
        if f.name == "osdface_request_duration_seconds"
    )
    span_ids = {s.exemplar.labels["span_id"] for s in request_family.samples if s.exemplar}
    assert span_ids == {format(root.context.span_id, "016x")}
    # The Prometheus text format (no Accept) has no exemplars.
    assert plain.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in plain.text and "# EOF" not in plain.text
