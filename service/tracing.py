"""OpenTelemetry traces: one trace per request, a span per stage, and each model call linked to
the requests whose faces it carried. Off, at no cost, unless an OTLP endpoint is configured.

Configured by the standard variables, which the SDK reads itself: `OTEL_EXPORTER_OTLP_ENDPOINT`
(or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; OTLP over HTTP/protobuf), `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` (see
docs/operations.md#traces). With no endpoint (or `OTEL_SDK_DISABLED=true`) nothing of
OpenTelemetry is imported and every helper here returns at its first line. With an endpoint but
without the `tracing` extra installed, one warning at start-up says so and the service runs
without traces.

The spans of one `POST /restore`, children of its server span (itself the child of the caller's
span when the request brought a W3C `traceparent`):

    admission, upload        live spans around the service's own steps
    decode, detect, align    from the pipeline's own stage timings (no second clock), laid end
                             to end from the instant the CPU pool started the work
    queue_wait, inference    from the model worker's result: enqueue to first batch start, then
                             the model calls; `inference` links to its `model_batch` spans
    background               on the model worker (Real-ESRGAN), when asked for
    paste, encode            from the pipeline's timings, as decode

`model_batch` is one model call on the worker thread. Its faces may come from several requests:
it lives in the trace of the first sampled one and links to each of them (link attribute
`osdface.faces`); its attributes are the batch size, device, dtype and the per-stage seconds.
Only sampled spans are recorded, and ids (the `X-Trace-Id` header, the log fields, the metric
exemplars) are given for sampled spans only: every id shown leads to a stored trace.

The spans made on the model worker's thread, and those of video jobs, are in
`service/tracing_worker.py`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACE_ID_HEADER = "X-Trace-Id"
DEFAULT_SERVICE_NAME = "osdface-service"
# The pipeline's stages run on the CPU pool, in this order (model/media/pipeline.py).
PREPARE_STAGES = ("decode", "detect", "align")
FINISH_STAGES = ("paste", "encode")
_SCOPE = "osdface.service"


@dataclass(frozen=True)
class _Tracing:
    provider: TracerProvider
    tracer: Tracer
    owned: bool  # built here from the environment: flushed at shutdown


_active: _Tracing | None = None


# --- set-up ------------------------------------------------------------------------------------


def enabled() -> bool:
    return _active is not None


def configure(version: str = "", environ: Mapping[str, str] | None = None) -> bool:
    """Turn tracing on when an OTLP endpoint is configured (once per process); whether it is on.

    Spans are batched and exported over OTLP/HTTP in the background (`OTEL_BSP_*` tune it).
    """
    if _active is not None:
        return True
    env = os.environ if environ is None else environ
    endpoint = next((env[name] for name in ENDPOINT_VARIABLES if env.get(name, "").strip()), "")
    if not endpoint or env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    where = _without_credentials(endpoint)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        logger.warning(
            "an OTLP endpoint is set (%s) but OpenTelemetry is not installed (%s): tracing is "
            "off; install the extra with pip install 'osdface-service[tracing]'",
            where,
            exc,
        )
        return False
    provider = TracerProvider(resource=_resource(version))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    install(provider, owned=True)
    sampler = provider.sampler.get_description()
    logger.info("tracing on: spans to %s over OTLP/HTTP, sampler %s", where, sampler)
    return True


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _resource(version: str) -> Any:
    """The SDK's resource (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), with our name and
    version where those do not give one."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    defaults: dict[str, str] = {}
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        defaults["service.name"] = DEFAULT_SERVICE_NAME
    if version and "service.version" not in resource.attributes:
        defaults["service.version"] = version
    return resource.merge(Resource(defaults))


def install(provider: TracerProvider, *, owned: bool = False) -> None:
    """Trace with `provider` from now on (tests install one with an in-memory exporter)."""
    global _active
    _active = _Tracing(provider, provider.get_tracer(_SCOPE), owned)


