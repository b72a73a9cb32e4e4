"""The service's promises beyond restoring, in-process (ASGI app, tiny weights, real batcher):
files with broken metadata never cost a 5xx, one error table drives answers, metrics and the
OpenAPI schema, HEAD works, probes are not counted, settings refuse a broken environment,
and admission by time refuses what cannot finish before its deadline.
"""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from model.media.codecs.decode import decode_image
from model.media.codecs.formats import ImageLimits
from model.media.faces.detect import FaceDetector
from service.admission import SAFETY_FACTOR, BatchTimeEstimator
from service.app import create_app
from service.batching import Batcher
from service.errors import ErrorKind
from service.queue_items import BatcherClosedError, DeadlineUnreachableError
from service.settings import Settings, describe_settings_error, unknown_env_names
from service.state import Phase
from service.upload import MULTIPART_OVERHEAD
from tests.service_helpers import (
    BOUNDARY,
    assert_error_shape,
    exif_uploads,
    faceless_png,
    metric,
    multipart,
    png_claiming,
)
from tests.test_service_api import make_settings, serving, wait_ready

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def detector(tiny_weights_dir: Path, assets: Path) -> FaceDetector:
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25")


@pytest.fixture(scope="module")
def client(tiny_weights_dir, tiny_restorer, detector):
    with serving(make_settings(tiny_weights_dir), tiny_restorer, detector) as c:
        yield c


# --- files ---------------------------------------------------------------------------------------


def test_unusable_metadata_is_dropped_never_a_5xx(client: TestClient) -> None:
    limits = ImageLimits(10**7, 10**7, 10**7)
    for name, (data, fields) in exif_uploads().items():
        decoded = decode_image(data, limits)
        if name == "orientation_6_beside_mistyped_tag":  # 64 wide, 48 high, turned upright
            assert decoded.rgb.shape[:2] == (64, 48), "the readable orientation was not applied"
            assert decoded.dropped_metadata == ("exif",)
        response = client.post("/restore", files={"image": ("x.jpg", data)}, data=fields)
        assert response.status_code == 200, (name, response.text[:300])
        with Image.open(io.BytesIO(response.content)) as im:
            im.load()
        if name == "100kb_exif_to_jpeg":
            assert response.content[:3] == b"\xff\xd8\xff"
            assert response.headers["x-metadata-dropped"] == "exif"


# --- HTTP surface --------------------------------------------------------------------------------


