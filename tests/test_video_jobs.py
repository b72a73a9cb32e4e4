"""Video jobs over HTTP: submit, poll, result, cancel, limits, retention, 4xx on bad input;
the low-priority lane of the model worker; a real `osdface serve` answering a photo while a
video job runs.

Most clips have no face (the job path runs in full, the model is not needed) so they are fast;
one clip has the two real faces of a photo and goes through the tiny restorer.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from model.media.faces.detect import FaceDetector
from service.app import create_app
from service.batching import Batcher
from service.settings import Settings
from tests.live_server import running_server, wait_until
from tests.video_helpers import clip_facts, decoded_frames, photo_frame, write_clip

FACE_FRAMES = 3


@pytest.fixture(scope="module")
def detector(tiny_weights_dir: Path) -> FaceDetector:
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25", torch.device("cpu"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("job-clips")
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(400)]
    paths = {
        "faces": folder / "faces.mp4",
        "short": folder / "short.mp4",
        "long": folder / "long.mp4",
        "ffv1": folder / "lossless.mkv",
    }
    write_clip(paths["faces"], [photo_frame(assets)] * FACE_FRAMES, fps=10)
    write_clip(paths["short"], noise[:20], fps=25)
    write_clip(paths["long"], noise, fps=25)
    write_clip(paths["ffv1"], noise[:3], audio=False, codec="ffv1")
    # Matroska keeps its index in front: a cut file opens, and only decoding finds the cut.
    whole = folder / "whole.mkv"
    write_clip(whole, noise[:50], fps=25)
    paths["truncated"] = folder / "truncated.mkv"
    paths["truncated"].write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    return paths


def settings_for(weights: Path, jobs_dir: Path, **overrides) -> Settings:
    base = dict(
        weights_dir=weights,
        detector="retinaface_mobile0.25",
        device="cpu",
        warmup=False,
        cpu_workers=1,
        max_batch_delay_ms=5.0,
        jobs_dir=jobs_dir,
        job_window_frames=4,
    )
    return Settings(**{**base, **overrides})


@contextmanager
def serving(settings: Settings, restorer, detector) -> Iterator[TestClient]:
    with TestClient(create_app(settings, restorer=restorer, detector=detector)) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, 60, "ready", 0.05)
        yield client


@pytest.fixture
def client(tmp_path, tiny_weights_dir, tiny_restorer, detector) -> Iterator[TestClient]:
    with serving(settings_for(tiny_weights_dir, tmp_path / "jobs"), tiny_restorer, detector) as c:
        yield c


def submit(client, path: Path, name: str | None = None, **fields: str) -> httpx.Response:
    files = {"video": (name or path.name, path.read_bytes(), "video/mp4")}
    return client.post("/v1/jobs", files=files, data=fields)


def wait_state(client, job_id: str, states: tuple[str, ...], timeout: float = 120) -> dict:
    def done():
        view = client.get(f"/v1/jobs/{job_id}").json()
        return view if view.get("state") in states else None

    return wait_until(done, timeout, f"job {job_id} in {states}", 0.05)


def job_folders(jobs_dir: Path) -> list[str]:
    """The job folders (32 hex digits) in the jobs folder, beside the job store's database."""
    return [p.name for p in jobs_dir.iterdir() if re.fullmatch(r"[0-9a-f]{32}", p.name)]


