"""What the answers of POST /restore and POST /v1/jobs say: faces found apart from faces restored,
boxes rounded as the command line's report rounds them, and refusals of form fields in plain
words (one table: model/runtime/messages.py) with a did-you-mean on both endpoints.

Real app, tiny random weights, the real detector and a real photo with two faces.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from model.media.faces.detect import DetectedFace, FaceDetector
from osdface.restore.reporting import face_json
from service.app import create_app
from service.errors import install_error_handlers
from tests.service_helpers import assert_error_shape
from tests.test_service_api import make_settings, wait_ready

PHOTO = "images/gfpgan/whole_imgs/00.jpg"  # 1297x1920, two faces
JSON = {"Accept": "application/json"}


@pytest.fixture(scope="module")
def client(
    tiny_weights_dir: Path, tiny_restorer, tmp_path_factory, assets: Path
) -> Iterator[TestClient]:
    # `assets`: the detector file is linked from there (the tests skip where it is absent).
    detector = FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25")
    jobs = tmp_path_factory.mktemp("jobs")
    settings = make_settings(tiny_weights_dir, jobs_dir=jobs, max_upload_bytes=8 * 2**20)
    with TestClient(create_app(settings, restorer=tiny_restorer, detector=detector)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def photo(assets: Path) -> bytes:
    return (assets / PHOTO).read_bytes()


def _restore(client: TestClient, photo: bytes, **fields: str):
    response = client.post("/restore", files={"image": ("p.jpg", photo)}, data=fields)
    assert response.status_code == 200, response.text
    return response


def _counts(response) -> tuple[str, str]:
    return response.headers["x-faces-detected"], response.headers["x-faces-restored"]


def test_faces_detected_counts_before_the_choice(client: TestClient, photo: bytes) -> None:
    none_chosen = _restore(client, photo, faces="5")
    assert _counts(none_chosen) == ("2", "0")
    assert none_chosen.content == photo  # nothing restored: the file as sent
    assert _counts(_restore(client, photo, max_faces="1")) == ("2", "1")
    assert _counts(_restore(client, photo, only_center_face="true")) == ("2", "1")
    body = client.post(
        "/restore", files={"image": ("p.jpg", photo)}, data={"max_faces": "1"}, headers=JSON
    ).json()
    assert (body["faces_detected"], body["faces_restored"], len(body["faces"])) == (2, 1, 1)


def _decimals(value: float) -> int:
    text = repr(value)
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def test_boxes_are_rounded_like_the_command_line_report(client: TestClient, photo: bytes) -> None:
    body = client.post("/restore", files={"image": ("p.jpg", photo)}, headers=JSON).json()
    assert len(body["faces"]) == 2
    for face in body["faces"]:
        points = [*face["box"], *(v for point in face["landmarks"] for v in point)]
        assert max(_decimals(v) for v in points) <= 2, face
        assert _decimals(face["score"]) <= 4, face
    assert any(_decimals(v) == 2 for f in body["faces"] for v in f["box"]), "not whole pixels"


def test_one_rounding_for_the_answer_and_the_report() -> None:
    face = DetectedFace((1.23456, 2.0, 3.999, 4.5), ((1.004, 2.006),) * 5, 0.987654)
    assert face.to_json() == {
        "box": [1.23, 2.0, 4.0, 4.5],
        "landmarks": [[1.0, 2.01]] * 5,
        "score": 0.9877,
    }
    assert face_json(face) == face.to_json()


def _message(response, status: int = 422) -> str:
    assert_error_shape(response, status, "invalid_parameter")
    return response.json()["error"]["message"]


def test_restore_form_errors_in_plain_words(client: TestClient) -> None:
    def refused(**fields: str) -> str:
        files = {"image": ("p.jpg", b"not read: the fields are checked first")}
        return _message(client.post("/restore", files=files, data=fields))

    assert refused(strength="2") == "strength must be at most 1"
    assert refused(quality="0") == "quality must be at least 1"
    assert refused(upscale="two") == "upscale must be a whole number"
    assert refused(faces="one") == "faces must be face indices like 0,2"
    assert refused(strenght="0.5") == "strenght is not a known field; did you mean strength?"
    unknown = refused(colour="red")
    assert unknown.startswith("colour is not a known field (the fields are image, aligned,")
    assert "Input should" not in refused(max_faces="0", strength="-1")


def test_job_form_errors_name_the_field_meant(client: TestClient) -> None:
    def refused(files: dict, **fields: str) -> str:
        return _message(client.post("/v1/jobs", files=files, data=fields))

    clip = ("clip.mp4", b"not read: the fields are refused first")
    assert refused({"image": clip}) == (
        "the video goes in the field 'video', not 'image'; "
        "the other fields are start, duration, crf, strength, max_faces"
    )
    near = refused({"video": clip}, strenght="0.5")
    assert near == "strenght is not a known field; did you mean strength?"
    far = refused({"video": clip}, colour="red")
    assert far == (
        "colour is not a known field; the fields are video, start, duration, crf, strength, "
        "max_faces"
    )


def test_request_validation_errors_use_the_same_words() -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/probe")
    def probe(n: int = Query(le=4)) -> dict:
        return {"n": n}

    def refused(url: str) -> str:
        response = client.get(url)  # this bare app has no request-id middleware
        assert (
            response.status_code == 422 and response.json()["error"]["type"] == "invalid_parameter"
        )
        return response.json()["error"]["message"]

    with TestClient(app) as client:
        assert refused("/probe?n=9") == "n must be at most 4"
        assert refused("/probe") == "n is required"
        assert refused("/probe?n=x") == "n must be a whole number"
