"""Video jobs shared by real `osdface serve` replicas: any replica answers for any job, a killed
replica's job is taken over from its last finished segment, a cancel reaches the replica that
runs the job, a restart keeps queued, interrupted and finished jobs, SIGTERM hands the job back.

Real processes only: `redis-server` (Debian's package) on a loopback port, replicas started as
users start them (tests/live_server.py), tiny weights on the CPU, one jobs folder they share.
The clip is long in frames but cheap per frame (a moving gradient, no face), so a job runs a few
seconds and is cut in the middle of it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import av
import httpx
import pytest

from osdface.client.models import Job as ClientJob
from service.jobstore import JobRecord, open_store
from tests.live_server import E2E_ENV, LiveServer, free_port, running_server, skip, wait_until
from tests.redis_helpers import redis_server
from tests.video_helpers import gradient_frames, write_clip

FPS = 25
FRAMES = 80
SEGMENT_FRAMES = 16
LEASE_S = 2


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replica-clips") / "long.mp4"
    write_clip(path, gradient_frames(FRAMES), fps=FPS)
    return path


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replica-short") / "short.mp4"
    write_clip(path, gradient_frames(16), fps=FPS)
    return path


@pytest.fixture(scope="module")
def weights(tiny_weights_dir: Path) -> Path:
    if not (tiny_weights_dir / "facexlib" / "detection_mobilenet0.25_Final.pth").exists():
        skip("the RetinaFace MobileNet detector is not in the shared assets")
    return tiny_weights_dir


def replica_env(jobs_dir: Path, redis_url: str | None = None) -> dict[str, str]:
    env = {
        **E2E_ENV,
        "OSDFACE_JOBS_DIR": str(jobs_dir),
        "OSDFACE_JOB_LEASE_S": str(LEASE_S),
        "OSDFACE_JOB_SEGMENT_FRAMES": str(SEGMENT_FRAMES),
        "OSDFACE_JOB_WINDOW_FRAMES": "8",
        "OSDFACE_SHUTDOWN_GRACE_S": "20",
        "OSDFACE_LOG_FORMAT": "text",
    }
    if redis_url:
        env["OSDFACE_JOBS_REDIS_URL"] = redis_url
    return env


def submit(base: str, path: Path, key: str | None = None, **fields: str) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    files = {"video": (path.name, path.read_bytes(), "video/mp4")}
    return httpx.post(f"{base}/v1/jobs", files=files, data=fields, headers=headers, timeout=60)


def view(base: str, job_id: str) -> dict:
    answer = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def wait_view(base: str, job_id: str, ok, what: str, timeout: float = 120) -> dict:
    def check():
        seen = view(base, job_id)
        return seen if ok(seen) else None

    return wait_until(check, timeout, what, 0.05)


def finished(base: str, job_id: str, timeout: float = 180) -> dict:
    return wait_view(
        base, job_id, lambda v: v["state"] in ("succeeded", "failed", "cancelled"), "the end"
    )


def runner_pid(store, job_id: str) -> int:
    """The process that holds the job's lease (owner ids are host-pid-random)."""
    record: JobRecord | None = wait_until(
        lambda: (r := store.get(job_id)) is not None and r.owner and r, 60, "an owner", 0.02
    )
    assert record is not None and record.owner is not None
    return int(record.owner.rsplit("-", 2)[-2])


def video_frames_and_audio(data: bytes, folder: Path) -> tuple[int, bool]:
    path = folder / f"result-{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        has_audio = bool(container.streams.audio)
        frames = sum(1 for _ in container.decode(video=0))
    return frames, has_audio


@contextmanager
def replicas(
    weights: Path, folder: Path, env: dict[str, str], count: int
) -> Iterator[list[LiveServer]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(running_server(weights, folder / f"replica-{i}.log", env))
            for i in range(count)
        ]


def by_pid(servers: list[LiveServer], pid: int) -> tuple[LiveServer, LiveServer]:
    """(the replica with that pid, the other one)."""
    first, second = servers
    return (first, second) if first.process.pid == pid else (second, first)


