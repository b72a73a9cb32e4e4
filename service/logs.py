"""The service's log lines: text for a person at a terminal, JSON for a log collector.

`configure_logging(format, level)` puts one handler on the root logger, so the service's lines,
uvicorn's (`uvicorn.error`) and the libraries' share one format. In JSON each line is one object:

    {"time": "2025-05-01T12:00:00.123Z", "level": "INFO", "logger": "service.access",
     "message": "POST /restore 200", "thread": "MainThread", "request_id": "3f2a...",
     "trace_id": null, "span_id": null, "method": "POST", "path": "/restore",
     "route": "/restore", "status": 200, "bytes": 48213, "duration_s": 0.412}

`request_id` comes from `REQUEST_ID`, a context variable the request middleware sets: every
line logged while serving a request carries it, on the CPU pool too (`ServiceState.run_cpu`
copies the context into its threads). The model worker serves many requests at once, so its
lines carry none. `trace_id` and `span_id` are those of the current span when tracing is on and
the span is sampled (service/tracing.py; on the model worker, the model call's span), else null.
Extra fields (`logger.info(..., extra={"upload_name": name})`) become fields of the object:
text a client chose (file names, paths) goes there, never into the message. A configured secret
(the API key) is replaced by `[redacted]` wherever it would appear.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
import threading
import traceback
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal, TextIO

from service import tracing

LogFormat = Literal["auto", "text", "json"]
REDACTED = "[redacted]"
ACCESS_LOGGER = "service.access"

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "osdface_request_id", default=None
)
# Ids every line carries (null when unknown), set on the record by `ContextFilter`.
CONTEXT_FIELDS = ("request_id", "trace_id", "span_id")
# A LogRecord's own attributes; any other attribute came from `extra=` and is a data field.
# `request_tag` is the text format's; `color_message` is uvicorn's coloured copy of its message.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "request_tag",
    "color_message",
    *CONTEXT_FIELDS,
}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


def trace_context() -> tuple[str | None, str | None]:
    """(trace id, span id) of the current span, as hex; (None, None) while tracing is off or
    the span is not sampled."""
    return tracing.current_ids()


class ContextFilter(logging.Filter):
    """Stamps each record with the request id and the trace ids of the context it was logged in
    (a filter on the handler runs in the logging thread, where the context variable is set)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            request_id = record.request_id = REQUEST_ID.get()
        trace_id, span_id = trace_context()
        record.trace_id = getattr(record, "trace_id", None) or trace_id
        record.span_id = getattr(record, "span_id", None) or span_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        return True


class _Redactor:
    def __init__(self, secrets: Iterable[str | None]) -> None:
        self.secrets = tuple(s for s in secrets if s)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks are a field, newlines escaped)."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self.redact = _Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        entry |= {name: getattr(record, name, None) for name in CONTEXT_FIELDS}
        entry |= {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}
        if record.exc_info and record.exc_info[0] is not None:
            entry["exc"] = exception_fields(*record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(self._scrub(entry), default=str, ensure_ascii=False)

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return value


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id]: message`, tracebacks below it, secrets redacted."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__(TEXT_FORMAT)
        self.redact = _Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_tag"):  # a record that did not pass `ContextFilter`
            record.request_tag = ""
        return self.redact(super().format(record))


def exception_fields(
    kind: type[BaseException], exc: BaseException | None, tb: TracebackType | None
) -> dict[str, str]:
    """{"type", "message", "traceback"} of an exception, the traceback as one string."""
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    return {
        "type": name,
        "message": str(exc) if exc is not None else "",
        "traceback": "".join(traceback.format_exception(kind, exc, tb)),
    }


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["text", "json"]:
    """`auto`: text when `stream` is a terminal (a person reads it), JSON otherwise."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def configure_logging(
    fmt: LogFormat,
    level: str,
    *,
    secrets: Iterable[str | None] = (),
    stream: TextIO | None = None,
) -> Literal["text", "json"]:
    """One handler on the root logger (replacing any), in `fmt`, at `level`; the format used.

    In JSON, Python warnings and exceptions no code caught (in any thread) are logged too, so
    nothing reaches stderr in another shape.
    """
    stream = stream or sys.stderr
    chosen = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.addFilter(ContextFilter())
    secrets = tuple(secrets)
    formatter = JsonFormatter(secrets) if chosen == "json" else TextFormatter(secrets)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:  # whatever configured them before: through the one handler
        _through_root(logging.getLogger(name))
    if chosen == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    return chosen


def _through_root(logger: logging.Logger) -> None:
    """The logger's records go to the root handler only: no handler, level or switch of its own
    (uvicorn's default config, or an earlier `logging.config`, may have set them)."""
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    logger.disabled = False


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("service").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or isinstance(args.exc_value, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("service").critical(
        "uncaught exception in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _iso_utc(created: float) -> str:
    """'2025-05-01T12:00:00.123Z' (ISO 8601, UTC, milliseconds)."""
    moment = datetime.datetime.fromtimestamp(created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
