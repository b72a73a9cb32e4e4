"""A rolling restart behind the real nginx: clients see no 5xx and no connection error.

Two real `osdface serve` replicas (tiny weights, CPU, the real RetinaFace detector) share one
jobs folder behind nginx configured from docker/nginx.conf (tests/nginx_helpers.py). Clients
keep sending `POST /restore` through nginx while the test restarts the replicas one at a time,
as an operator or a Deployment does: SIGTERM A, wait for it to exit, start it again on the same
port, wait until it is ready and nginx sends it work again; then the same for B.

The load runs in `LoadLoop`s, each repeating one request and recording every outcome, so more
kinds of traffic (polling a job, say) are one more loop beside the first.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.live_server import E2E_ENV, LiveServer, free_port, running_server, skip, wait_until
from tests.nginx_helpers import NGINX, running_nginx
from tests.service_helpers import aligned_crop
from tests.video_helpers import gradient_frames, write_clip

JOB_FRAMES = 200  # a job that runs through the first restart at least
CLIENTS = 2  # concurrent /restore clients, so requests are in flight when a SIGTERM lands
# Between a client's requests: leaves the 2-core test machine room to start a replica.
PAUSE_S = 0.1
RESTORED_METRIC = re.compile(
    r'^osdface_request_duration_seconds_count\{endpoint="/restore",status_class="2xx"\} (\S+)$',
    re.MULTILINE,
)


# --- load ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    at: float  # time.monotonic() when the answer (or the error) came
    status: int | None  # None: no HTTP answer at all
    error: str = ""


@dataclass
class LoadLoop:
    """`clients` threads, each sending `request` again and again through its own keep-alive
    client until stopped, recording every outcome. Use as a context manager."""

    name: str
    request: Callable[[httpx.Client], httpx.Response]
    clients: int = 1
    pause_s: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    status = self.request(client).status_code
                    self.outcomes.append(Outcome(time.monotonic(), status))
                except httpx.HTTPError as e:
                    self.outcomes.append(Outcome(time.monotonic(), None, f"{type(e).__name__}"))
                self._stop.wait(self.pause_s)

    def __enter__(self) -> LoadLoop:
        for i in range(self.clients):
            thread = threading.Thread(target=self._run, name=f"{self.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def count(self, status: int | None, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for o in self.outcomes if o.status == status and since <= o.at <= until)

    def failures(self) -> list[Outcome]:
        """Connection errors and 5xx answers."""
        return [o for o in self.outcomes if o.status is None or o.status >= 500]


def restore_request(base: str, image: bytes) -> Callable[[httpx.Client], httpx.Response]:
    def send(client: httpx.Client) -> httpx.Response:
        files = {"image": ("face.jpg", image, "image/jpeg")}
        return client.post(f"{base}/restore", files=files, data={"aligned": "true"})

    return send


# --- replicas --------------------------------------------------------------------------------


@dataclass
class Replica:
    """One `osdface serve` that can be stopped and started again on the same port."""

    name: str
    weights: Path
    logs: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    starts: int = 0
    _running: AbstractContextManager[LiveServer] | None = None

    def start(self) -> None:
        self.starts += 1
        log = self.logs / f"{self.name}-{self.starts}.log"
        running = running_server(self.weights, log, self.env, port=self.port)
        running.__enter__()  # waits for /readyz
        self._running = running

    def stop(self) -> None:
        """SIGTERM, and wait for the process to exit."""
        if self._running is not None:
            running, self._running = self._running, None
            running.__exit__(None, None, None)

    def restored(self) -> float:
        """/restore requests this process answered 2xx (from its /metrics)."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=10).text
        return sum(float(v) for v in RESTORED_METRIC.findall(text))