def uninstall() -> None:
    global _active
    _active = None


def tracer() -> Tracer | None:
    """The tracer while tracing is on, else None."""
    return None if _active is None else _active.tracer


def flush(timeout_s: float = 5.0) -> None:
    """Export what is buffered (at shutdown: the last requests' spans are not lost)."""
    if _active is not None and _active.owned:
        _active.provider.force_flush(int(timeout_s * 1000))


# --- the current span --------------------------------------------------------------------------


def sampled_context() -> SpanContext | None:
    """The current span's context when it is sampled, else None (what queued work keeps)."""
    if _active is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return context if context.trace_flags.sampled else None


def current_ids() -> tuple[str | None, str | None]:
    """(trace id, span id) of the current span in hex, when it is sampled; else (None, None)."""
    context = sampled_context()
    if context is None:
        return None, None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


def exemplar() -> dict[str, str] | None:
    """The labels of a metric exemplar for the current sampled span (None: no exemplar)."""
    trace_id, span_id = current_ids()
    if trace_id is None or span_id is None:
        return None
    return {"trace_id": trace_id, "span_id": span_id}


def recording_span() -> Span | None:
    """The current span when it is recorded: the parent of new spans; None: record nothing."""
    if _active is None:
        return None
    from opentelemetry import trace

    span = trace.get_current_span()
    return span if span.is_recording() else None


def error_type(exc: BaseException) -> str:
    """The `type` the error table gives `exc`, else the exception's class name."""
    # Imported here: service.errors imports queue_items, which imports this module.
    from service.errors import to_service_error

    mapped = to_service_error(exc) if isinstance(exc, Exception) else None
    return mapped.error_type if mapped is not None else type(exc).__qualname__


def fail(span: Span, kind: str) -> None:
    """Mark `span` failed: status error, `error.type` = `kind` (the error table's type)."""
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, kind))
    span.set_attribute("error.type", kind)


def _clock() -> Callable[[float], int]:
    """`time.monotonic()` instants -> the epoch nanoseconds spans are stamped with (one offset
    for a group of spans, so their order and gaps are the measured ones)."""
    offset = time.time_ns() - round(time.monotonic() * 1e9)
    return lambda instant: round(instant * 1e9) + offset


def _record(
    name: str, start_ns: int, end_ns: int, attributes: Any = None, links: Sequence[Any] = ()
) -> None:
    """A finished child span of the current one, from instants measured elsewhere."""
    assert _active is not None
    span = _active.tracer.start_span(name, attributes=attributes, links=links, start_time=start_ns)
    span.end(end_time=end_ns)


# --- spans of a request ------------------------------------------------------------------------


class SpanHandle:
    """What a block may add to its span; a no-op when nothing is recorded."""

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def set(self, name: str, value: str | int | float | bool) -> None:
        if self._span is not None:
            self._span.set_attribute(name, value)


NO_SPAN = SpanHandle(None)


