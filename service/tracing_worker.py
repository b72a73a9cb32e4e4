"""Spans on the model worker's thread, and those of work that outlives a request (video jobs).

The worker serves many requests at once, so nothing is current there by itself: a queued item
keeps its submitter's sampled span context (`QueuedWork.trace`), and each model call is a
`model_batch` span linked to the requests it carried (service/tracing.py describes the whole
trace). Every helper is a no-op while tracing is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from service import tracing

if TYPE_CHECKING:
    from opentelemetry.trace import Span, SpanContext

T = TypeVar("T")


# --- the model worker --------------------------------------------------------------------------


class Carried(Protocol):
    """Queued work (service.queue_items.QueuedWork): its submitter's sampled span, if any, and
    the `model_batch` spans that ran its items."""

    trace: SpanContext | None
    links: list[Any]


class BatchSpan:
    """What the worker adds to a `model_batch` span; a no-op when nothing is recorded."""

    def __init__(self, span: Span | None) -> None:
        self._span = span

    def ran(self, timings: Mapping[str, float]) -> None:
        """The model call's stage seconds (`osdface.stage.unet_s`, ...)."""
        if self._span is not None:
            self._span.set_attributes({f"osdface.stage.{k}_s": v for k, v in timings.items()})

    def failed(self, exc: BaseException) -> None:
        if self._span is not None:
            tracing.fail(self._span, tracing.error_type(exc))


_NO_BATCH = contextlib.nullcontext(BatchSpan(None))
_NO_CONTEXT = contextlib.nullcontext()


def batch_span(
    chunks: Sequence[tuple[Carried, int, int]], attributes: Mapping[str, Any]
) -> contextlib.AbstractContextManager[BatchSpan]:
    """The `model_batch` span of one model call over `chunks` ((work, first item, end item)
    slices), current on the worker thread for the block: in the trace of the first sampled
    work it carries, linked to each sampled one (link attribute `osdface.faces`: its faces in
    this call), whose `links` get this span's context so that the request links back."""
    if tracing.tracer() is None:
        return _NO_BATCH
    carried = [(job, hi - lo) for job, lo, hi in chunks if job.trace is not None]
    return _batch_span(carried, chunks, attributes) if carried else _NO_BATCH


@contextlib.contextmanager
def _batch_span(
    carried: list[tuple[Carried, int]],
    chunks: Sequence[tuple[Carried, int, int]],
    attributes: Mapping[str, Any],
) -> Iterator[BatchSpan]:
    from opentelemetry.trace import Link, NonRecordingSpan, set_span_in_context

    contexts = [(job.trace, faces) for job, faces in carried if job.trace is not None]
    parent = set_span_in_context(NonRecordingSpan(contexts[0][0]))
    links = [Link(context, {"osdface.faces": faces}) for context, faces in contexts]
    size = sum(hi - lo for _, lo, hi in chunks)
    attrs = {"osdface.batch.size": size, "osdface.batch.requests": len(chunks), **attributes}
    with tracing.current_span(
        "model_batch", context=parent, links=links, attributes=attrs
    ) as current:
        for job, _ in carried:
            job.links.append(current.get_span_context())
        yield BatchSpan(current)


def within(context: SpanContext | None) -> contextlib.AbstractContextManager[None]:
    """`context` (a span's, kept by queued work) current for the block, on any thread: what is
    logged or observed there (a metric's exemplar) is about that span."""
    if context is None or tracing.tracer() is None:
        return _NO_CONTEXT
    return _within(context)


@contextlib.contextmanager
def _within(context: SpanContext) -> Iterator[None]:
    from opentelemetry import context as otel_context
    from opentelemetry.trace import NonRecordingSpan, set_span_in_context

    token = otel_context.attach(set_span_in_context(NonRecordingSpan(context)))
    try:
        yield
    finally:
        otel_context.detach(token)


def on_worker(name: str, fn: Callable[[], T]) -> Callable[[], T]:
    """`fn`, to run on another thread (the model worker's `run_call`), in a span `name` that is
    a child of the current span; `fn` itself when nothing is recorded."""
    parent = tracing.recording_span()
    if parent is None:
        return fn
    from opentelemetry.trace import set_span_in_context

    context = set_span_in_context(parent)

    def traced() -> T:
        with tracing.current_span(name, context=context):
            return fn()

    return traced


# --- work that outlives a request (video jobs) -------------------------------------------------


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers (`traceparent`, `tracestate`), to store with
    work that runs later or on another replica (a video job's record) for `job_span` to link
    to; empty while tracing is off."""
    if tracing.tracer() is None:
        return {}
    from opentelemetry.propagate import inject

    headers: dict[str, str] = {}
    inject(headers)
    return headers


@contextlib.contextmanager
def job_span(
    job_id: str,
    submitted: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[tracing.SpanHandle]:
    """The root span of a trace of its own for one video job, current for the block, linked to
    the request that submitted it (`submitted`: what `carrier()` gave in that request).

    Inside, `segment_span(...)` makes one span per segment or window, and the model calls of
    the faces submitted there link to it. Sampled by the sampler's rule for roots
    (`OTEL_TRACES_SAMPLER_ARG`). An exception out of the block marks the job's span failed.
    """
    if tracing.tracer() is None:
        yield tracing.NO_SPAN  # a generator here anyway: a job is no hot path
        return
    from opentelemetry.context import Context
    from opentelemetry.propagate import extract
    from opentelemetry.trace import Link, get_current_span

    links = []
    origin = get_current_span(extract(dict(submitted or {}))).get_span_context()
    if origin.is_valid:
        links.append(Link(origin, {"osdface.link": "submitted_by"}))
    attrs = {"osdface.job_id": job_id, **(attributes or {})}
    # Context(): a new trace, whatever is current where the job runs.
    with tracing.current_span("video_job", context=Context(), links=links, attributes=attrs) as job:
        yield tracing.SpanHandle(job)


def segment_span(
    index: int, attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[tracing.SpanHandle]:
    """A span for one segment (window of frames) of the current job's span, current for the
    block (`attributes`: frames, faces, ...); a no-op outside a sampled job span."""
    return tracing.span("segment", {"osdface.segment": index, **(attributes or {})})
