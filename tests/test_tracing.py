"""Traces of the real app in-process (service/tracing.py), recorded by the SDK's in-memory
exporter: tiny random weights, the real detector, pipeline and batcher.

The references are what the service answers beside the trace: the `X-Trace-Id` and
`X-Request-Id` headers, the JSON answer's stage timings, and the error body's type.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from model.media.faces.detect import FaceDetector
from service import tracing, tracing_worker
from tests.service_helpers import aligned_crop, assert_error_shape, faceless_png, metric
from tests.test_service_api import make_settings, serving

PHOTO = Path("images/gfpgan/whole_imgs/Blake_Lively.jpg")
# The spans of a request with faces, in the order the work happens.
REQUEST_STAGES = ["admission", "upload", "decode", "detect", "align", "queue_wait", "inference"]
REQUEST_STAGES += ["paste", "encode"]
SLACK_NS = 2_000_000  # 2 ms: spans from measured durations are laid out on a shared clock


@pytest.fixture(scope="module")
def detector(tiny_weights_dir: Path, assets: Path) -> FaceDetector:
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25")


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def by_trace(spans: tuple[ReadableSpan, ...], trace_id: str) -> list[ReadableSpan]:
    return [s for s in spans if hex_id(s.context.trace_id, 32) == trace_id]


def root_of(spans: list[ReadableSpan]) -> ReadableSpan:
    (root,) = [s for s in spans if s.kind is SpanKind.SERVER]
    return root


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    found = [
        s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda s: s.start_time or 0)


def duration_ns(span: ReadableSpan) -> int:
    assert span.start_time is not None and span.end_time is not None
    return span.end_time - span.start_time


def test_two_requests_sharing_a_model_call_give_linked_traces(
    tiny_weights_dir, tiny_restorer, detector, assets, span_exporter: InMemorySpanExporter
) -> None:
    # The first face waits up to 2 s for the second request's face: one model call for both.
    settings = make_settings(tiny_weights_dir, max_batch_delay_ms=2000, cpu_workers=2)
    photo = (assets / PHOTO).read_bytes()
    answers: list = [None, None]
    with serving(settings, tiny_restorer, detector) as client:

        def post(i: int) -> None:
            headers = {"X-Request-Id": f"pair-{i}", "Accept": "application/json"}
            answers[i] = client.post("/restore", files={"image": ("p.jpg", photo)}, headers=headers)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        calls = metric(client.get("/metrics").text, "osdface_batch_size_count")
    assert [a.status_code for a in answers] == [200, 200], [a.text[:200] for a in answers]
    assert calls == 1, "the two requests' faces did not share one model call"
    spans = span_exporter.get_finished_spans()
    trace_ids = [a.headers["x-trace-id"] for a in answers]
    assert len(set(trace_ids)) == 2 and all(len(t) == 32 for t in trace_ids)
    roots = [root_of(by_trace(spans, t)) for t in trace_ids]
    for i, (root, answer) in enumerate(zip(roots, answers, strict=True)):
        assert root.name == "POST /restore" and root.parent is None
        assert root.attributes["osdface.request_id"] == f"pair-{i}"
        assert root.attributes["http.response.status_code"] == 200
        assert root.status.status_code is StatusCode.UNSET
        _check_stage_spans(by_trace(spans, trace_ids[i]), root, answer.json()["timings"]["stages"])

    (batch,) = [s for s in spans if s.name == "model_batch"]
    faces = sum(a.json()["faces_restored"] for a in answers)
    assert faces >= 2
    assert batch.attributes["osdface.batch.size"] == faces
    assert batch.attributes["osdface.batch.requests"] == 2
    assert (batch.attributes["osdface.device"], batch.attributes["osdface.dtype"]) == (
        "cpu",
        "float32",
    )
    assert batch.attributes["osdface.stage.unet_s"] > 0
    # In the trace of one request, as a child of its server span; linked to both requests.
    assert hex_id(batch.context.trace_id, 32) in trace_ids
    assert batch.parent is not None and batch.parent.span_id in {r.context.span_id for r in roots}
    linked = {(link.context.trace_id, link.context.span_id) for link in batch.links}
    assert linked == {(r.context.trace_id, r.context.span_id) for r in roots}
    assert sum(link.attributes["osdface.faces"] for link in batch.links) == faces
    # And each request's `inference` span links back to the model call.
    for trace_id in trace_ids:
        (inference,) = [s for s in by_trace(spans, trace_id) if s.name == "inference"]
        assert [link.context.span_id for link in inference.links] == [batch.context.span_id]


def _check_stage_spans(spans: list[ReadableSpan], root: ReadableSpan, stages: dict) -> None:
    """The stage spans are the server span's children, in order, one after the other, within
    it; the pipeline's stages last exactly what the answer's timings say."""
    mine = [s for s in children(spans, root) if s.name != "model_batch"]
    assert [s.name for s in mine] == REQUEST_STAGES
    for before, after in itertools.pairwise(mine):
        assert before.end_time is not None and after.start_time is not None
        assert after.start_time >= before.end_time - SLACK_NS, (before.name, after.name)
    assert root.start_time is not None and root.end_time is not None
    assert mine[0].start_time is not None and mine[-1].end_time is not None
    assert root.start_time - SLACK_NS <= mine[0].start_time
    assert mine[-1].end_time <= root.end_time + SLACK_NS
    assert sum(duration_ns(s) for s in mine) <= duration_ns(root) + SLACK_NS
    for s in mine:
        if s.name in ("decode", "detect", "align", "paste", "encode"):
            assert abs(duration_ns(s) / 1e9 - stages[s.name]) < 1e-6, s.name


def test_a_client_traceparent_is_the_parent(
    tiny_weights_dir, tiny_restorer, detector, span_exporter: InMemorySpanExporter
) -> None:
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {
        "traceparent": f"00-{caller_trace}-{caller_span}-01",
        "tracestate": "vendor=opaque",
    }
    with serving(make_settings(tiny_weights_dir), tiny_restorer, detector) as client:
        answer = client.post(
            "/restore", files={"image": ("a.png", faceless_png())}, headers=headers
        )
    assert answer.status_code == 200 and answer.headers["x-faces-restored"] == "0"
    assert answer.headers["x-trace-id"] == caller_trace
    root = root_of(by_trace(span_exporter.get_finished_spans(), caller_trace))
    assert root.parent is not None and root.parent.is_remote
    assert hex_id(root.parent.span_id, 16) == caller_span
    assert root.context.trace_state.get("vendor") == "opaque"
    names = [s.name for s in children(list(span_exporter.get_finished_spans()), root)]
    assert names[:4] == ["admission", "upload", "decode", "detect"], names
    assert "queue_wait" not in names, "no face: nothing went to the model worker"


def test_an_unsampled_caller_gets_no_trace_id(
    tiny_weights_dir, tiny_restorer, detector, span_exporter: InMemorySpanExporter
) -> None:
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}
    with serving(make_settings(tiny_weights_dir), tiny_restorer, detector) as client:
        answer = client.post(
            "/restore", files={"image": ("a.png", faceless_png())}, headers=headers
        )
        probe = client.get("/healthz")
    assert answer.status_code == 200 and "x-trace-id" not in answer.headers
    assert "x-trace-id" not in probe.headers
    assert span_exporter.get_finished_spans() == (), "not sampled: nothing recorded"


def test_a_4xx_and_a_429_carry_their_error_type(
    tiny_weights_dir, tiny_restorer, detector, assets, span_exporter: InMemorySpanExporter
) -> None:
    crop = aligned_crop(assets)
    settings = make_settings(tiny_weights_dir, max_inflight_requests=1, max_batch_delay_ms=1000)
    with serving(settings, tiny_restorer, detector) as client:
        bad = client.post("/restore", files={"image": ("x.jpg", b"not an image at all")})
        first: dict = {}

        def slow() -> None:
            files = {"image": ("f.jpg", crop)}
            first["r"] = client.post("/restore", files=files, data={"aligned": "1"})

        worker = threading.Thread(target=slow)
        worker.start()
        end = time.monotonic() + 10
        while metric(client.get("/metrics").text, "osdface_requests_in_flight") < 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        refused = client.post("/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "1"})
        worker.join(60)
    assert first["r"].status_code == 200
    spans = span_exporter.get_finished_spans()
    for answer, status, kind in (
        (bad, 415, "unsupported_format"),
        (refused, 429, "too_many_requests"),
    ):
        assert_error_shape(answer, status, kind)
        trace = by_trace(spans, answer.headers["x-trace-id"])
        root = root_of(trace)
        assert root.status.status_code is StatusCode.ERROR and root.status.description == kind
        assert root.attributes["error.type"] == kind
        assert root.attributes["http.response.status_code"] == status
        assert root.attributes["osdface.request_id"] == answer.headers["x-request-id"]
    # Where it was refused: the admission span, with the same type.
    (admission,) = [
        s for s in by_trace(spans, refused.headers["x-trace-id"]) if s.name == "admission"
    ]
    assert admission.attributes["error.type"] == "too_many_requests"
    assert admission.status.status_code is StatusCode.ERROR
    # Probes and /metrics are never traced.
    assert not [s for s in spans if s.name.startswith("GET")]


def test_job_helpers_make_a_trace_per_job_linked_to_the_submitter(
    span_exporter: InMemorySpanExporter,
) -> None:
    with tracing.span("outside a request"):  # no current span: nothing recorded
        pass
    assert span_exporter.get_finished_spans() == ()
    provider_tracer = tracing.tracer()
    assert provider_tracer is not None
    with provider_tracer.start_as_current_span("POST /v1/jobs") as submit:
        stored = tracing_worker.carrier()
    assert set(stored) >= {"traceparent"}
    job_span = tracing_worker.job_span("job-1", stored, {"osdface.frames": 30})
    with pytest.raises(ValueError), job_span as job:
        job.set("osdface.windows", 2)
        with tracing_worker.segment_span(0, {"osdface.frames": 16}):
            pass
        with tracing_worker.segment_span(1):
            raise ValueError("the second window broke")
    spans = {s.name: s for s in span_exporter.get_finished_spans() if s.name != "segment"}
    segments = [s for s in span_exporter.get_finished_spans() if s.name == "segment"]
    job_span = spans["video_job"]
    assert job_span.parent is None, "a trace of its own"
    assert job_span.context.trace_id != submit.get_span_context().trace_id
    (link,) = job_span.links
    assert link.context.span_id == submit.get_span_context().span_id
    assert job_span.attributes["osdface.job_id"] == "job-1"
    assert job_span.attributes["osdface.windows"] == 2
    assert job_span.attributes["error.type"] == "ValueError"
    assert [s.attributes["osdface.segment"] for s in segments] == [0, 1]
    assert all(
        s.parent is not None and s.parent.span_id == job_span.context.span_id for s in segments
    )
    assert segments[1].status.status_code is StatusCode.ERROR


def test_an_endpoint_without_the_sdk_is_one_warning_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert not tracing.enabled()
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://user:secret@collector:4318"}
    with caplog.at_level(logging.INFO, logger="service.tracing"):
        assert tracing.configure("1.0", env) is False
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "osdface-service[tracing]" in record.message
    assert "secret" not in record.message and "collector:4318" in record.message
    assert not tracing.enabled()
    assert tracing.configure("1.0", {}) is False, "no endpoint: off"
    assert tracing.configure("1.0", {**env, "OTEL_SDK_DISABLED": "true"}) is False


def test_off_touches_nothing_of_opentelemetry(
    tiny_weights_dir, tiny_restorer, detector, assets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tracing off, a face restored through the whole app (middleware, admission, CPU pool,
    batcher, logs, metrics in both formats) reaches no OpenTelemetry code: with every
    `opentelemetry` module made unimportable, it still answers as before."""
    assert not tracing.enabled()
    for name in [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    crop = aligned_crop(assets)
    with serving(make_settings(tiny_weights_dir), tiny_restorer, detector) as client:
        answer = client.post("/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "1"})
        bad = client.post("/restore", files={"image": ("x.jpg", b"not an image at all")})
        text = client.get("/metrics", headers={"Accept": "application/openmetrics-text"}).text
    assert answer.status_code == 200 and answer.headers["x-faces-restored"] == "1", answer.text
    assert "x-trace-id" not in answer.headers and "x-trace-id" not in bad.headers
    assert_error_shape(bad, 415, "unsupported_format")
    assert text.endswith("# EOF\n") and "trace_id" not in text


def test_compose_tracing_profile_is_wired_to_the_service_and_grafana() -> None:
    """docker/compose.yaml's `tracing` profile: a pinned Jaeger taking OTLP/HTTP, the service
    off until OTEL_EXPORTER_OTLP_ENDPOINT is given, Prometheus keeping exemplars, and Grafana
    sending a latency panel's exemplar to the Jaeger datasource."""
    docker = Path(__file__).resolve().parents[1] / "docker"
    compose = yaml.safe_load((docker / "compose.yaml").read_text())
    services = compose["services"]
    jaeger = services["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    image, _, tag = jaeger["image"].partition(":")
    assert image.endswith("jaegertracing/jaeger") and tag and tag != "latest"
    header = (docker / "compose.yaml").read_text().split("\nname:", 1)[0]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://jaeger:4318" in header
    assert "--profile tracing" in header
    for name in ("osdface", "osdface-cpu"):
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}", name
    assert not tracing.configure("", {"OTEL_EXPORTER_OTLP_ENDPOINT": ""}), "empty is off"
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    (datasources,) = [
        yaml.safe_load(p.read_text())["datasources"]
        for p in (docker / "grafana/provisioning/datasources").glob("*.yaml")
    ]
    by_type = {d["type"]: d for d in datasources}
    (destination,) = by_type["prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert destination["datasourceUid"] == by_type["jaeger"]["uid"]
    assert destination["name"] == "trace_id"  # the exemplar label (tests/test_exemplars.py)
    assert by_type["jaeger"]["url"] == f"http://jaeger:{jaeger['ports'][0].split(':')[-1]}"
    dashboard = json.loads((docker / "grafana/dashboards/osdface.json").read_text())
    with_exemplars = {
        histogram
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("exemplar")
        for histogram in re.findall(r"(osdface_\w+_seconds)_bucket", target["expr"])
    }
    assert with_exemplars == {
        "osdface_request_duration_seconds",
        "osdface_queue_wait_seconds",
        "osdface_stage_duration_seconds",
    }


def test_a_video_job_is_a_trace_of_its_own_linked_to_its_submitter(
    tiny_weights_dir, tiny_restorer, detector, assets, tmp_path, span_exporter: InMemorySpanExporter
) -> None:
    from tests.test_video_jobs import serving as serving_jobs
    from tests.test_video_jobs import settings_for, wait_state
    from tests.video_helpers import photo_frame, write_clip

    clip = tmp_path / "faces.mp4"
    write_clip(clip, [photo_frame(assets)] * 6, fps=10)
    settings = settings_for(
        tiny_weights_dir, tmp_path / "jobs", job_window_frames=2, job_segment_frames=2
    )
    with serving_jobs(settings, tiny_restorer, detector) as client:
        files = {"video": ("faces.mp4", clip.read_bytes(), "video/mp4")}
        answer = client.post("/v1/jobs", files=files)
        assert answer.status_code == 202, answer.text
        submit_trace = answer.headers["x-trace-id"]
        view = wait_state(client, answer.json()["id"], ("succeeded", "failed"))
        assert view["state"] == "succeeded", view["error"]
    spans = list(span_exporter.get_finished_spans())
    job = next(s for s in spans if s.name == "video_job")
    assert hex_id(job.context.trace_id, 32) != submit_trace, "a trace of its own"
    assert [hex_id(link.context.trace_id, 32) for link in job.links] == [submit_trace]
    segments = children(by_trace(tuple(spans), hex_id(job.context.trace_id, 32)), job)
    indexes = [s.attributes["osdface.segment"] for s in segments]
    assert indexes == list(range(len(segments))) and len(segments) >= 2, indexes
    assert sum(s.attributes["osdface.frames"] for s in segments) == 6
    segment_ids = {s.context.span_id for s in segments}
    batches = [s for s in spans if s.name == "model_batch"]
    linked = {link.context.span_id for b in batches for link in b.links}
    assert segment_ids <= linked, "every segment's faces went through linked model calls"
