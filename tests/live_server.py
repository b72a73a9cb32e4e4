"""A real `osdface serve` process on 127.0.0.1 for the tests that need one (test_service_server,
browser, Prometheus).

Started as a subprocess exactly as a user would (`python -m osdface serve ...`), on a free
port, CPU, tiny weights and the real offline RetinaFace MobileNet detector; stopped with SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """The status code of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll `predicate` until it returns a truthy value; that value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM `process` if it still runs; kill it if it has not exited `timeout` s later."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class LiveServer:
    """A started `osdface serve`: its process (tests may signal it), base URL, port and log."""

    process: subprocess.Popen
    base: str
    port: int
    log: Path

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=10).text

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


# What the end-to-end tests (browser, Prometheus) run with: one CPU worker, a short drain.
E2E_ENV = {"OSDFACE_CPU_WORKERS": "1", "OSDFACE_SHUTDOWN_GRACE_S": "5"}


@contextmanager
def running_server(
    weights_dir: Path, log_path: Path, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[LiveServer]:
    """`python -m osdface serve` (the `osdface` console script's entry point) on `port` (else
    a free one), CPU, float32: wait for /readyz, yield it, stop it with SIGTERM if still
    running."""
    port = port or free_port()
    command = [sys.executable, "-m", "osdface", "serve", "--weights", str(weights_dir)]
    command += ["--detector", "retinaface_mobile0.25", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--device", "cpu", "--dtype", "float32"]
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT
        )
    server = LiveServer(process, f"http://127.0.0.1:{port}", port, log_path)
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"osdface serve exited with {process.returncode}:\n{_tail(log_path)}"
                )
            return http_status(f"{server.base}/readyz", timeout=2.0) == 200

        try:
            wait_until(ready, STARTUP_TIMEOUT_S, f"{server.base}/readyz", interval=0.25)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n{_tail(log_path)}") from None
        yield server
    finally:
        stop(process, timeout=30)


def skip(reason: str) -> None:
    print(f"SKIP: {reason}")
    pytest.skip(reason)


@contextmanager
def e2e_server(weights_dir: Path, tmp_path_factory, name: str) -> Iterator[str]:
    """The end-to-end tests' server (skips without the offline detector); yields its base URL."""
    if not (weights_dir / "facexlib" / "detection_mobilenet0.25_Final.pth").exists():
        skip("the RetinaFace MobileNet detector is not in the shared assets")
    log = tmp_path_factory.mktemp(name) / "serve.log"
    with running_server(weights_dir, log, E2E_ENV) as server:
        yield server.base