def error_of(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["message"]
    return body["error"]["type"]


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_submit_poll_and_fetch_a_restored_video(client, clips, tmp_path) -> None:
    answer = submit(client, clips["faces"], start="0")
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running")
    view = wait_state(client, job["id"], ("succeeded", "failed"))
    assert view["state"] == "succeeded", view["error"]
    assert view["progress"]["frames_done"] == FACE_FRAMES and view["faces"] == 2 * FACE_FRAMES
    result = client.get(view["result"])
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    out = tmp_path / "result.mp4"
    out.write_bytes(result.content)
    src, dst = clip_facts(clips["faces"]), clip_facts(out)
    assert (dst.frames, dst.rate, dst.width, dst.height) == (FACE_FRAMES, src.rate, 256, 170)
    assert dst.audio_packets == src.audio_packets
    changed = np.abs(decoded_frames(out)[0].astype(int) - decoded_frames(clips["faces"])[0])
    assert changed.mean() > 2, "faces were restored"
    text = client.get("/metrics").text
    assert metric(text, "osdface_jobs", state="succeeded") == 1
    assert metric(text, "osdface_video_frames_total") == FACE_FRAMES
    assert metric(text, "osdface_jobs_finished_total", state="succeeded") == 1


def test_cancel_a_running_and_a_queued_job(client, clips, tmp_path) -> None:
    running = submit(client, clips["long"]).json()["id"]
    queued = submit(client, clips["short"]).json()["id"]
    wait_until(
        lambda: client.get(f"/v1/jobs/{running}").json()["progress"]["frames_done"] > 0,
        60,
        "progress",
        0.05,
    )
    assert client.get(f"/v1/jobs/{queued}").json()["state"] == "queued"
    assert error_of(client.get(f"/v1/jobs/{running}/result"), 409) == "job_not_done"
    for job_id in (queued, running):
        gone = client.delete(f"/v1/jobs/{job_id}")
        assert gone.status_code == 200 and gone.json()["state"] == "cancelled"
        assert error_of(client.get(f"/v1/jobs/{job_id}"), 404) == "not_found"
    jobs_dir = tmp_path / "jobs"
    wait_until(lambda: not job_folders(jobs_dir), 30, "job folders removed", 0.05)
    text = client.get("/metrics").text
    assert metric(text, "osdface_jobs_finished_total", state="cancelled") == 2
    assert metric(text, "osdface_jobs", state="running") == 0


def test_limits_on_jobs_bytes_and_frames(
    tmp_path, tiny_weights_dir, tiny_restorer, detector, clips
) -> None:
    settings = settings_for(
        tiny_weights_dir,
        tmp_path / "jobs",
        max_jobs=1,
        max_job_bytes=clips["long"].stat().st_size - 1,
        max_job_frames=10,
    )
    with serving(settings, tiny_restorer, detector) as c:
        assert error_of(submit(c, clips["long"]), 413) == "too_large"  # bytes
        frames = submit(c, clips["short"])  # 20 frames
        assert error_of(frames, 413) == "too_large" and "20 frames" in frames.text
        accepted = submit(c, clips["short"], duration="0.2")  # 5 frames
        assert accepted.status_code == 202
        full = submit(c, clips["short"])
        assert error_of(full, 429) == "too_many_jobs" and int(full.headers["retry-after"]) >= 1
    kept = job_folders(tmp_path / "jobs")
    assert kept == [accepted.json()["id"]], "refused uploads leave no file"


def test_bad_input_is_a_4xx_naming_the_upload_never_a_server_path(client, clips) -> None:
    garbage = clips["short"].with_name("garbage.mp4")
    garbage.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))
    cases = [
        (submit(client, garbage), 400, "invalid_video"),
        (submit(client, clips["ffv1"]), 415, "unsupported_format"),
        (submit(client, clips["short"], name="clip.txt"), 415, "unsupported_media_type"),
        (submit(client, clips["short"], crf="high"), 422, "invalid_parameter"),
        (submit(client, clips["short"], speed="2"), 422, "invalid_parameter"),
        (client.post("/v1/jobs", data={"crf": "10"}), 415, "unsupported_media_type"),
        (client.post("/v1/jobs", files={"other": ("a.mp4", b"x")}), 422, "invalid_parameter"),
        (client.get("/v1/jobs/0123"), 404, "not_found"),
        (
            client.post(
                "/v1/jobs",
                files={"video": ("a.mp4", clips["short"].read_bytes())},
                headers={"Idempotency-Key": "two words"},
            ),
            422,
            "invalid_parameter",
        ),
        (client.delete("/v1/jobs/" + "0" * 32), 404, "not_found"),
    ]
    for response, status, kind in cases:
        assert error_of(response, status) == kind, response.text
        assert "/jobs/" not in response.json()["error"]["message"]
    assert "garbage.mp4" in cases[0][0].json()["error"]["message"]
    failed = submit(client, clips["truncated"])
    assert failed.status_code == 202  # only decoding finds a cut stream
    view = wait_state(client, failed.json()["id"], ("succeeded", "failed"))
    assert view["state"] == "failed" and view["error"]["type"] == "invalid_video"
    assert "truncated.mkv" in view["error"]["message"]
    assert str(client.app.state.jobs.root) not in view["error"]["message"]


def test_finished_jobs_and_files_expire(
    tmp_path, tiny_weights_dir, tiny_restorer, detector, clips
) -> None:
    settings = settings_for(tiny_weights_dir, tmp_path / "jobs", job_retention_s=1.0)
    with serving(settings, tiny_restorer, detector) as c:
        job_id = submit(c, clips["short"]).json()["id"]
        assert wait_state(c, job_id, ("succeeded", "failed"))["state"] == "succeeded"
        assert (tmp_path / "jobs" / job_id).is_dir()
        wait_until(lambda: c.get(f"/v1/jobs/{job_id}").status_code == 404, 30, "expiry", 0.1)
        assert not (tmp_path / "jobs" / job_id).exists()


