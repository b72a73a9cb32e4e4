"""JSON log lines (service/logs.py): the formatter on its own, then a real `osdface serve` under a
short burst (photos, a bad image, 429s, a wrong key, a client that hangs up mid-upload): every
line of its log is one JSON object, every line about a request carries that request's id (and,
tracing being on, its trace id: the one answered in `X-Trace-Id`), and the API key never
appears."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.logs import REQUEST_ID, configure_logging
from tests.live_server import LiveServer, running_server, wait_until
from tests.otlp_receiver import OtlpReceiver
from tests.service_helpers import BOUNDARY, aligned_crop, multipart

API_KEY = "osdface-test-key-Zq81vR2c"
WRONG_KEY = "not-the-key-Hs7Pq0Lw"
CLIENT_FILE_NAME = "client-chosen-name-Kx9.jpg"
PROBES = ("/healthz", "/readyz", "/metrics")
CONTEXT = ("time", "level", "logger", "message", "thread", "request_id", "trace_id", "span_id")


# --- the formatter ------------------------------------------------------------------------------


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging changes process-wide state (root handlers, hooks): put it back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_exception_record_is_one_line_of_json(root_logging: None) -> None:
    stream = io.StringIO()
    assert configure_logging("json", "info", secrets=[API_KEY], stream=stream) == "json"
    log = logging.getLogger("service.test")
    token = REQUEST_ID.set("rid-1")
    try:
        try:
            raise ValueError(f"bad\ninput near {API_KEY}")
        except ValueError:
            log.exception("could not %s", "restore", extra={"upload_name": "evil\nname.jpg"})
    finally:
        REQUEST_ID.reset(token)
    (line,) = _lines(stream)
    entry = json.loads(line)
    assert set(CONTEXT) <= set(entry)
    assert entry["message"] == "could not restore" and entry["level"] == "ERROR"
    assert entry["logger"] == "service.test" and entry["request_id"] == "rid-1"
    assert entry["trace_id"] is None and entry["span_id"] is None
    assert entry["upload_name"] == "evil\nname.jpg"  # client text: a field, newline escaped
    moment = datetime.datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
    assert entry["time"].endswith("Z") and moment.utcoffset() == datetime.timedelta(0)
    assert abs(moment.timestamp() - time.time()) < 60
    exc = entry["exc"]
    assert exc["type"] == "ValueError" and exc["message"] == "bad\ninput near [redacted]"
    assert exc["traceback"].startswith("Traceback") and "raise ValueError" in exc["traceback"]
    assert API_KEY not in line


def test_lines_outside_a_request_and_uvicorn_extras(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)
    colored = "\x1b[1mcoloured\x1b[0m"
    logging.getLogger("uvicorn.error").info("Started %s", "x", extra={"color_message": colored})
    logging.getLogger("service.test").debug("below the level")
    (entry,) = [json.loads(line) for line in _lines(stream)]
    assert entry["message"] == "Started x" and entry["request_id"] is None
    assert "color_message" not in entry


def test_uncaught_thread_exception_and_warnings_are_json(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("json", "info", stream=stream)

    def boom() -> None:
        raise RuntimeError("in a thread")

    thread = threading.Thread(target=boom, name="worker-x")
    thread.start()
    thread.join()
    import warnings

    warnings.warn("a library's warning", UserWarning, stacklevel=1)
    entries = [json.loads(line) for line in _lines(stream)]
    assert len(entries) == 2, entries
    crash, warned = entries
    assert crash["level"] == "CRITICAL" and "worker-x" in crash["message"]
    assert crash["exc"]["type"] == "RuntimeError"
    assert warned["logger"] == "py.warnings" and "a library's warning" in warned["message"]


def test_text_format_names_the_request_and_redacts(root_logging: None) -> None:
    stream = io.StringIO()
    assert configure_logging("text", "info", secrets=[API_KEY], stream=stream) == "text"
    token = REQUEST_ID.set("rid-2")
    logging.getLogger("service.test").info("key was %s", API_KEY)
    REQUEST_ID.reset(token)
    (line,) = _lines(stream)
    assert " INFO service.test [rid-2]: key was [redacted]" in line, line


def test_auto_is_text_on_a_terminal_and_json_elsewhere(root_logging: None) -> None:
    leader, follower = os.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            assert configure_logging("auto", "info", stream=terminal) == "text"
        assert configure_logging("auto", "info", stream=io.StringIO()) == "json"
    finally:
        os.close(leader)
        os.close(follower)


def test_cpu_pool_work_runs_in_the_request_context() -> None:
    from service.metrics import Metrics
    from service.settings import Settings
    from service.state import ServiceState

    state = ServiceState(Settings(cpu_workers=1), Metrics())

    async def one(request_id: str) -> str | None:
        REQUEST_ID.set(request_id)
        return await state.run_cpu(REQUEST_ID.get)

    async def both() -> list[str | None]:
        return list(await asyncio.gather(asyncio.create_task(one("a")), one("b")))

    try:
        assert asyncio.run(both()) == ["a", "b"]
    finally:
        state.pool.shutdown()


# --- a real server under a short burst ----------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, tmp_path_factory, assets: Path) -> Iterator[LiveServer]:
    """JSON at debug level (the CPU pool's lines too), an API key, one request at a time,
    traces exported to a loopback receiver."""
    if not (tiny_weights_dir / "facexlib" / "detection_mobilenet0.25_Final.pth").exists():
        pytest.skip("the RetinaFace MobileNet detector is not in the shared assets")
    env = {
        "OMP_NUM_THREADS": "2",
        "OSDFACE_LOG_FORMAT": "json",
        "OSDFACE_LOG_LEVEL": "debug",
        "OSDFACE_API_KEY": API_KEY,
        "OSDFACE_MAX_INFLIGHT_REQUESTS": "1",
        "OSDFACE_CPU_WORKERS": "2",
        "OSDFACE_SHUTDOWN_GRACE_S": "5",
    }
    log = tmp_path_factory.mktemp("json-logs") / "serve.log"
    with OtlpReceiver() as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        with running_server(tiny_weights_dir, log, env) as s:
            yield s


def _auth(key: str = API_KEY, request_id: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    return headers | ({"X-Request-Id": request_id} if request_id else {})


def _burst(base: str, crops: list[bytes]) -> list[httpx.Response]:
    """Concurrent aligned crops, each with its own X-Request-Id: one admitted at a time."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        "/restore",
                        files={"image": ("f.jpg", crop)},
                        data={"aligned": "true"},
                        headers=_auth(request_id=f"burst-{i}"),
                    )
                    for i, crop in enumerate(crops)
                )
            )

    return asyncio.run(run())


