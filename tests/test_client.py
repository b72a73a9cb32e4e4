"""osdface.client against a real `osdface serve` (tiny weights, CPU, loopback): photos both ways,
typed errors with the service's words, the API key from each source, 429s retried, video jobs.

One server for the module: an API key, one request in flight (so concurrent calls meet real
429s) and a jobs folder.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import get_args

import pytest
from PIL import Image

from osdface.client import (
    AsyncClient,
    AuthError,
    BusyError,
    Client,
    ConfigError,
    InputError,
    JobOptions,
    NotFoundError,
    RestoreOptions,
    RetryPolicy,
)
from osdface.client.models import Background, OutputFormat
from tests.live_server import LiveServer, running_server, skip
from tests.service_helpers import aligned_crop, metric

KEY = "client-test-key-3141"
PHOTO = "images/gfpgan/whole_imgs/Blake_Lively.jpg"


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, assets: Path, tmp_path_factory) -> LiveServer:
    if not (tiny_weights_dir / "facexlib" / "detection_mobilenet0.25_Final.pth").exists():
        skip("the RetinaFace MobileNet detector is not in the shared assets")
    root = tmp_path_factory.mktemp("client-server")
    env = {
        "OSDFACE_API_KEY": KEY,
        "OSDFACE_CPU_WORKERS": "1",
        "OSDFACE_MAX_INFLIGHT_REQUESTS": "1",
        "OSDFACE_SHUTDOWN_GRACE_S": "5",
        "OSDFACE_JOBS_DIR": str(root / "jobs"),
        "OSDFACE_JOB_WINDOW_FRAMES": "2",
        "OMP_NUM_THREADS": "1",
    }
    with running_server(tiny_weights_dir, root / "serve.log", env) as live:
        yield live


@pytest.fixture
def client(server: LiveServer) -> Client:
    with Client(server.base, api_key=KEY, deadline_s=120, env={}) as c:
        yield c


def test_the_client_imports_nothing_of_the_server() -> None:
    code = (
        "import sys, osdface.client\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'service', 'fastapi', 'starlette', 'uvicorn', 'torch', 'train'})\n"
        "print(','.join(bad))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def test_options_mirror_the_service_form() -> None:
    from model.config import BACKGROUNDS
    from service.job_upload import FIELDS
    from service.schemas import RestoreForm, form_properties

    assert [f.name for f in fields(RestoreOptions)] == list(RestoreForm.model_fields)
    assert set(get_args(Background)) == set(BACKGROUNDS)
    assert set(get_args(OutputFormat)) == set(form_properties()["output_format"]["enum"])
    assert set(JobOptions(1, 2, 3, 0.5, 4).form()) == set(FIELDS)
    form = RestoreOptions(aligned=True, strength=0.5, faces=(0, 2)).form()
    assert form == {"aligned": "true", "strength": "0.5", "faces": "0,2"}
    assert RestoreForm.model_validate(form).faces == (0, 2)


def test_a_photo_comes_back_with_what_the_headers_say(
    client: Client, assets: Path, tmp_path: Path
) -> None:
    photo = assets / PHOTO
    result = client.restore(photo)
    with Image.open(io.BytesIO(result.image)) as out, Image.open(photo) as original:
        assert out.size == original.size and out.format == "JPEG"
    assert result.content_type == "image/jpeg" and result.output_format == "jpeg"
    assert result.faces_detected == 2 and result.faces_restored == 2
    assert result.timings.total_s is not None and result.timings.total_s > 0
    assert result.timings.inference_s is not None and result.timings.background_s == 0.0
    assert result.request_id and result.metadata_dropped == () and result.retried == ()
    saved = result.save(tmp_path / "out" / "restored.jpg")
    assert saved.read_bytes() == result.image and not list(saved.parent.glob(".*partial"))


def test_an_aligned_crop_with_options_and_the_json_answer(client: Client, assets: Path) -> None:
    crop = aligned_crop(assets)
    options = RestoreOptions(aligned=True, strength=0.5, output_format="png", upscale=2)
    image = client.restore(crop, options, filename="crop.jpg")
    assert image.content_type == "image/png" and image.output_format == "png"
    with Image.open(io.BytesIO(image.image)) as out:
        assert out.size == (1024, 1024)
    as_json = client.restore_json(crop, options)
    assert as_json.width == 1024 and as_json.height == 1024
    assert as_json.content_type == "image/png" and as_json.image.startswith(b"\x89PNG")
    assert as_json.faces_detected == 1 and len(as_json.faces) == 1
    assert {"vre", "unet", "encode"} <= set(as_json.timings.stages)
    assert as_json.request_id and as_json.request_id != image.request_id


def test_refused_input_is_a_typed_error_with_the_services_words(
    client: Client, server: LiveServer
) -> None:
    before = metric(server.metrics(), "osdface_errors_total", type="unsupported_format")
    with pytest.raises(InputError) as refused:
        client.restore(b"plain text, no picture", filename="notes.txt")
    error = refused.value
    assert error.status == 415 and error.type == "unsupported_format"
    assert error.request_id and error.request_id in str(error)
    after = metric(server.metrics(), "osdface_errors_total", type="unsupported_format")
    assert after == before + 1, "a refused input is never retried"
    with pytest.raises(InputError) as bad_field:
        client.restore(b"\xff\xd8", RestoreOptions(strength=2.0))
    assert bad_field.value.status == 422 and "strength" in bad_field.value.message
    with pytest.raises(NotFoundError):
        client.job("no-such-job")


def test_the_api_key_from_each_source(server: LiveServer, assets: Path, tmp_path: Path) -> None:
    crop, aligned = aligned_crop(assets), RestoreOptions(aligned=True)
    with Client(server.base, env={}) as anonymous, pytest.raises(AuthError) as refused:
        anonymous.restore(crop, aligned)
    assert refused.value.status == 401 and refused.value.type == "unauthorized"
    key_file = tmp_path / "key"
    key_file.write_text(f"{KEY}\n")
    sources = [
        {"api_key_file": key_file, "env": {}},
        {"env": {"OSDFACE_API_KEY": KEY}},
        {"env": {"OSDFACE_API_KEY_FILE": str(key_file)}},
        {"api_key": KEY, "env": {"OSDFACE_API_KEY": "wrong"}},  # the argument wins
    ]
    for given in sources:
        with Client(server.base, **given) as c:  # type: ignore[arg-type]
            assert c.restore(crop, aligned).faces_detected == 1, given
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        Client(server.base, api_key_file=tmp_path / "empty")
    with pytest.raises(ConfigError, match="not both"):
        Client(server.base, api_key=KEY, api_key_file=key_file)


def test_ready_and_info(client: Client) -> None:
    assert client.ready() is True
    client.wait_ready(timeout_s=5)
    info = client.info()
    assert info["batching"]["max_inflight_requests"] == 1
    assert "max_upload_bytes" in info["limits"]


def test_concurrent_calls_meet_429s_and_retry_them(server: LiveServer, assets: Path) -> None:
    """One request in flight on the server: concurrent calls are refused with 429 and a
    Retry-After, which the client waits out; without retries the 429 is raised, typed."""
    crop, aligned = aligned_crop(assets), RestoreOptions(aligned=True)

    async def burst(retry: RetryPolicy, count: int) -> list:
        async with AsyncClient(server.base, api_key=KEY, retry=retry, deadline_s=180, env={}) as c:
            calls = [c.restore(crop, aligned) for _ in range(count)]
            return await asyncio.gather(*calls, return_exceptions=True)

    patient = RetryPolicy(attempts=40, max_retry_after_s=2.0)
    results = asyncio.run(burst(patient, 4))
    assert all(not isinstance(r, BaseException) for r in results), results
    reasons = [reason for r in results for reason in r.retried]
    assert reasons and set(reasons) == {"429 too_many_requests"}, reasons
    assert all(r.faces_detected == 1 for r in results)

    answers = asyncio.run(burst(RetryPolicy.never(), 3))
    busy = [a for a in answers if isinstance(a, BusyError)]
    assert busy and len(busy) < 3, answers
    assert busy[0].status == 429 and busy[0].retry_after_s == 1.0
    assert busy[0].type == "too_many_requests"


def test_a_video_job_submitted_followed_and_downloaded(
    client: Client, assets: Path, tmp_path: Path
) -> None:
    from tests.video_helpers import clip_facts, photo_frame, write_clip

    clip = tmp_path / "clip.mp4"
    write_clip(clip, [photo_frame(assets)] * 6, fps=10)
    seen: list[int] = []
    target = tmp_path / "out" / "clip-restored.mp4"
    job = client.restore_video(
        clip,
        target,
        JobOptions(crf=30),
        on_progress=lambda j: seen.append(j.progress.frames_done),
        poll_s=0.2,
        timeout_s=300,
    )
    assert job.state == "succeeded" and job.faces > 0 and job.result
    assert job.progress.segments_total == job.progress.segments_done == 1
    assert job.takeovers == job.segments_redone == 0
    assert seen[-1] == 6 and seen == sorted(seen)
    facts = clip_facts(target)
    assert facts.frames == 6 and facts.audio_packets
    assert not list(target.parent.glob(".*partial"))
    with pytest.raises(NotFoundError):
        client.job(job.id)  # restore_video deletes the job once downloaded


def test_the_async_client_does_the_same(server: LiveServer, assets: Path, tmp_path: Path) -> None:
    from tests.video_helpers import clip_facts, photo_frame, write_clip

    clip = tmp_path / "clip.mp4"
    write_clip(clip, [photo_frame(assets)] * 4, fps=10, audio=False)
    seen: list[str] = []

    async def progress(job) -> None:  # an async callback is awaited
        await asyncio.sleep(0)
        seen.append(job.state)

    async def run() -> tuple:
        async with AsyncClient(server.base, api_key=KEY, deadline_s=120, env={}) as c:
            await c.wait_ready(timeout_s=5)
            info = await c.info()
            result = await c.restore_json(aligned_crop(assets), RestoreOptions(aligned=True))
            job = await c.restore_video(
                clip, tmp_path / "out.mp4", on_progress=progress, poll_s=0.2
            )
            return info, result, job

    info, result, job = asyncio.run(run())
    assert info["limits"]["max_faces"] >= 1
    assert result.faces_detected == 1 and len(result.faces) == 1 and result.width == 512
    assert job.state == "succeeded" and seen[-1] == "succeeded"
    assert clip_facts(tmp_path / "out.mp4").frames == 4


def test_without_httpx_the_import_says_how_to_install_it() -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "try:\n    import osdface.client\nexcept ModuleNotFoundError as e:\n    print(e)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "osdface.client needs httpx: pip install -e '.[client]'" in run.stdout, run.stderr
