"""A real `osdface serve` from start to exit: refusing a broken environment, failing loudly on
broken weights, admission by time under 40 concurrent clients at the default settings, the
HTTP parser's errors in the service's JSON shape, and a request cut by the end of the
shutdown grace answered 503 JSON.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import REPO, LiveServer, free_port, running_server
from tests.service_helpers import aligned_crop, assert_error_shape, exif_uploads, metric

# Defaults, except the two timeouts this file waits for (neither changes admission).
DEFAULTS_ENV = {
    "OMP_NUM_THREADS": "2",
    "OSDFACE_HEADERS_TIMEOUT_S": "2",
    "OSDFACE_SHUTDOWN_GRACE_S": "2",
}
REQUEST_TIMEOUT_S = 60.0  # the default deadline


def serve(weights: Path, env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    """Run `osdface serve` until it exits by itself; (status, output, seconds)."""
    command = [sys.executable, "-m", "osdface", "serve", "--weights", str(weights)]
    command += ["--detector", "retinaface_mobile0.25", "--device", "cpu"]
    command += ["--port", str(free_port())]
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def test_a_misspelt_setting_refuses_to_start(tiny_weights_dir: Path) -> None:
    code, out, _ = serve(tiny_weights_dir, {"OSDFACE_MAX_QUEUE": "8"}, timeout=120)
    assert code == 2, out
    assert "OSDFACE_MAX_QUEUE is not a setting; did you mean OSDFACE_MAX_QUEUE_FACES?" in out
    assert "Traceback" not in out


def test_a_non_finite_setting_refuses_to_start(tiny_weights_dir: Path) -> None:
    code, out, _ = serve(tiny_weights_dir, {"OSDFACE_MAX_BATCH_DELAY_MS": "inf"}, timeout=120)
    assert code == 2, out
    assert "OSDFACE_MAX_BATCH_DELAY_MS: must be a finite number (got 'inf')" in out
    assert "Traceback" not in out


def _weights_without(tiny: Path, root: Path, missing: str) -> Path:
    """A weights folder of links to `tiny`'s files, except `missing` (a relative path)."""
    for path in tiny.rglob("*"):
        rel = path.relative_to(tiny)
        if path.is_dir() or rel.as_posix() == missing:
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(path.resolve())
    return root


def test_missing_vae_is_refused_before_loading(tiny_weights_dir: Path, tmp_path) -> None:
    missing = "sd21-base/vae/diffusion_pytorch_model.safetensors"
    weights = _weights_without(tiny_weights_dir, tmp_path / "w", missing)
    code, out, _ = serve(weights, {}, timeout=120)
    assert code == 2, out  # the same file checks as `osdface restore`, before torch
    assert missing in out and f"osdface weights fetch --dir {weights}" in out, out
    assert "loading the restorer" not in out and "Traceback" not in out


def test_broken_vae_exits_non_zero_with_one_clear_line(
    tiny_weights_dir: Path, tmp_path, assets: Path
) -> None:
    # `assets`: serve checks the detector file (linked from there) before it loads anything.
    broken = "sd21-base/vae/diffusion_pytorch_model.safetensors"
    weights = _weights_without(tiny_weights_dir, tmp_path / "w", broken)
    (weights / broken).write_bytes((tiny_weights_dir / broken).read_bytes()[:1000])  # cut short
    # What a person at a terminal reads (piped, the log would be JSON: test_json_logs.py).
    code, out, seconds = serve(weights, {"OSDFACE_LOG_FORMAT": "text"}, timeout=240)
    assert code == 3, out
    errors = [line for line in out.splitlines() if " ERROR " in line or "ERROR:" in line]
    assert len(errors) == 1, errors
    assert broken in errors[0] and "osdface weights fetch" in errors[0], errors[0]
    assert "Traceback" not in out
    print(f"exited {code} after {seconds:.1f} s")


