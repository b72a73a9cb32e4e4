"""The service as users run it: a real `osdface serve` process on 127.0.0.1 (uvicorn, one worker),
tiny random weights in the released layout, the real offline RetinaFace MobileNet detector.

Covers what only a real server shows: limits enforced while the body is still arriving, 64
concurrent clients against a small queue, memory over a few hundred requests, a client that
hangs up, and SIGTERM draining the work in flight.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import httpx
import psutil
import pytest

from tests.live_server import LiveServer, http_status, running_server, wait_until
from tests.service_helpers import (
    BOUNDARY,
    aligned_crop,
    assert_error_shape,
    batches_larger_than_one,
    faceless_png,
    hostile_uploads,
    metric,
    multipart,
)

MAX_UPLOAD = 2 * 1024 * 1024
# What every server of this file runs with, on top of its fixture's own settings.
SERVER_ENV = {
    "OMP_NUM_THREADS": "2",
    "OSDFACE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
    "OSDFACE_LOG_LEVEL": "info",
}


@pytest.fixture(scope="module")
def crop(assets: Path) -> bytes:
    return aligned_crop(assets)


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, tmp_path_factory, assets: Path) -> Iterator[LiveServer]:
    """Queue bound of 8 faces, batches up to 8, enough admission room for 64 clients."""
    env = {
        "OSDFACE_MAX_QUEUE_FACES": "8",
        "OSDFACE_MAX_BATCH_FACES": "8",
        "OSDFACE_MAX_BATCH_DELAY_MS": "20",
        "OSDFACE_MAX_INFLIGHT_REQUESTS": "128",
        "OSDFACE_CPU_WORKERS": "2",
        "OSDFACE_REQUEST_TIMEOUT_S": "300",
    }
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(tiny_weights_dir, log, SERVER_ENV | env) as s:
        yield s


def post_crop(base: str, crop: bytes, **kw) -> httpx.Response:
    return httpx.post(
        f"{base}/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "true"}, **kw
    )


# --- contract ----------------------------------------------------------------------------------


def test_contract_over_real_http(server: LiveServer, crop: bytes, assets: Path) -> None:
    base = server.base
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
    info = httpx.get(f"{base}/v1/info").json()
    assert info["batching"]["max_queue_faces"] == 8 and info["detector"]["device"] == "cpu"
    image = post_crop(base, crop, timeout=120)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.headers["x-faces-detected"] == "1" and image.content[:3] == b"\xff\xd8\xff"
    photo = (assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg").read_bytes()
    as_json = httpx.post(
        f"{base}/restore",
        files={"image": ("p.jpg", photo)},
        headers={"Accept": "application/json"},
        timeout=120,
    )
    assert as_json.status_code == 200 and as_json.json()["faces_detected"] == 2
    metrics = httpx.get(f"{base}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert metric(metrics.text, "osdface_faces_per_image_sum") >= 3
    page = httpx.get(f"{base}/")  # the browser page (service/web.py) is part of the app
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


def test_hostile_uploads_over_real_http(server: LiveServer, assets: Path) -> None:
    good_png = (assets / "images/gfpgan/cropped_faces/Adele_crop.png").read_bytes()
    with httpx.Client(base_url=server.base, timeout=60) as client:
        for case in hostile_uploads(aligned_crop(assets), good_png, MAX_UPLOAD):
            response = client.post("/restore", **case.request_kwargs())
            assert_error_shape(response, case.status, case.error_type)
            assert client.get("/healthz").status_code == 200, case.name
    text = server.metrics()
    assert (
        metric(
            text, "osdface_request_duration_seconds_count", endpoint="/restore", status_class="5xx"
        )
        == 0
    )
    assert metric(text, "osdface_errors_total", type="internal") == 0


def _head(content_length: str | None, chunked: bool = False) -> bytes:
    lines = [
        "POST /restore HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
    ]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_upload_limit_is_enforced_while_reading(server: LiveServer) -> None:
    # Declared too big: refused before a single body byte is sent.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_head(str(50 * 1024 * 1024)))
        assert _status_of(sock.recv(4096)) == 413
    # Streamed without a length: refused once past the limit, long before the end.
    planned = 64 * 1024 * 1024
    sent = 0
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"\r\n\r\n'.encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_head(None, chunked=True) + b"%x\r\n%s\r\n" % (len(head), head))
        sock.setblocking(False)
        chunk = b"%x\r\n%s\r\n" % (65536, b"\xff" * 65536)
        answer = b""
        while sent < planned and not answer:
            try:
                sock.sendall(chunk)
                sent += 65536
            except (BlockingIOError, InterruptedError):
                time.sleep(0.005)
            except (BrokenPipeError, ConnectionResetError):
                break
            with suppress(BlockingIOError):
                answer = sock.recv(4096)
        sock.setblocking(True)
        sock.settimeout(10)
        answer = answer or sock.recv(4096)
    assert _status_of(answer) == 413
    assert sent < planned / 4, f"the server read {sent} bytes before refusing"


# --- load --------------------------------------------------------------------------------------


def test_64_concurrent_clients_against_a_queue_of_8(server: LiveServer, crop: bytes) -> None:
    before = batches_larger_than_one(server.metrics())

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=300) as client:
            files = {"image": ("f.jpg", crop)}

            async def one() -> httpx.Response:
                return await client.post("/restore", files=files, data={"aligned": "true"})

            return await asyncio.gather(*(one() for _ in range(64)))

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for r in responses:
        if r.status_code == 429:
            # Refused for room (queue_full) or, once the worker's speed is known, for time.
            kind = r.json()["error"]["type"]
            assert kind in ("queue_full", "overloaded"), kind
            assert_error_shape(r, 429, kind)
            assert int(r.headers["retry-after"]) >= 1
    text = server.metrics()
    assert batches_larger_than_one(text) > before, "no batch held more than one face"
    refused = sum(
        metric(text, "osdface_rejected_total", reason=k) for k in ("queue_full", "overloaded")
    )
    assert refused >= statuses.count(429)
    assert metric(text, "osdface_queue_depth") == 0


def test_resident_memory_stops_growing(server: LiveServer, assets: Path) -> None:
    """240 requests in rounds of 8 concurrent ones (faces, no face, broken files); the server's
    RSS is sampled after each round and must have levelled off by the second half."""
    crops = [aligned_crop(assets, n) for n in ("Adele_crop.png", "Paris_Hilton_crop.png")]
    png = (assets / "images/gfpgan/cropped_faces/Adele_crop.png").read_bytes()
    mix = [
        {"files": {"image": ("a.jpg", crops[0])}, "data": {"aligned": "true"}},
        {"files": {"image": ("b.jpg", crops[1])}, "data": {"aligned": "1", "output_format": "png"}},
        {"files": {"image": ("n.png", faceless_png())}},
        {"files": {"image": ("n.png", faceless_png(96, 64))}, "data": {"upscale": "2"}},
        {"files": {"image": ("n.png", faceless_png(64, 96))}, "data": {"output_format": "webp"}},
        {"files": {"image": ("t.png", png[: len(png) // 3])}},
        {"files": {"image": ("t.jpg", b"GIF89a" + bytes(64))}},
        {"files": {"image": ("e.jpg", b"")}},
    ]
    process = psutil.Process(server.process.pid)
    rounds, samples = 30, []

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base, timeout=300) as client:
            for _ in range(rounds):
                got = await asyncio.gather(*(client.post("/restore", **kw) for kw in mix))
                assert [r.status_code for r in got] == [200] * 5 + [400, 415, 400]
                samples.append(process.memory_info().rss)

    asyncio.run(run())
    mib = [s / 2**20 for s in samples]
    warm, middle, last = mib[7], mib[rounds // 2], mib[-1]
    print(f"RSS MiB after rounds 8/{rounds // 2}/{rounds}: {warm:.1f} {middle:.1f} {last:.1f}")
    assert last - middle < max(24.0, 0.03 * middle), mib
    assert last - warm < max(48.0, 0.06 * warm), mib


# --- disconnect and SIGTERM on a server whose batches wait long to fill ------------------------


@pytest.fixture(scope="class")
def slow(tiny_weights_dir: Path, tmp_path_factory, assets: Path) -> Iterator[LiveServer]:
    """Batches wait up to 2 s for more faces, so a lone request sits in the queue a while."""
    env = {
        "OSDFACE_MAX_BATCH_DELAY_MS": "2000",
        "OSDFACE_MAX_BATCH_FACES": "8",
        "OSDFACE_SHUTDOWN_GRACE_S": "30",
        "OSDFACE_WARMUP": "false",
    }
    log = tmp_path_factory.mktemp("serve-slow") / "serve.log"
    with running_server(tiny_weights_dir, log, SERVER_ENV | env) as s:
        yield s


class TestDrain:
    """On one slow-batching server, in order: a disconnect, then SIGTERM (which ends it)."""

    def test_client_disconnect_drops_its_queued_face(self, slow: LiveServer, crop: bytes) -> None:
        body = multipart([("image", crop), ("aligned", b"true")])
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", slow.port), timeout=10) as sock:
            sock.sendall(_head(str(len(body))) + body)
            wait_until(
                lambda: metric(slow.metrics(), "osdface_queue_depth") == 1,
                30,
                "a queued face",
                0.05,
            )
        # The socket is closed: the server drops the face before its batch would have run.
        wait_until(
            lambda: metric(slow.metrics(), "osdface_rejected_total", reason="client_disconnected"),
            30,
            "the disconnect to be noticed",
            0.05,
        )
        time.sleep(max(0.0, started + 2.5 - time.monotonic()))
        text = slow.metrics()
        assert metric(text, "osdface_queue_depth") == 0
        assert metric(text, "osdface_batch_size_count") == 0, "the abandoned face was run"

    def test_sigterm_finishes_work_in_flight_then_exits(
        self, slow: LiveServer, crop: bytes
    ) -> None:
        results: list[httpx.Response | BaseException] = []

        def client() -> None:
            try:
                results.append(post_crop(slow.base, crop, timeout=120))
            except BaseException as exc:
                results.append(exc)

        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(
            lambda: metric(slow.metrics(), "osdface_queue_depth") == 2, 60, "2 queued faces", 0.05
        )
        slow.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # New work is refused (listening socket closed, or not ready) while the old finishes.
        assert http_status(f"{slow.base}/readyz", timeout=2.0) in (None, 503)
        for t in threads:
            t.join(120)
        assert [getattr(r, "status_code", r) for r in results] == [200, 200]
        assert all(r.content[:3] == b"\xff\xd8\xff" for r in results)
        code = slow.process.wait(timeout=60)
        assert code in (0, -signal.SIGTERM), code
        assert http_status(f"{slow.base}/healthz", timeout=2.0) is None, "still accepting"
        log = slow.log_text()
        assert "model worker drained" in log and "Traceback" not in log