def test_replicas_share_jobs_take_over_a_killed_one_and_cancel_across(
    weights: Path, clip: Path, short_clip: Path, tmp_path: Path
) -> None:
    jobs_dir = tmp_path / "jobs"
    with (
        redis_server(tmp_path, free_port()) as url,
        replicas(weights, tmp_path, replica_env(jobs_dir, url), 2) as servers,
        open_store(jobs_dir, url) as store,
    ):
        a, b = servers
        # Submitted to A, seen on B; the same key and upload again (on B) is the same job.
        first = submit(a.base, clip, key="clip-1")
        assert first.status_code == 202, first.text
        job_id = first.json()["id"]
        again = submit(b.base, clip, key="clip-1")
        assert again.status_code == 200 and again.json()["id"] == job_id, again.text
        other = submit(b.base, short_clip, key="clip-1")
        assert other.status_code == 422, other.text
        assert other.json()["error"]["type"] == "idempotency_key_reused"
        assert view(b.base, job_id)["id"] == job_id

        # Kill the replica that runs it once a segment is done and the next one started.
        running, survivor = by_pid(servers, runner_pid(store, job_id))
        wait_view(
            survivor.base,
            job_id,
            lambda v: (
                v["progress"]["segments_done"] >= 1
                and v["progress"]["frames_done"] > SEGMENT_FRAMES
            ),
            "a finished segment",
        )
        running.process.send_signal(signal.SIGKILL)
        running.process.wait(timeout=10)
        cut_at = view(survivor.base, job_id)
        assert cut_at["state"] == "running", cut_at
        done = finished(survivor.base, job_id)
        assert done["state"] == "succeeded", done
        assert done["takeovers"] == 1 and done["segments_redone"] <= 1, done
        parsed = ClientJob.from_json(done)  # what osdface.client callers read
        assert (parsed.takeovers, parsed.segments_redone) == (1, done["segments_redone"])
        assert parsed.progress.segments_done == parsed.progress.segments_total == 5
        assert done["progress"]["frames_done"] == FRAMES
        result = httpx.get(f"{survivor.base}{done['result']}", timeout=60)
        assert result.status_code == 200
        assert video_frames_and_audio(result.content, tmp_path) == (FRAMES, True)
        assert "resumed at segment" in survivor.log_text()

        # A restarted replica; a cancel sent to the one that does not run the job stops it.
        with running_server(weights, tmp_path / "restarted.log", replica_env(jobs_dir, url)) as c:
            pair = [survivor, c]
            second = submit(c.base, clip).json()["id"]
            runs, idle = by_pid(pair, runner_pid(store, second))
            wait_view(idle.base, second, lambda v: v["progress"]["frames_done"] > 0, "progress")
            gone = httpx.delete(f"{idle.base}/v1/jobs/{second}", timeout=10)
            assert gone.status_code == 200 and gone.json()["state"] == "cancelled"
            wait_until(lambda: not (jobs_dir / second).exists(), 30, "files removed", 0.1)
            assert f"job {second} deleted while running; stopped" in runs.log_text()
            for server in pair:
                missing = httpx.get(f"{server.base}/v1/jobs/{second}", timeout=10)
                assert missing.status_code == 404
            # The one that ran it is free again: the next job runs to the end.
            third = submit(runs.base, short_clip).json()["id"]
            assert finished(idle.base, third)["state"] == "succeeded"
            assert httpx.delete(f"{runs.base}/v1/jobs/{job_id}", timeout=10).status_code == 200
            assert httpx.get(f"{idle.base}/v1/jobs/{job_id}", timeout=10).status_code == 404


def test_embedded_store_keeps_jobs_across_a_kill_and_hands_back_on_sigterm(
    weights: Path, clip: Path, short_clip: Path, tmp_path: Path
) -> None:
    jobs_dir = tmp_path / "jobs"
    env = replica_env(jobs_dir)
    with running_server(weights, tmp_path / "one.log", env) as server:
        kept = submit(server.base, short_clip).json()["id"]
        assert finished(server.base, kept)["state"] == "succeeded"
        cut = submit(server.base, clip).json()["id"]
        queued = submit(server.base, short_clip).json()["id"]
        wait_view(server.base, cut, lambda v: v["progress"]["segments_done"] >= 1, "a segment")
        assert view(server.base, queued)["state"] == "queued"
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)

    with running_server(weights, tmp_path / "two.log", env) as server:
        fetched = httpx.get(f"{server.base}/v1/jobs/{kept}/result", timeout=30)
        assert fetched.status_code == 200, "a finished job is still there after a restart"
        done = finished(server.base, cut)
        assert done["state"] == "succeeded" and done["segments_redone"] <= 1, done
        assert done["progress"]["frames_done"] == FRAMES
        assert finished(server.base, queued)["state"] == "succeeded"

        # SIGTERM in the middle of a job: the segment running ends, the job goes back queued.
        handed = submit(server.base, clip).json()["id"]
        wait_view(server.base, handed, lambda v: v["progress"]["frames_done"] > 0, "progress")
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises it
        assert re.search(rf"job {handed} handed back after \d+ segments", server.log_text())
    with open_store(jobs_dir) as store:
        record = store.get(handed)
        assert record is not None and record.state == "queued" and record.owner is None
        assert record.segments_redone == 0

    with running_server(weights, tmp_path / "three.log", env) as server:
        done = finished(server.base, handed)
        assert done["state"] == "succeeded" and done["segments_redone"] == 0, done
        assert done["progress"]["frames_done"] == FRAMES
