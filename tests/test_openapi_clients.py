"""A client generated from the service's own `/openapi.json` works out of the box.

openapi-python-client (the dev extra; offline: it reads the schema from a file) generates a
package into a temporary folder; the test imports it and calls a real `osdface serve` on
loopback: the default `restore` call gives the image back as a file, `restore_json` the typed
JSON answer, an error the typed error body, and a video job goes from upload to result.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from PIL import Image

from tests.live_server import LiveServer, running_server, skip
from tests.service_helpers import aligned_crop

KEY = "generated-client-key"
PACKAGE = "osdface_generated_api"
PHOTO = "images/gfpgan/whole_imgs/Blake_Lively.jpg"


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, assets: Path, tmp_path_factory) -> Iterator[LiveServer]:
    if importlib.util.find_spec("openapi_python_client") is None:
        skip("openapi-python-client not installed (the dev extra)")
    if not (tiny_weights_dir / "facexlib" / "detection_mobilenet0.25_Final.pth").exists():
        skip("the RetinaFace MobileNet detector is not in the shared assets")
    root = tmp_path_factory.mktemp("generated-client-server")
    env = {
        "OSDFACE_API_KEY": KEY,
        "OSDFACE_CPU_WORKERS": "1",
        "OSDFACE_SHUTDOWN_GRACE_S": "5",
        "OSDFACE_JOBS_DIR": str(root / "jobs"),
        "OSDFACE_JOB_WINDOW_FRAMES": "2",
        "OMP_NUM_THREADS": "1",
    }
    with running_server(tiny_weights_dir, root / "serve.log", env) as live:
        yield live


@pytest.fixture(scope="module")
def api(server: LiveServer, tmp_path_factory) -> Iterator[ModuleType]:
    """The generated package, imported; its generator must have parsed every answer."""
    root = tmp_path_factory.mktemp("generated")
    spec = root / "openapi.json"
    spec.write_bytes(httpx.get(f"{server.base}/openapi.json", timeout=30).content)
    config = root / "config.yaml"
    config.write_text("post_hooks: []\n")  # no formatter run on the output: nothing to install
    command = [sys.executable, "-m", "openapi_python_client", "generate", "--path", str(spec)]
    command += ["--output-path", str(root / PACKAGE), "--meta", "none", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Warning" not in output and "WARNING" not in output, output
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def _module(api: ModuleType, name: str) -> ModuleType:
    return importlib.import_module(f"{api.__name__}.{name}")


@pytest.fixture(scope="module")
def client(api: ModuleType, server: LiveServer):
    return api.AuthenticatedClient(base_url=server.base, token=KEY, timeout=httpx.Timeout(120))


def test_the_default_call_gives_the_image_back(api, client, assets: Path) -> None:
    restore = _module(api, "api.restore.restore")
    types, models = _module(api, "types"), _module(api, "models")
    photo = (assets / PHOTO).read_bytes()
    body = models.RestoreBody(image=types.File(payload=io.BytesIO(photo), file_name="p.jpg"))
    answer = restore.sync_detailed(client=client, body=body)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert isinstance(answer.parsed, types.File)
    with Image.open(answer.parsed.payload) as out, Image.open(assets / PHOTO) as original:
        assert out.size == original.size and out.format == "JPEG"
    assert answer.headers["x-faces-detected"] == "2"

    crop = aligned_crop(assets)
    chosen = models.RestoreBody(
        image=types.File(payload=io.BytesIO(crop), file_name="crop.jpg"),
        aligned=True,
        strength=0.5,
        output_format=models.RestoreBodyOutputFormat.PNG,
        faces="0",
    )
    image = restore.sync(client=client, body=chosen)
    assert isinstance(image, types.File)
    assert image.payload.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_json_operation_gives_the_typed_answer(api, client, assets: Path) -> None:
    restore_json = _module(api, "api.restore.restore_json")
    types, models = _module(api, "types"), _module(api, "models")
    crop = aligned_crop(assets)
    body = models.RestoreJsonBody(
        image=types.File(payload=io.BytesIO(crop), file_name="crop.jpg"), aligned=True
    )
    result = restore_json.sync(client=client, body=body)
    assert isinstance(result, models.RestoreResult), result
    assert result.faces_detected == 1 and len(result.faces) == 1
    assert (result.width, result.height) == (512, 512) and result.content_type == "image/jpeg"
    with Image.open(io.BytesIO(base64.b64decode(result.image))) as out:
        assert out.size == (512, 512)
    assert result.timings.total > 0 and "unet" in result.timings.stages.additional_properties

    refused = restore_json.sync(
        client=client,
        body=models.RestoreJsonBody(image=types.File(payload=io.BytesIO(b"text, no picture"))),
    )
    assert isinstance(refused, models.ErrorBody) and refused.error.type_ == "unsupported_format"


def test_a_video_job_from_upload_to_result(api, client, assets: Path, tmp_path: Path) -> None:
    from tests.video_helpers import clip_facts, photo_frame, write_clip

    submit, status = (
        _module(api, "api.video_jobs.submit_job"),
        _module(api, "api.video_jobs.job_status"),
    )
    result, delete = (
        _module(api, "api.video_jobs.job_result"),
        _module(api, "api.video_jobs.delete_job"),
    )
    types, models = _module(api, "types"), _module(api, "models")
    clip = tmp_path / "clip.mp4"
    write_clip(clip, [photo_frame(assets)] * 4, fps=10)
    with clip.open("rb") as f:
        body = models.SubmitJobBody(video=types.File(payload=f, file_name="clip.mp4"), crf=30)
        job = submit.sync(client=client, body=body)
    assert isinstance(job, models.JobView) and job.state in ("queued", "running"), job
    end = time.monotonic() + 300
    while (view := status.sync(job.id, client=client)).state not in ("succeeded", "failed"):
        assert time.monotonic() < end, view
        time.sleep(0.2)
    assert view.state == "succeeded" and view.progress.frames_done == 4, view
    video = result.sync(job.id, client=client)
    assert isinstance(video, types.File)
    out = tmp_path / "restored.mp4"
    out.write_bytes(video.payload.read())
    assert clip_facts(out).frames == 4
    assert delete.sync(job.id, client=client).id == job.id


def test_the_schema_declares_the_image_answer_binary_only(server: LiveServer) -> None:
    paths = httpx.get(f"{server.base}/openapi.json", timeout=30).json()["paths"]
    image = paths["/restore"]["post"]["responses"]["200"]["content"]
    assert "application/json" not in image and "application/octet-stream" in image
    assert all(c["schema"] == {"type": "string", "format": "binary"} for c in image.values())
    as_json = paths["/restore/json"]["post"]["responses"]["200"]["content"]
    assert list(as_json) == ["application/json"]
    assert as_json["application/json"]["schema"]["$ref"].endswith("/RestoreResult")
    form = paths["/restore"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert (
        form
        == paths["/restore/json"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    )
    assert form["properties"]["faces"]["type"] == "string"  # one field, "0,2"


def test_accept_still_chooses_the_answer_for_curl_users(server: LiveServer, assets: Path) -> None:
    crop = aligned_crop(assets)

    def post(accept: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", "Accept": accept}
        files, form = {"image": ("crop.jpg", crop)}, {"aligned": "true"}
        answer = httpx.post(
            f"{server.base}/restore", files=files, data=form, headers=headers, timeout=120
        )
        assert answer.status_code == 200, answer.text
        return answer

    assert post("application/json").json()["faces_detected"] == 1
    assert post("*/*").headers["content-type"] == "image/jpeg"
    generic = post("application/octet-stream")
    assert generic.headers["content-type"] == "application/octet-stream"
    assert generic.headers["x-output-format"] == "jpeg" and generic.content[:2] == b"\xff\xd8"
    assert post("image/*, application/octet-stream;q=0.5").headers["content-type"] == "image/jpeg"
