"""What osdface.client retries, how long it waits, and its deadline.

A real `osdface serve` cannot answer 502, 504, 500, a given Retry-After or a broken download on
demand, so those cases run against a tiny scripted HTTP server on loopback; a refused connection
is a real closed port; TLS is a real handshake with a self-signed certificate. The 429s of a
real server are in tests/test_client.py.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from osdface.client import (
    BusyError,
    Client,
    DeadlineExceededError,
    InputError,
    RetryPolicy,
    ServerError,
    TLSError,
    UnreachableError,
)
from osdface.client.retry import Attempts
from tests.live_server import free_port

FAST = RetryPolicy(attempts=4, backoff_s=0.05, jitter=0.0)
IMAGE_HEADERS = {
    "Content-Type": "image/png",
    "X-Faces-Detected": "3",
    "X-Queue-Time": "0.0100",
    "X-Inference-Time": "0.2000",
    "X-Total-Time": "0.2500",
    "X-Background-Time": "0.0000",
    "X-Output-Format": "png",
    "X-Metadata-Dropped": "exif,icc",
    "X-Request-Id": "stub-1",
}


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    cut_at: int | None = None  # send only this many body bytes, then close


def error(status: int, type_: str, **headers: str) -> Reply:
    body = json.dumps({"error": {"type": type_, "message": f"{type_} (stub)"}}).encode()
    return Reply(status, body, {"Content-Type": "application/json", **headers})


class Stub:
    """Answers each path from its script, in order (the last reply repeats); records requests."""

    def __init__(self) -> None:
        self.script: dict[str, list[Reply]] = {}
        self.seen: list[tuple[str, dict[str, str], bytes]] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stub.seen.append((self.path, dict(self.headers.items()), body))
                replies = stub.script.get(self.path) or [error(404, "not_found")]
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                time.sleep(reply.delay_s)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply.body)))
                if reply.cut_at is not None:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(reply.body[: reply.cut_at])
                self.wfile.flush()
                if reply.cut_at is not None:
                    self.close_connection = True

            do_GET = do_POST = do_DELETE = _answer  # noqa: N815 (http.server's names)

        return Handler

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.seen]


@contextmanager
def serving(tls: ssl.SSLContext | None = None) -> Iterator[tuple[Stub, str]]:
    stub = Stub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), stub.handler())
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls else "http"
    try:
        yield stub, f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    with serving() as pair:
        yield pair


# --- the policy alone ---------------------------------------------------------------------------


def test_waits_follow_retry_after_capped_and_backoff_doubling() -> None:
    now = [0.0]
    policy = RetryPolicy(attempts=5, backoff_s=1.0, max_backoff_s=3.0, max_retry_after_s=10.0)
    attempts = Attempts(policy, 100.0, clock=lambda: now[0], rng=lambda: 1.0)  # full jitter
    busy = BusyError(429, "queue_full", "m", retry_after_s=4.0)
    assert attempts.after(busy) == pytest.approx(4.0 * 1.25)  # never before Retry-After
    long_wait = BusyError(503, "not_ready", "m", retry_after_s=3600.0)
    assert attempts.after(long_wait) == pytest.approx(10.0 * 1.25)  # cut to the cap
    gateway = ServerError(502, "http_502", "m")
    assert attempts.after(gateway) == pytest.approx(3.0 * 1.25)  # 1 * 2**2, cut to 3
    assert attempts.retried == ["429 queue_full", "503 not_ready", "502 http_502"]
    assert attempts.after(UnreachableError("x")) == pytest.approx(3.0 * 1.25)
    with pytest.raises(UnreachableError):  # the fifth try was the last
        attempts.after(UnreachableError("y"))
    for final in (InputError(422, "invalid_parameter", "m"), ServerError(500, "internal", "m")):
        with pytest.raises(type(final)):
            Attempts(policy, 100.0).after(final)
    late = Attempts(policy, 2.0, clock=lambda: now[0])
    with pytest.raises(BusyError):  # its Retry-After ends past the deadline
        late.after(busy)
    now[0] = 2.5
    with pytest.raises(DeadlineExceededError):
        late.time_left()


# --- against a scripted server ------------------------------------------------------------------


def test_gateway_errors_are_retried_and_the_headers_parsed(stub) -> None:
    server, url = stub
    server.script["/restore"] = [
        Reply(502, b"<html>bad gateway</html>", {"Content-Type": "text/html"}),
        error(504, "deadline_exceeded"),
        Reply(200, b"\x89PNG-bytes", IMAGE_HEADERS),
    ]
    with Client(url, retry=FAST, env={}) as client:
        result = client.restore(b"photo-bytes", filename="p.jpg")
    assert result.retried == ("502 http_502", "504 deadline_exceeded")
    assert result.image == b"\x89PNG-bytes" and result.faces_detected == 3
    assert result.faces_restored is None  # a server without X-Faces-Restored
    assert result.metadata_dropped == ("exif", "icc") and result.timings.inference_s == 0.2
    bodies = [body for _, _, body in server.seen]
    assert len(bodies) == 3 and all(b"photo-bytes" in b for b in bodies), "sent whole each time"


@pytest.mark.parametrize(
    ("reply", "raised"),
    [
        (error(500, "internal"), ServerError),
        (error(400, "invalid_image"), InputError),
        (error(413, "image_too_large"), InputError),
        (Reply(500, b"Internal Server Error"), ServerError),
    ],
)
def test_500_and_refused_input_are_never_retried(stub, reply: Reply, raised: type) -> None:
    server, url = stub
    server.script["/restore"] = [reply, Reply(200, b"x", IMAGE_HEADERS)]
    with Client(url, retry=FAST, env={}) as client, pytest.raises(raised) as info:
        client.restore(b"photo")
    assert len(server.seen) == 1
    assert info.value.status == reply.status
    if reply.body.startswith(b"{"):
        assert info.value.type == json.loads(reply.body)["error"]["type"]
    else:
        assert info.value.type == "http_500" and "Internal Server Error" in info.value.message


def test_retry_after_in_seconds_or_as_a_date_is_waited(stub) -> None:
    server, url = stub
    in_four = formatdate(time.time() + 4.0, usegmt=True)  # whole seconds: 3 to 4 s ahead
    server.script["/v1/info"] = [
        error(503, "not_ready", **{"Retry-After": "1"}),
        error(429, "queue_full", **{"Retry-After": in_four}),
        Reply(200, b'{"batching": {}}', {"Content-Type": "application/json"}),
    ]
    started = time.monotonic()
    with Client(url, retry=RetryPolicy(jitter=0.1), env={}) as client:
        assert client.info() == {"batching": {}}
    elapsed = time.monotonic() - started
    assert 3.0 <= elapsed < 5.0, elapsed  # 1 s, then until the date


def test_nothing_waits_past_the_call_deadline(stub) -> None:
    server, url = stub
    server.script["/restore"] = [error(429, "queue_full", **{"Retry-After": "30"})]
    server.script["/v1/info"] = [Reply(200, b"{}", delay_s=3.0)]
    with Client(url, deadline_s=2.0, env={}) as client:
        started = time.monotonic()
        with pytest.raises(BusyError):
            client.restore(b"photo")
        assert time.monotonic() - started < 1.0 and len(server.seen) == 1
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            client.info(deadline_s=0.5)
        assert time.monotonic() - started < 1.5


def test_a_refused_connection_is_retried_then_raised() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with Client(url, retry=FAST, env={}) as client:
        with pytest.raises(UnreachableError, match=r"127\.0\.0\.1"):
            client.info()
        with pytest.raises(DeadlineExceededError, match="not ready"):
            client.wait_ready(timeout_s=0.5, poll_s=0.1)
    assert time.monotonic() - started < 3.0


def test_a_broken_download_is_retried_and_never_left_half_written(stub, tmp_path: Path) -> None:
    server, url = stub
    video = bytes(range(256)) * 400
    path = "/v1/jobs/j1/result"
    server.script[path] = [
        Reply(200, video, {"Content-Type": "video/mp4"}, cut_at=1000),
        Reply(200, video, {"Content-Type": "video/mp4"}),
    ]
    target = tmp_path / "out" / "clip.mp4"
    with Client(url, retry=FAST, env={}) as client:
        assert client.download_job("j1", target) == target
        assert target.read_bytes() == video and server.paths() == [path, path]
        server.script[path] = [Reply(200, video, {"Content-Type": "video/mp4"}, cut_at=1000)]
        other = tmp_path / "out" / "never.mp4"
        with pytest.raises(UnreachableError):
            client.download_job("j1", other)
    assert sorted(p.name for p in target.parent.iterdir()) == ["clip.mp4"]


def test_a_job_upload_carries_one_idempotency_key_across_retries(stub, tmp_path: Path) -> None:
    server, url = stub
    view = {"id": "j9", "state": "queued", "progress": {"frames_done": 0}, "faces": 0}
    server.script["/v1/jobs"] = [
        error(503, "not_ready", **{"Retry-After": "1"}),
        Reply(202, json.dumps(view).encode(), {"Content-Type": "application/json"}),
    ]
    clip = tmp_path / "c.mp4"
    clip.write_bytes(b"not really a video")
    with Client(url, retry=FAST, env={}) as client:
        job = client.submit_job(clip)
    assert job.id == "j9" and job.state == "queued" and not job.finished
    keys = [headers.get("Idempotency-Key") for _, headers, _ in server.seen]
    assert len(keys) == 2 and keys[0] and keys[0] == keys[1]
    assert all(b'filename="c.mp4"' in body for _, _, body in server.seen)


def test_tls_is_verified_and_a_ca_bundle_trusted(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl (to make a self-signed certificate) is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with serving(context) as (server, url):
        server.script["/readyz"] = [Reply(200, b'{"status": "ready"}')]
        with Client(url, retry=FAST, env={}) as strict, pytest.raises(TLSError):
            strict.info()
        with Client(url, ca_bundle=cert, env={}) as trusting:
            assert trusting.ready() is True
    assert server.paths() == ["/readyz"]
