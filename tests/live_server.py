"""A real `osdface serve` process on 127.0.0.1 for end-to-end tests (browser, Prometheus).

Started as a subprocess exactly as a user would (`python -m service.cli serve ...`), on a free
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
from pathlib import Path

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


@contextmanager
def running_server(
    weights_dir: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """Start `osdface serve`, wait for /readyz, yield its base URL, stop it with SIGTERM."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "serve",
        "--weights",
        str(weights_dir),
        "--detector",
        "retinaface_mobile0.25",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    child_env = {
        **os.environ,
        "OSDFACE_DEVICE": "cpu",
        "OSDFACE_DTYPE": "float32",
        "OSDFACE_CPU_WORKERS": "1",
        "OSDFACE_SHUTDOWN_GRACE_S": "5",
        "HF_HUB_OFFLINE": "1",
        **(env or {}),
    }
    base = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT
        )
        try:

            def ready() -> bool:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"osdface serve exited with {process.returncode}:\n{_tail(log_path)}"
                    )
                return http_status(f"{base}/readyz", timeout=2.0) == 200

            try:
                wait_until(ready, STARTUP_TIMEOUT_S, f"{base}/readyz")
            except TimeoutError as e:
                raise TimeoutError(f"{e}\n{_tail(log_path)}") from None
            yield base
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
