"""A real `redis-server` (Debian's package, installed by .ci/run) on a loopback port, for the
tests of the job store and of replicas sharing it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.live_server import skip, stop, wait_until


@contextmanager
def redis_server(folder: Path, port: int, *persistence: str) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        skip("redis-server not installed (apt-get install redis-server)")
    assert exe is not None
    log = (folder / f"redis-{port}.log").open("ab")
    args = ["--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", ""]
    process = subprocess.Popen(
        [exe, *args, *(persistence or ("--appendonly", "no"))], stdout=log, stderr=log
    )
    client = redis.Redis(port=port, socket_connect_timeout=1)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.exceptions.RedisError:
            return process.poll() is not None  # exited: the assert below says so

    try:
        wait_until(answers, 20, "redis-server to answer", interval=0.05)
        assert process.poll() is None, (folder / f"redis-{port}.log").read_text()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        stop(process, timeout=10)
        log.close()
