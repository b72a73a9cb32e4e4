"""The HTTP contract through the ASGI app in-process: tiny random weights in the released layout,
the real RetinaFace MobileNet detector, the real pipeline, the real batcher.

References are independent of the service: the pipeline and the detector called directly, the
sha256 of the files on disk, Pillow decoding the answers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.media.codecs.formats import ImageLimits
from model.media.faces.detect import FaceDetector
from model.media.pipeline import RestoreOptions, restore_photo
from service.app import create_app
from service.routes import wants_json
from service.settings import Settings
from tests.service_helpers import (
    BOUNDARY,
    EXPORTED_METRICS,
    aligned_crop,
    assert_error_shape,
    faceless_png,
    hostile_uploads,
    metric,
    multipart,
    png_bytes,
)

MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="session")
def detector(tiny_weights_dir: Path, assets: Path) -> FaceDetector:
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25")


def make_settings(weights: Path, **overrides) -> Settings:
    base = dict(
        weights_dir=weights,
        detector="retinaface_mobile0.25",
        device="cpu",
        warmup=False,
        cpu_workers=1,
        max_upload_bytes=MAX_UPLOAD,
        max_batch_delay_ms=5.0,
    )
    return Settings(**{**base, **overrides})


def wait_ready(client: TestClient, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, client.get("/readyz").text
        time.sleep(0.05)


@contextmanager
def serving(settings: Settings, restorer, detector) -> Iterator[TestClient]:
    app = create_app(settings, restorer=restorer, detector=detector)
    with TestClient(app) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def client(tiny_weights_dir, tiny_restorer, detector) -> Iterator[TestClient]:
    with serving(make_settings(tiny_weights_dir), tiny_restorer, detector) as c:
        yield c


@pytest.fixture(scope="module")
def crop(assets: Path) -> bytes:
    return aligned_crop(assets)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# --- ops endpoints -----------------------------------------------------------------------------


def test_health_ready_info_and_docs(client: TestClient, tiny_weights_dir: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/info").json()
    assert info["model"]["device"] == "cpu" and info["model"]["dtype"] == "float32"
    assert info["detector"]["name"] == "retinaface_mobile0.25"
    for rel, digest in info["model"]["files"].items():
        assert digest == hashlib.sha256((tiny_weights_dir / rel).read_bytes()).hexdigest(), rel
    assert info["batching"]["max_batch_faces"] == 8
    assert info["limits"]["max_upload_bytes"] == MAX_UPLOAD
    assert "torch" in info["model"]["versions"]
    assert client.get("/docs").status_code == 200
    body = client.get("/openapi.json").json()["paths"]["/restore"]["post"]["requestBody"]
    fields = body["content"]["multipart/form-data"]["schema"]["properties"]
    assert {"image", "aligned", "strength", "upscale", "output_format", "quality"} <= set(fields)


def test_metrics_exposes_every_family(client: TestClient) -> None:
    text = client.get("/metrics").text
    for name in EXPORTED_METRICS:
        assert f"# TYPE {name} " in text, name
    assert metric(text, "osdface_device_memory_bytes", device="cpu", kind="rss") > 1e6
    assert 'le="0.001"' in text and 'le="60.0"' in text


# --- restore -----------------------------------------------------------------------------------


def test_aligned_crop_matches_the_pipeline_called_directly(
    client: TestClient, crop: bytes, tiny_restorer
) -> None:
    response = client.post("/restore", files={"image": ("face.jpg", crop)}, data={"aligned": "1"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-faces-detected"] == "1"
    queue, inference, total = (
        float(response.headers[h]) for h in ("x-queue-time", "x-inference-time", "x-total-time")
    )
    assert queue >= 0 and 0 < inference <= total
    got = decode(response.content)
    assert got.shape == (512, 512, 3)
    limits = ImageLimits(MAX_UPLOAD, 40_000_000, 64_000_000)
    direct = restore_photo(crop, None, tiny_restorer, RestoreOptions(aligned=True), limits)
    expected = decode(direct.data)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2
    assert np.abs(got.astype(int) - decode(crop).astype(int)).mean() > 1, "face unchanged"


def test_whole_photo_as_json_reports_the_detector_faces(
    client: TestClient, assets: Path, detector: FaceDetector
) -> None:
    photo = (assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg").read_bytes()
    response = client.post(
        "/restore", files={"image": ("p.jpg", photo)}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    reference = detector.detect(decode(photo))
    assert body["faces_detected"] == len(reference) == 2
    assert body["content_type"] == "image/jpeg" and (body["width"], body["height"]) == (700, 464)
    assert decode(base64.b64decode(body["image"])).shape == (464, 700, 3)
    found = sorted(body["faces"], key=lambda f: f["box"][0])
    for face, ref in zip(found, sorted(reference, key=lambda f: f.box[0]), strict=True):
        assert np.allclose(face["box"], ref.box, atol=0.005)  # to 2 decimals
        assert np.allclose(face["landmarks"], ref.landmarks, atol=0.005)
        assert face["score"] == pytest.approx(ref.score, abs=5e-5)
    stages = body["timings"]["stages"]
    assert {"decode", "detect", "align", "vre", "vae_encode", "unet", "vae_decode"} <= set(stages)
    assert {"paste", "encode"} <= set(stages)
    assert body["timings"]["total"] >= body["timings"]["inference"] > 0


def test_no_face_is_200_with_the_image_unchanged(client: TestClient) -> None:
    image = faceless_png()
    response = client.post("/restore", files={"image": ("x.png", image)})
    assert response.status_code == 200
    assert response.headers["x-faces-detected"] == "0"
    assert response.content == image
    assert response.headers["content-type"] == "image/png"


def test_output_format_and_upscale(client: TestClient, crop: bytes) -> None:
    response = client.post(
        "/restore",
        files={"image": ("face.jpg", crop)},
        data={"aligned": "true", "output_format": "webp", "upscale": "2", "quality": "80"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    assert response.content[:4] == b"RIFF" and response.content[8:12] == b"WEBP"
    assert decode(response.content).shape == (1024, 1024, 3)


def test_faces_and_min_face_size_choose_faces(client: TestClient, assets: Path) -> None:
    photo = (assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg").read_bytes()
    json_accept = {"Accept": "application/json"}

    def post(**fields: str):
        return client.post(
            "/restore", files={"image": ("p.jpg", photo)}, data=fields, headers=json_accept
        )

    every = post().json()["faces"]  # largest first: the order `faces` indices count in
    assert len(every) == 2
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in every]
    assert areas == sorted(areas, reverse=True)
    second = post(faces="1").json()
    assert (second["faces_detected"], second["faces_restored"]) == (2, 1)
    assert second["faces"][0]["box"] == every[1]["box"]
    smallest = min(min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) for f in every)
    kept = post(min_face_size=str(int(smallest) + 1)).json()
    assert [f["box"] for f in kept["faces"]] == [every[0]["box"]]
    none = client.post("/restore", files={"image": ("p.jpg", photo)}, data={"faces": "5"})
    assert none.status_code == 200 and none.content == photo  # no face chosen: as sent
    assert_error_shape(post(faces="one"), 422, "invalid_parameter")
    assert_error_shape(post(min_face_size="0"), 422, "invalid_parameter")


def test_request_id_is_echoed_when_sane_and_made_otherwise(client: TestClient) -> None:
    assert (
        client.get("/healthz", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"]
        == "abc-123"
    )
    made = client.get("/healthz", headers={"X-Request-Id": "no spaces <allowed>"})
    assert made.headers["x-request-id"] != "no spaces <allowed>"
    assert len(made.headers["x-request-id"]) == 32
    assert_error_shape(client.get("/nowhere"), 404, "not_found")


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("application/json", True),
        ("image/png, application/json;q=0.5", False),
        ("application/json, image/*;q=0.9", True),
        ("*/*", False),
        ("", False),
        ("application/json;q=0", False),
    ],
)
def test_accept_negotiation(accept: str, expected: bool) -> None:
    assert wants_json(accept) is expected


def test_api_key_guards_restore_only(tiny_weights_dir, tiny_restorer, detector, crop) -> None:
    settings = make_settings(tiny_weights_dir, api_key="s3cret")
    with serving(settings, tiny_restorer, detector) as c:
        files = {"image": ("face.jpg", crop)}
        missing = c.post("/restore", files=files, data={"aligned": "1"})
        assert_error_shape(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = c.post("/restore", files=files, headers={"Authorization": "Bearer nope"})
        assert_error_shape(wrong, 401, "unauthorized")
        ok = c.post(
            "/restore",
            files=files,
            data={"aligned": "1"},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/v1/info"):
            assert c.get(path).status_code == 200, path


def test_hostile_uploads_get_their_4xx_and_never_500(client: TestClient, assets: Path) -> None:
    good_png = (assets / "images/gfpgan/cropped_faces/Adele_crop.png").read_bytes()
    corpus = hostile_uploads(aligned_crop(assets), good_png, MAX_UPLOAD)
    for case in corpus:
        response = client.post("/restore", **case.request_kwargs())
        assert_error_shape(response, case.status, case.error_type)
    assert client.get("/healthz").status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "osdface_errors_total", type="internal") == 0
    assert (
        metric(
            text, "osdface_request_duration_seconds_count", endpoint="/restore", status_class="5xx"
        )
        == 0
    )


def test_not_ready_while_weights_are_missing(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "no-weights-here"))
    with TestClient(app) as c:
        end = time.monotonic() + 30
        while "failed" not in c.get("/readyz").text:
            assert time.monotonic() < end
            time.sleep(0.05)
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert_error_shape(ready, 503, "model_failed")
        message = ready.json()["error"]["message"]
        assert "loading the model failed" in message and "vre.safetensors" in message
        refused = c.post("/restore", files={"image": ("x.png", faceless_png())})
        assert_error_shape(refused, 503, "model_failed")
        assert int(refused.headers["retry-after"]) >= 1
        assert_error_shape(c.get("/v1/info"), 503, "model_failed")
        assert metric(c.get("/metrics").text, "osdface_ready") == 0


def test_a_bug_is_a_500_logged_once_with_the_request_id(
    tiny_weights_dir, tiny_restorer, detector, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(tiny_weights_dir), restorer=tiny_restorer, detector=detector)

    def broken() -> None:
        raise RuntimeError("a bug of ours")

    app.add_api_route("/broken", broken)
    with TestClient(app) as c, caplog.at_level(logging.ERROR):
        response = c.get("/broken")
    assert_error_shape(response, 500, "internal")
    request_id = response.headers["x-request-id"]
    assert request_id in response.json()["error"]["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "a bug of ours" not in response.text, "internals stay in the log"


# --- deadline, disconnect, admission -----------------------------------------------------------


def test_deadline_is_504_and_the_queued_face_never_runs(
    tiny_weights_dir, tiny_restorer, detector, crop
) -> None:
    # An idle worker always takes work. The batch then waits up to 1.5 s to fill and the
    # request's deadline (0.3 s) comes first: 504, and the dropped face never runs.
    settings = make_settings(tiny_weights_dir, request_timeout_s=0.3, max_batch_delay_ms=1500)
    with serving(settings, tiny_restorer, detector) as c:
        started = time.monotonic()
        response = c.post("/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "1"})
        assert_error_shape(response, 504, "deadline_exceeded")
        time.sleep(max(0.0, started + 1.8 - time.monotonic()))  # past the batch delay
        text = c.get("/metrics").text
    assert metric(text, "osdface_rejected_total", reason="deadline_exceeded") == 1
    assert metric(text, "osdface_queue_depth") == 0
    assert metric(text, "osdface_batch_size_count") == 0, "the dropped face was run"


def test_a_deadline_that_cannot_be_met_is_429_before_the_upload_is_read(
    tiny_weights_dir, tiny_restorer, detector, crop
) -> None:
    # One face waits for its batch to fill (up to 1.5 s); a second request with a 1 s deadline
    # cannot be done in time behind it, so it is refused at once instead of timing out.
    settings = make_settings(tiny_weights_dir, request_timeout_s=1.0, max_batch_delay_ms=1500)
    with serving(settings, tiny_restorer, detector) as c:
        first: dict = {}
        worker = threading.Thread(
            target=lambda: first.update(
                r=c.post("/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "1"})
            )
        )
        worker.start()
        end = time.monotonic() + 10
        while metric(c.get("/metrics").text, "osdface_queue_depth") < 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        started = time.monotonic()
        second = c.post("/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "1"})
        refused_in = time.monotonic() - started
        worker.join(60)
        text = c.get("/metrics").text
    assert_error_shape(second, 429, "overloaded")
    assert refused_in < 0.5, refused_in
    assert int(second.headers["retry-after"]) >= 1
    assert_error_shape(first["r"], 504, "deadline_exceeded")
    assert metric(text, "osdface_rejected_total", reason="overloaded") == 1
    assert metric(text, "osdface_errors_total", type="overloaded") == 1
    assert metric(text, "osdface_batch_size_count") == 0, "a refused or dropped face was run"


def test_client_disconnect_drops_the_queued_face(tiny_weights_dir, tiny_restorer, detector, crop):
    settings = make_settings(tiny_weights_dir, max_batch_delay_ms=1500)
    app = create_app(settings, restorer=tiny_restorer, detector=detector)
    state = app.state.service
    body = multipart([("image", crop), ("aligned", b"true")])
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/restore",
        "raw_path": b"/restore",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"test"),
            (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 5555),
        "server": ("test", 80),
    }

    async def main() -> list[dict]:
        async with app.router.lifespan_context(app):
            while state.batcher is None:
                await asyncio.sleep(0.01)
            messages = [{"type": "http.request", "body": body, "more_body": False}]
            gone = asyncio.Event()
            sent: list[dict] = []

            async def receive() -> dict:
                if messages:
                    return messages.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict) -> None:
                sent.append(message)

            started = time.monotonic()
            call = asyncio.ensure_future(app(scope, receive, send))
            while state.batcher.queued == 0:
                assert not call.done(), sent
                await asyncio.sleep(0.01)
            gone.set()
            await call
            assert state.batcher.queued == 0
            await asyncio.sleep(max(0.0, started + 1.8 - time.monotonic()))
            return sent

    sent = asyncio.run(main())
    assert sent[0]["status"] == 499  # never reaches a client; for logs and metrics
    text = state.metrics.render()[0].decode()
    assert metric(text, "osdface_rejected_total", reason="client_disconnected") == 1
    assert metric(text, "osdface_batch_size_count") == 0, "the abandoned face was run"


def test_inflight_bound_answers_429_with_retry_after(
    tiny_weights_dir, tiny_restorer, detector, crop
) -> None:
    settings = make_settings(tiny_weights_dir, max_inflight_requests=1, max_batch_delay_ms=1000)
    with serving(settings, tiny_restorer, detector) as c:
        first: dict = {}
        worker = threading.Thread(
            target=lambda: first.update(
                r=c.post("/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "1"})
            )
        )
        worker.start()
        end = time.monotonic() + 10
        while metric(c.get("/metrics").text, "osdface_requests_in_flight") < 1:
            assert time.monotonic() < end
            time.sleep(0.01)
        second = c.post("/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "1"})
        worker.join(60)
        assert first["r"].status_code == 200
    assert_error_shape(second, 429, "too_many_requests")
    assert int(second.headers["retry-after"]) >= 1


def test_many_concurrent_requests_share_batches(
    tiny_weights_dir, tiny_restorer, detector, assets
) -> None:
    settings = make_settings(tiny_weights_dir, max_batch_delay_ms=400, cpu_workers=2)
    crops = [
        aligned_crop(assets, name) for name in ("Adele_crop.png", "Justin_Timberlake_crop.png")
    ]
    with serving(settings, tiny_restorer, detector) as c:
        results: list = [None] * 4

        def post(i: int) -> None:
            files = {"image": ("f.jpg", crops[i % 2])}
            results[i] = c.post("/restore", files=files, data={"aligned": "1"})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        text = c.get("/metrics").text
    assert all(r.status_code == 200 for r in results)
    # Same input, same output, whichever batch a request landed in.
    by_input = [decode(results[i].content) for i in range(4)]
    assert np.abs(by_input[0].astype(int) - by_input[2].astype(int)).max() <= 2
    assert np.abs(by_input[1].astype(int) - by_input[3].astype(int)).max() <= 2
    assert metric(text, "osdface_batch_size_sum") == 4
    assert metric(text, "osdface_batch_size_count") < 4, "no two requests shared a batch"
    assert metric(text, "osdface_faces_per_image_sum") == 4


def test_png_roundtrip_keeps_size(client: TestClient) -> None:
    image = png_bytes(Image.new("RGB", (300, 200), (10, 200, 30)))
    response = client.post("/restore", files={"image": ("x.png", image)}, data={"upscale": "2"})
    assert response.status_code == 200
    assert decode(response.content).shape == (400, 600, 3)


def test_a_model_that_outputs_nan_is_a_500_not_the_clients_fault(
    tiny_weights_dir, detector, crop, caplog: pytest.LogCaptureFixture
) -> None:
    """Real tiny weights with one poisoned bias: the pipeline refuses the NaN faces, and the
    service reports the model's failure (500 `model_output`, logged once with the request id),
    not a 422."""
    import torch

    from model.networks.restorer import OSDFaceRestorer

    broken = OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cpu", torch.float32)
    with torch.no_grad():
        broken.vae.decoder.conv_out.bias.fill_(float("nan"))
    with (
        serving(make_settings(tiny_weights_dir), broken, detector) as c,
        caplog.at_level(logging.ERROR),
    ):
        response = c.post("/restore", files={"image": ("f.jpg", crop)}, data={"aligned": "1"})
        assert c.get("/healthz").status_code == 200
    assert_error_shape(response, 500, "model_output")
    request_id = response.headers["x-request-id"]
    assert len([r for r in caplog.records if request_id in r.getMessage()]) == 1


def test_docs_document_every_setting_and_metric() -> None:
    from service.metrics import Metrics

    docs = Path(__file__).resolve().parents[1] / "docs"
    settings_page = (docs / "configuration.md").read_text()
    undocumented = [
        n for n in Settings.model_fields if f"`OSDFACE_{n.upper()}`" not in settings_page
    ]
    assert undocumented == [], "settings missing from docs/configuration.md"
    metrics_page = (docs / "operations.md").read_text()
    families = {m.name for m in Metrics().registry.collect() if m.name.startswith("osdface_")}
    assert [f for f in sorted(families) if f"`{f}" not in metrics_page] == []