def test_head_works_wherever_get_does(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v1/info", "/docs", "/"):
        got, head = client.get(path), client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and head.headers.get("x-request-id"), path
        assert head.headers["content-type"] == got.headers["content-type"], path


def test_wrong_method_names_the_allowed_ones_and_says_what_to_do(client: TestClient) -> None:
    for method in ("GET", "HEAD", "PUT"):
        r = client.request(method, "/restore")
        assert r.status_code == 405 and r.headers["allow"] == "POST", (method, r.headers)
        if method != "HEAD":
            assert_error_shape(r, 405, "method_not_allowed")
            assert "field 'image'" in r.json()["error"]["message"]
    jobs = client.get("/v1/jobs")
    assert_error_shape(jobs, 405, "method_not_allowed")
    assert jobs.headers["allow"] == "POST" and "'video'" in jobs.json()["error"]["message"]
    job = client.post("/v1/jobs/abc")
    assert_error_shape(job, 405, "method_not_allowed")
    assert job.headers["allow"] == "DELETE, GET, HEAD"
    health = client.post("/healthz")
    assert_error_shape(health, 405, "method_not_allowed")
    assert health.headers["allow"] == "GET, HEAD"
    assert health.json()["error"]["message"] == "/healthz takes only GET, HEAD"


@pytest.mark.parametrize("path", ["/restore", "/v1/jobs"])
@pytest.mark.parametrize("query", ["strength=2", "upscale=abc", "strength=1&crf=20", "aligned"])
def test_options_in_the_query_string_are_refused_not_ignored(
    client: TestClient, path: str, query: str
) -> None:
    field = "image" if path == "/restore" else "video"
    files = {field: ("face.mp4", faceless_png())}
    r = client.post(f"{path}?{query}", files=files)
    assert_error_shape(r, 422, "invalid_parameter")
    message = r.json()["error"]["message"]
    assert "multipart form" in message and "query string" in message
    for name in (part.split("=")[0] for part in query.split("&")):
        assert name in message, (name, message)


def test_too_large_uploads_name_the_configured_limit(
    tiny_weights_dir: Path, tiny_restorer, detector, tmp_path: Path
) -> None:
    settings = make_settings(
        tiny_weights_dir, max_upload_bytes=1024 * 1024, max_job_bytes=1024, jobs_dir=tmp_path
    )
    expected = "1 MiB (1048576 bytes), OSDFACE_MAX_UPLOAD_BYTES"
    with serving(settings, tiny_restorer, detector) as c:
        big = b"\xff\xd8\xff" + bytes(2 * 1024 * 1024)
        declared = c.post("/restore", files={"image": ("big.jpg", big)})  # Content-Length
        streamed = c.post(  # chunked: refused while reading, by the image part's size
            "/restore",
            content=iter([multipart([("image", big)])]),
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        for r in (declared, streamed):
            assert_error_shape(r, 413, "too_large")
            assert expected in r.json()["error"]["message"], r.json()
            assert str(1024 * 1024 + MULTIPART_OVERHEAD) not in r.json()["error"]["message"]
        video = c.post("/v1/jobs", files={"video": ("clip.mp4", bytes(200_000))})
        assert_error_shape(video, 413, "too_large")
        assert "(1024 bytes), OSDFACE_MAX_JOB_BYTES" in video.json()["error"]["message"]


@pytest.mark.parametrize("side", [10_000, 100_000])  # under and over Pillow's own guard
def test_a_pixel_bomb_is_refused_with_the_configured_limit(client: TestClient, side: int) -> None:
    r = client.post("/restore", files={"image": ("bomb.png", png_claiming(side, side))})
    assert_error_shape(r, 413, "image_too_large")
    message = r.json()["error"]["message"]
    assert "over the 40000000 limit" in message, message
    assert "decompression" not in message.lower() and "178956970" not in message


def test_docs_assets_are_local(client: TestClient) -> None:
    page = client.get("/docs").text
    assert "cdn" not in page.lower() and "https://" not in page
    for src in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert src.startswith("/"), src
        assert client.get(src).status_code == 200, src


def test_openapi_is_built_from_the_error_table(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operations = [op for item in schema["paths"].values() for op in item.values()]
    ids = [op["operationId"] for op in operations]
    assert len(set(ids)) == len(ids) and "restore" in ids
    for op in operations:
        for status, response in op["responses"].items():
            content = response.get("content", {})
            has_example = any("example" in c or "examples" in c for c in content.values())
            ref_example = "$ref" in str(content)  # a model whose schema carries examples
            assert has_example or ref_example or not content, (op["operationId"], status)
    restore = schema["paths"]["/restore"]["post"]
    declared = {str(k.status): {k.type} for k in ErrorKind if str(k.status) in restore["responses"]}
    for status in declared:
        examples = restore["responses"][status]["content"]["application/json"]["examples"]
        assert {ex["value"]["error"]["type"] for ex in examples.values()} <= {
            k.type for k in ErrorKind if str(k.status) == status
        }
    assert {"429", "503", "504"} <= set(restore["responses"])
    headers = restore["responses"]["200"]["headers"]
    for name in (
        "X-Faces-Detected",
        "X-Faces-Restored",
        "X-Queue-Time",
        "X-Total-Time",
        "X-Request-Id",
    ):
        assert name in headers
    assert "Retry-After" in restore["responses"]["429"]["headers"]
    form = restore["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert "null" not in str(form)
    allowed = set(Settings.model_fields["allowed_formats"].default)
    assert set(form["output_format"]["enum"]) == allowed | {"jpg"}


def test_every_error_type_is_documented_once() -> None:
    types = [k.type for k in ErrorKind]
    assert len(set(types)) == len(types), "two kinds share a type"
    page = (REPO / "docs" / "api.md").read_text()
    for kind in ErrorKind:
        assert f"| {kind.status} | `{kind.type}` | {kind.description} |" in page, kind


def test_api_and_operations_pages_say_what_the_server_does() -> None:
    from service.web import _STATIC_FILES

    api = (REPO / "docs" / "api.md").read_text()
    endpoints = [line.split(" | ")[0] for line in api.splitlines() if line.startswith("| `")]
    assert len(endpoints) == len(set(endpoints)), "an endpoint or field listed twice"
    floor = Settings.model_fields["min_face_size"].default  # the detector drops smaller faces
    assert f"| `min_face_size` | `OSDFACE_MIN_FACE_SIZE` ({floor}) |" in api
    operations = (REPO / "docs" / "operations.md").read_text()
    count = ("one", "two", "three", "four", "five", "six")[len(_STATIC_FILES)]  # + index.html
    assert f"It is {count} static files in `service/static/`" in operations
    scripts = [name for name in _STATIC_FILES if name.endswith(".js")]
    assert all(f"`{name}`" in operations for name in scripts), scripts


def test_probe_traffic_is_not_counted(tiny_weights_dir: Path, tiny_restorer, detector) -> None:
    # Warm-up off and no restorer injected for a moment: /readyz answers 503 while loading.
    app = create_app(make_settings(tiny_weights_dir), restorer=tiny_restorer, detector=detector)
    with TestClient(app) as c:
        wait_ready(c)
        app.state.service.phase = Phase.LOADING  # as during start-up
        for _ in range(5):
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200
        app.state.service.phase = Phase.READY
        text = c.get("/metrics").text
    assert metric(text, "osdface_errors_total") == 0
    assert metric(text, "osdface_rejected_total") == 0
    assert 'endpoint="/readyz"' not in text and 'endpoint="/healthz"' not in text
    assert "_created" not in text
    assert metric(text, "osdface_ready") == 1
    assert metric(text, "osdface_build_info", device="cpu", dtype="float32") == 1


# --- settings ------------------------------------------------------------------------------------


def test_unknown_environment_names_point_at_the_real_one() -> None:
    lines = unknown_env_names({"OSDFACE_MAX_QUEUE": "8", "OSDFACE_PORT": "1", "HOME": "/"})
    assert lines == ["OSDFACE_MAX_QUEUE is not a setting; did you mean OSDFACE_MAX_QUEUE_FACES?"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_batch_delay_ms", float("inf")), ("request_timeout_s", float("nan")), ("port", 0)],
)
def test_absurd_values_are_refused_with_the_variable_named(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as info:
        Settings(**{field: value})
    (line,) = describe_settings_error(info.value)
    assert line.startswith(f"OSDFACE_{field.upper()}: ")


def test_a_refused_redis_url_is_named_never_echoed() -> None:
    with pytest.raises(ValidationError) as info:
        Settings(jobs_redis_url="http://:hunter2@redis:6379/0")
    (line,) = describe_settings_error(info.value)
    assert line.startswith("OSDFACE_JOBS_REDIS_URL: must start with redis://")
    assert "hunter2" not in line
    with pytest.raises(ValidationError) as info:
        Settings(job_window_frames=16, job_segment_frames=20)
    assert "multiple of job_window_frames" in describe_settings_error(info.value)[0]


# --- admission by time ---------------------------------------------------------------------------


def test_estimator_interpolates_and_errs_slow_outside() -> None:
    est = BatchTimeEstimator()
    est.seed(1, 9.0)
    est.observe(2, 2.0)  # the first real call replaces the pessimistic seed
    est.observe(8, 5.0)
    assert est.batch_seconds(2) == 2.0 and est.batch_seconds(8) == 5.0
    assert est.batch_seconds(5) == pytest.approx(3.5)
    assert est.batch_seconds(1) == 2.0  # below the smallest: the smallest's time
    assert est.batch_seconds(16) == pytest.approx(10.0)  # above: proportional
    assert est.drain_seconds(20, 8) == pytest.approx(2 * 5.0 + 3.5 - 0.5)


def test_batcher_refuses_what_would_finish_past_the_deadline() -> None:
    def double(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return 2 * x, {}

    async def run() -> None:
        batcher = Batcher(double, max_batch=2, max_delay_s=0.0, max_queue=64)
        batcher.seed_estimate(1, 1.0)  # 1 s per face as far as the batcher knows
        loop = asyncio.get_running_loop()
        now = loop.time()
        # Nothing runs (not started): 3 queued faces ahead.
        jobs = [asyncio.ensure_future(batcher.submit(torch.ones(1, 2))) for _ in range(3)]
        await asyncio.sleep(0)
        predicted = batcher.predicted_finish_s(1)
        assert predicted == pytest.approx(SAFETY_FACTOR * (2 * 1.0 * 2), rel=1e-3)
        with pytest.raises(DeadlineUnreachableError) as info:
            batcher.admit(1, deadline=_monotonic() + predicted - 0.5)
        assert info.value.retry_after_s >= 1.0
        batcher.admit(1, deadline=_monotonic() + predicted + 0.5)
        batcher.start()
        done = await asyncio.gather(*jobs)
        assert all(torch.equal(r.output, 2 * torch.ones(1, 2)) for r in done)
        batcher.stop(5)
        assert loop.time() - now < 5

    asyncio.run(run())


def _monotonic() -> float:
    import time

    return time.monotonic()


def test_a_dead_worker_fails_its_jobs_and_reports(tiny_weights_dir, tiny_restorer, detector):
    died: list[BaseException] = []

    def fatal(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise KeyboardInterrupt  # not an Exception: escapes the per-batch handler

    async def run() -> None:
        batcher = Batcher(fatal, max_batch=2, max_delay_s=0.0, max_queue=8, on_death=died.append)
        batcher.start()
        with pytest.raises(BatcherClosedError):
            await asyncio.wait_for(batcher.submit(torch.ones(1, 2)), 5)
        with pytest.raises(BatcherClosedError):
            batcher.admit(1, None)

    asyncio.run(run())
    assert len(died) == 1 and isinstance(died[0], KeyboardInterrupt)

    fatal_reasons: list[str] = []
    app = create_app(make_settings(tiny_weights_dir), restorer=tiny_restorer, detector=detector)
    with TestClient(app) as c:
        wait_ready(c)
        state = app.state.service
        state.on_fatal = fatal_reasons.append
        state._worker_died(KeyboardInterrupt())
        assert_error_shape(c.get("/readyz"), 503, "model_failed")
        refused = c.post("/restore", files={"image": ("x.png", faceless_png())})
        assert_error_shape(refused, 503, "model_failed")
    assert fatal_reasons and "model worker stopped" in fatal_reasons[0]