def _hang_up_mid_upload(port: int, crop: bytes, request_id: str) -> None:
    """Declare the whole body, send half of it, close the socket."""
    body = multipart([("image", crop), ("aligned", b"true")])
    head = (
        "POST /restore HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {len(body)}\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"X-Request-Id: {request_id}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.3)  # admitted and reading the body when the client leaves


def _access_lines(log: str) -> list[dict]:
    entries = (json.loads(line) for line in log.splitlines() if '"service.access"' in line)
    return [e for e in entries if e["logger"] == "service.access"]


def test_every_line_of_a_burst_is_json_with_its_request_id(
    server: LiveServer, assets: Path
) -> None:
    crops = [aligned_crop(assets, n) for n in ("Adele_crop.png", "Paris_Hilton_crop.png")] * 3
    answered: dict[str, int] = {}  # request id -> status
    traced: dict[str, str] = {}  # request id -> trace id
    for response in _burst(server.base, crops):
        answered[response.headers["x-request-id"]] = response.status_code
        traced[response.headers["x-request-id"]] = response.headers["x-trace-id"]
    assert set(answered) == {f"burst-{i}" for i in range(len(crops))}
    assert 200 in answered.values() and 429 in answered.values(), answered
    assert set(answered.values()) <= {200, 429}, answered

    photo = (assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg").read_bytes()
    png_face = (assets / "images/gfpgan/cropped_faces/Adele_crop.png").read_bytes()
    singles = [
        ({"image": (CLIENT_FILE_NAME, photo)}, {}, _auth()),  # detection on the CPU pool
        ({"image": ("a.png", png_face)}, {"aligned": "true"}, _auth()),
        ({"image": (CLIENT_FILE_NAME, b"not an image at all")}, {}, _auth()),  # 4xx
        ({"image": ("a.png", png_face)}, {"aligned": "true"}, _auth(WRONG_KEY)),  # 401
    ]
    with httpx.Client(base_url=server.base, timeout=120) as client:
        ids = []  # the server's own ids, from its answers
        for files, data, headers in singles:
            response = client.post("/restore", files=files, data=data, headers=headers)
            ids.append(response.headers["x-request-id"])
            answered[ids[-1]] = response.status_code
            traced[ids[-1]] = response.headers["x-trace-id"]
    statuses = [answered[i] for i in ids]
    assert statuses[:2] == [200, 200] and 400 <= statuses[2] < 500 and statuses[3] == 401

    _hang_up_mid_upload(server.port, crops[0], "gone-1")
    wait_until(
        lambda: any(e["request_id"] == "gone-1" for e in _access_lines(server.log_text())),
        30,
        "the hung-up request's access line",
        0.2,
    )
    answered["gone-1"] = 499
    server.process.terminate()  # its shutdown lines are part of the log too
    server.process.wait(timeout=60)

    log = server.log_text()
    entries = [json.loads(line) for line in log.splitlines()]  # every line, or it fails here
    assert entries and all(isinstance(e, dict) and set(CONTEXT) <= set(e) for e in entries)
    _check_access_lines(entries, answered)
    _check_request_ids(entries, answered, worked_on_pool=ids[:2])
    _check_trace_ids(entries, traced, unanswered="gone-1")
    assert API_KEY not in log and WRONG_KEY not in log
    _check_documented({key for e in entries if e["logger"] == "service.access" for key in e})
    assert not any(CLIENT_FILE_NAME in e["message"] for e in entries)
    assert not any("Traceback" in e["message"] for e in entries)


def _check_access_lines(entries: list[dict], answered: dict[str, int]) -> None:
    """One access line per request we sent, with the status its client saw."""
    access = [e for e in entries if e["logger"] == "service.access"]
    ours = [e for e in access if e["request_id"] in answered]
    assert sorted(e["request_id"] for e in ours) == sorted(answered)
    for e in ours:
        assert (e["method"], e["path"], e["route"]) == ("POST", "/restore", "/restore"), e
        assert e["status"] == answered[e["request_id"]], e
        assert isinstance(e["bytes"], int) and e["bytes"] >= 0, e
        assert isinstance(e["duration_s"], float) and e["duration_s"] >= 0, e
        assert e["message"] == f"POST /restore {e['status']}"
    ok = [e for e in ours if e["status"] == 200]
    assert all(e["bytes"] > 1000 for e in ok), ok  # the restored image


def _check_request_ids(
    entries: list[dict], answered: dict[str, int], worked_on_pool: list[str]
) -> None:
    """Lines of the CPU pool carry the id of the request they worked for (a detection and PNG
    decoding log at debug level there); request ids on any line are ours (or a probe's, on its
    access line); the access log never lacks one."""
    pool = [e for e in entries if e["thread"].startswith("osdface-cpu")]
    assert all(e["request_id"] in answered for e in pool), pool
    assert {e["request_id"] for e in pool} >= set(worked_on_pool), pool
    for e in entries:
        if e["logger"] == "service.access":
            assert e["request_id"], e
        if e["request_id"] and e["request_id"] not in answered:
            assert e["logger"] == "service.access" and e["path"] in PROBES, e


def _check_trace_ids(entries: list[dict], traced: dict[str, str], unanswered: str) -> None:
    """Every line about one of our requests carries its trace id (the one its answer gave) and
    a span id; the request that got no answer has a trace id too. A line with no request id
    and a trace id comes from the model worker, during the model call of a traced request."""
    for e in entries:
        rid = e["request_id"]
        if rid in traced:
            assert e["trace_id"] == traced[rid], e
        if rid in traced or rid == unanswered:
            assert re.fullmatch("[0-9a-f]{32}", e["trace_id"] or ""), e
            assert re.fullmatch("[0-9a-f]{16}", e["span_id"] or ""), e
        elif rid is None and e["trace_id"] is not None:
            assert e["thread"].startswith("osdface-model"), e
    access = {e["request_id"]: e for e in entries if e["logger"] == "service.access"}
    assert access[unanswered]["trace_id"] not in traced.values()


def _check_documented(fields: set[str]) -> None:
    """docs/operations.md's Logs section names every field an access line has."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    section = page.split("\n## Logs\n", 1)[1].split("\n## ", 1)[0]
    assert fields >= set(CONTEXT), fields
    assert [f for f in sorted(fields) if f"`{f}`" not in section] == []