@pytest.fixture
def replicas(tiny_weights_dir: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    detector = tiny_weights_dir / "facexlib" / "detection_mobilenet0.25_Final.pth"
    if not detector.exists():
        skip("the RetinaFace MobileNet detector is not in the shared assets")
    if not NGINX.exists():
        skip(f"nginx not installed ({NGINX}; apt-get install nginx-light)")
    # One model thread each: two replicas, nginx and the clients share two cores.
    env = {
        **E2E_ENV,
        "OSDFACE_JOBS_DIR": str(tmp_path / "jobs"),  # one folder: the SQLite store they share
        "OSDFACE_TORCH_THREADS": "1",
        "OSDFACE_JOB_WINDOW_FRAMES": "8",
        "OSDFACE_JOB_SEGMENT_FRAMES": "16",
    }
    pair = [Replica(name, tiny_weights_dir, tmp_path, env) for name in ("a", "b")]
    try:
        with ThreadPoolExecutor(len(pair)) as pool:
            list(pool.map(Replica.start, pair))
        yield pair
    finally:
        for replica in pair:
            replica.stop()


def restart(replica: Replica) -> tuple[float, float]:
    """Stop `replica` (SIGTERM), start it again and wait until nginx sends it requests again;
    (when it was signalled, when it answered through nginx again)."""
    signalled = time.monotonic()
    replica.stop()
    replica.start()
    # nginx may still skip it for fail_timeout after the refused connections of its restart.
    wait_until(lambda: replica.restored() > 0, 60, f"nginx to send work to {replica.name}")
    return signalled, time.monotonic()


def submit_job(base: str, clip: Path) -> str:
    """A video job through nginx, with the Idempotency-Key that lets nginx retry its POST."""
    files = {"video": (clip.name, clip.read_bytes(), "video/mp4")}
    answer = httpx.post(
        f"{base}/v1/jobs", files=files, headers={"Idempotency-Key": "rolling-1"}, timeout=60
    )
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


def job_state(base: str, job_id: str) -> str:
    return str(httpx.get(f"{base}/v1/jobs/{job_id}", timeout=30).json()["state"])


def test_rolling_restart_under_load(replicas: list[Replica], assets: Path, tmp_path: Path) -> None:
    image = aligned_crop(assets)
    clip = tmp_path / "long.mp4"  # runs through both restarts: handed back, resumed
    write_clip(clip, gradient_frames(JOB_FRAMES), fps=25)
    with running_nginx([r.port for r in replicas]) as lb:
        job_id = submit_job(lb.base, clip)
        load = LoadLoop("restore", restore_request(lb.base, image), CLIENTS, PAUSE_S)
        polls = LoadLoop(
            "poll", lambda c: c.get(f"{lb.base}/v1/jobs/{job_id}"), clients=1, pause_s=0.5
        )
        with load, polls:
            wait_until(lambda: load.count(200) >= 5, 60, "restores through nginx")
            windows = [restart(replica) for replica in replicas]
            ended = load.count(200)
            wait_until(lambda: load.count(200) >= ended + 5, 60, "restores after the restarts")
            done = wait_until(
                lambda: job_state(lb.base, job_id) in ("succeeded", "failed") or None,
                240,
                "the job to end",
            )
        final = httpx.get(f"{lb.base}/v1/jobs/{job_id}", timeout=30).json()
        # nginx lists every upstream it tried: "a:1, b:2" for a request sent on to the other.
        retried = [line for line in lb.access_log() if ", " in line.partition("upstreams=")[2]]
        errors = [e for e in lb.error_log().splitlines() if "temporary file" not in e]
        logs = "\n".join(lb.access_log()[-20:] + errors[-20:])

    assert done and final["state"] == "succeeded", final
    assert final["progress"]["frames_done"] == JOB_FRAMES
    handed = [p for p in replicas[0].logs.glob("*.log") if "handed back" in p.read_text()]
    assert handed, "the job ran while a replica stopped: it was handed back"
    poll_statuses = Counter(o.status for o in polls.outcomes)
    assert set(poll_statuses) == {200}, f"job polls: {poll_statuses}\n{logs}"
    statuses = Counter(o.status for o in load.outcomes)
    assert load.failures() == [], f"5xx or connection errors: {statuses}\n{logs}"
    assert set(statuses) == {200}, statuses
    for (signalled, back), replica in zip(windows, replicas, strict=True):
        served = load.count(200, signalled, back)
        assert served >= 3, f"too few restores while {replica.name} restarted: {served}"
    assert statuses[200] >= 30, statuses
    took = ", ".join(
        f"{r.name} {back - sent:.0f} s" for (sent, back), r in zip(windows, replicas, strict=True)
    )
    print(f"restores: {statuses[200]}, sent on by nginx: {len(retried)}; restarts: {took}")