def test_missing_converted_vre_says_to_convert(tiny_weights_dir: Path, tmp_path) -> None:
    weights = _weights_without(tiny_weights_dir, tmp_path / "w", "osdface/vre.safetensors")
    code, out, _ = serve(weights, {}, timeout=120)
    assert code == 2, out
    assert "osdface weights convert" in out and "Traceback" not in out
    assert not (weights / "osdface" / "vre.safetensors").exists(), "serve converted by itself"


# --- one server at the defaults ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, tmp_path_factory, assets: Path) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("serve-defaults") / "serve.log"
    with running_server(tiny_weights_dir, log, DEFAULTS_ENV) as s:
        yield s


def test_40_concurrent_clients_get_200_or_429_and_every_200_in_time(
    server: LiveServer, assets: Path
) -> None:
    crop = aligned_crop(assets)

    async def run() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
        async with httpx.AsyncClient(base_url=server.base, limits=limits, timeout=300) as client:

            async def one() -> tuple[httpx.Response, float]:
                started = time.monotonic()
                r = await client.post(
                    "/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "true"}
                )
                return r, time.monotonic() - started

            return await asyncio.gather(*(one() for _ in range(40)))

    answers = asyncio.run(run())
    statuses = [r.status_code for r, _ in answers]
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses, statuses
    for r, seconds in answers:
        if r.status_code == 200:
            assert seconds < REQUEST_TIMEOUT_S, seconds
        else:
            assert r.json()["error"]["type"] in {"overloaded", "queue_full", "too_many_requests"}
            assert int(r.headers["retry-after"]) >= 1
    print(f"200: {statuses.count(200)}, 429: {statuses.count(429)}")
    assert metric(server.metrics(), "osdface_errors_total", type="deadline_exceeded") == 0


def test_files_with_broken_metadata_over_real_http(server: LiveServer) -> None:
    for name, (data, fields) in exif_uploads().items():
        r = httpx.post(
            f"{server.base}/restore", files={"image": ("x", data)}, data=fields, timeout=120
        )
        assert r.status_code == 200, (name, r.text[:200])


def _raw(port: int, request: bytes, wait: float = 30.0) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(request)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out, time.monotonic() - started


def _parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /restore HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /restore HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nab\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    ],
    ids=["negative_content_length", "bad_chunk", "malformed_header"],
)
def test_parser_errors_are_json_with_a_request_id(server: LiveServer, request_bytes) -> None:
    raw, _ = _raw(server.port, request_bytes)
    status, headers, body = _parse(raw)
    assert status == 400 and headers["content-type"] == "application/json", raw[:300]
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    assert b'"malformed_request"' in body


def test_unknown_method_and_head(server: LiveServer) -> None:
    r = httpx.request("BREW", f"{server.base}/healthz", timeout=10)
    assert_error_shape(r, 405, "method_not_allowed")
    head = httpx.head(f"{server.base}/healthz", timeout=10)
    assert head.status_code == 200 and head.content == b""


def test_slow_headers_time_out(server: LiveServer) -> None:
    raw, seconds = _raw(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    status, _, body = _parse(raw)
    assert status == 408 and b'"request_timeout"' in body, raw[:300]
    assert 1.5 < seconds < 10, seconds


def test_probes_leave_error_counters_at_zero(server: LiveServer) -> None:
    before = server.metrics()
    for _ in range(10):
        httpx.get(f"{server.base}/readyz", timeout=10)
        httpx.get(f"{server.base}/healthz", timeout=10)
    after = server.metrics()
    for name in ("osdface_errors_total", "osdface_request_duration_seconds_count"):
        assert metric(after, name) == metric(before, name), name


def test_a_request_cut_by_shutdown_gets_503_json(server: LiveServer) -> None:
    """Last on this server: an upload that stalls; SIGTERM; the grace (2 s) ends."""
    head = b'--a\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            b"POST /restore HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=a\r\n\r\n" + head + b"\xff\xd8\xff"
        )
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, headers, body = _parse(raw)
    assert status == 503 and headers["content-type"] == "application/json", raw[:300]
    assert b'"shutting_down"' in body and headers["retry-after"] == "1"
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)