@contextlib.contextmanager
def current_span(
    name: str, *, context: Any = None, links: Sequence[Any] = (), attributes: Any = None
) -> Iterator[Span]:
    """A new span, current for the block (tracing must be on), the child of `context`'s span
    (default: the current one). An exception out of the block marks it failed with its error
    type (`fail`), not with an exception event and a traceback."""
    assert _active is not None
    with _active.tracer.start_as_current_span(
        name,
        context=context,
        links=links,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            fail(current, error_type(exc))
            raise


# What the helpers hand out while nothing is recorded: no generator, no allocation.
NOTHING = contextlib.nullcontext(NO_SPAN)


def span(
    name: str, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[SpanHandle]:
    """A span around the block, child of the current span and current inside the block; a no-op
    while tracing is off or the current span is not sampled; failed by an exception."""
    if recording_span() is None:
        return NOTHING
    return _child_span(name, attributes)


@contextlib.contextmanager
def _child_span(name: str, attributes: Mapping[str, Any] | None) -> Iterator[SpanHandle]:
    with current_span(name, attributes=attributes) as current:
        yield SpanHandle(current)


def stages(start: float, timings: Mapping[str, float], names: Sequence[str]) -> None:
    """Spans for stages that ran end to end from `start` (a `time.monotonic()` instant), with
    the durations measured by the pipeline (seconds), as children of the current span; a stage
    that did not run (0 s: detection of an aligned face) gets none."""
    if recording_span() is None:
        return
    to_ns = _clock()
    at = start
    for name in names:
        seconds = timings.get(name, 0.0)
        if seconds > 0:
            _record(name, to_ns(at), to_ns(at + seconds))
        at += seconds


class Waited(Protocol):
    """The model worker's answer to one submit (service.queue_items.BatchResult)."""

    enqueued_at: float
    queue_wait_s: float
    inference_s: float
    batches: int
    links: tuple[Any, ...]


def model_wait(result: Waited, faces: int) -> None:
    """`queue_wait` (enqueue to the first batch holding the faces) and `inference` (the model
    calls, shared with other requests) spans of one request, the latter linked to the
    `model_batch` spans that ran its faces."""
    if recording_span() is None:
        return
    from opentelemetry.trace import Link

    to_ns = _clock()
    began = result.enqueued_at + result.queue_wait_s
    _record("queue_wait", to_ns(result.enqueued_at), to_ns(began))
    attributes = {"osdface.faces": faces, "osdface.batches": result.batches}
    links = [Link(context) for context in result.links]
    _record("inference", to_ns(began), to_ns(began + result.inference_s), attributes, links)


class RequestSpan:
    """The server span of one HTTP request: current from `start_request` to `end`."""

    def __init__(self, span: Span, token: object, method: str) -> None:
        self._span, self._token, self._method = span, token, method
        context = span.get_span_context()
        sampled = context.trace_flags.sampled
        # The `X-Trace-Id` answer header: only for a trace that will be stored.
        self.trace_id = format(context.trace_id, "032x") if sampled else None
        self.error_type: str | None = None

    def error_body(self, body: bytes) -> None:
        """Note the error type of an error answer's body (`{"error": {"type": ...}}`)."""
        if self.error_type is None and self._span.is_recording():
            with contextlib.suppress(ValueError, TypeError, KeyError):
                self.error_type = str(json.loads(body)["error"]["type"])

    def exception(self, exc: BaseException) -> None:
        self._span.record_exception(exc)

    def end(self, status: int, route: str, finished: float) -> None:
        """Name it after the route template, note the status (errors: status error and
        `error.type`), stop it being current and end it at `finished` (`time.monotonic()`)."""
        from opentelemetry import context

        span = self._span
        if span.is_recording():
            span.update_name(f"{self._method} {route}")
            span.set_attributes({"http.route": route, "http.response.status_code": status})
            if status >= 400:
                fail(span, self.error_type or ("internal" if status >= 500 else str(status)))
        context.detach(self._token)  # type: ignore[arg-type]
        span.end(end_time=_clock()(finished))


def start_request(
    headers: Sequence[tuple[bytes, bytes]], method: str, path: str, started: float, request_id: str
) -> RequestSpan | None:
    """The server span of a request that arrived at `started` (`time.monotonic()`), a child of
    the caller's span when its headers carry one (W3C `traceparent`/`tracestate`), made
    current; None while tracing is off."""
    if _active is None:
        return None
    from opentelemetry import context, trace
    from opentelemetry.propagate import extract

    parent = extract({name.decode("latin-1"): value.decode("latin-1") for name, value in headers})
    attributes = {"http.request.method": method, "url.path": path, "osdface.request_id": request_id}
    server = _active.tracer.start_span(
        method,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes=attributes,
        start_time=_clock()(started),
    )
    token = context.attach(trace.set_span_in_context(server, parent))
    return RequestSpan(server, token, method)