def test_low_priority_work_yields_to_normal_work() -> None:
    """A batch is filled with normal items first, whatever waited longer in the low lane."""
    release, batches = threading.Event(), []

    def fn(batch: torch.Tensor):
        batches.append(batch[:, 0].tolist())
        release.wait(10)
        return batch, {}

    batcher = Batcher(fn, max_batch=4, max_delay_s=0.0, max_queue=8)
    batcher.start()

    async def main() -> None:
        low = asyncio.ensure_future(batcher.submit(torch.zeros(10, 1), low_priority=True))
        while not batches:  # the worker runs the first low batch and blocks in it
            await asyncio.sleep(0.01)
        high = asyncio.ensure_future(batcher.submit(torch.ones(2, 1)))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(low, high)

    asyncio.run(main())
    batcher.stop(5)
    assert batches[0] == [0.0] * 4
    assert batches[1] == [1.0, 1.0, 0.0, 0.0], "the normal items go first"
    assert sorted(x for batch in batches for x in batch) == [0.0] * 10 + [1.0] * 2


def test_live_server_answers_a_photo_while_a_video_job_runs(
    tiny_weights_dir, tmp_path, assets, clips
) -> None:
    from tests.service_helpers import aligned_crop

    long_faces = tmp_path / "faces-long.mp4"
    write_clip(long_faces, [photo_frame(assets)] * 40, fps=10)
    env = {
        "OSDFACE_CPU_WORKERS": "1",
        "OSDFACE_SHUTDOWN_GRACE_S": "5",
        "OSDFACE_MAX_BATCH_FACES": "2",
        "OSDFACE_JOB_WINDOW_FRAMES": "1",
        "OSDFACE_JOBS_DIR": str(tmp_path / "jobs"),
        "OMP_NUM_THREADS": "1",
    }
    with running_server(tiny_weights_dir, tmp_path / "serve.log", env) as server:
        http = httpx.Client(base_url=server.base, timeout=120)
        job = submit(http, long_faces).json()["id"]
        wait_until(
            lambda: http.get(f"/v1/jobs/{job}").json()["progress"]["frames_done"] >= 1,
            180,
            "the video job to make progress",
            0.2,
        )
        started = time.monotonic()
        photo = http.post(
            "/restore", files={"image": ("a.jpg", aligned_crop(assets))}, data={"aligned": "1"}
        )
        photo_s = time.monotonic() - started
        view = http.get(f"/v1/jobs/{job}").json()
        assert photo.status_code == 200 and photo.headers["content-type"] == "image/jpeg"
        assert view["state"] == "running", "the photo was answered while the video job ran"
        assert view["progress"]["frames_done"] < 40
        assert http.delete(f"/v1/jobs/{job}").json()["state"] == "cancelled"
        print(f"photo answered in {photo_s:.1f} s during a video job")


def test_folders_left_by_an_earlier_process_are_removed_once_expired(tmp_path: Path) -> None:
    import os

    from prometheus_client import CollectorRegistry

    from service.jobs import JobManager

    root = tmp_path / "jobs"
    old, fresh, other = root / ("a" * 32), root / ("b" * 32), root / "keep-me"
    for folder in (old, fresh, other):
        folder.mkdir(parents=True)
        (folder / "input.mp4").write_bytes(b"x")
    past = time.time() - 7200
    os.utime(old, (past, past))
    os.utime(other, (past, past))
    settings = Settings(jobs_dir=root, job_retention_s=3600)
    jobs = JobManager(settings, CollectorRegistry())
    jobs.open()
    jobs.remove_stale_folders()
    jobs.store.close()
    kept = sorted(p.name for p in root.iterdir() if not p.name.startswith("jobs.sqlite3"))
    assert kept == sorted([fresh.name, other.name])


def test_an_unreachable_job_store_is_a_503_naming_it_and_photos_go_on(
    tmp_path, tiny_weights_dir, tiny_restorer, detector, clips
) -> None:
    from tests.live_server import free_port

    url = f"redis://:secret-pw@127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = settings_for(tiny_weights_dir, tmp_path / "jobs", jobs_redis_url=url)
    with serving(settings, tiny_restorer, detector) as c:
        for answer in (submit(c, clips["short"]), c.get("/v1/jobs/" + "0" * 32)):
            assert error_of(answer, 503) == "job_store_unavailable"
            assert int(answer.headers["retry-after"]) >= 1
            message = answer.json()["error"]["message"]
            assert "127.0.0.1" in message and "secret-pw" not in message
        assert c.get("/readyz").status_code == 200  # photos do not need the job store
    assert job_folders(tmp_path / "jobs") == [], "a refused upload leaves no folder"
