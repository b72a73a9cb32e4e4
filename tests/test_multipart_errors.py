"""Every way a multipart body can be unparseable is the client's error: 400 with the error JSON,
never a 500, on both upload endpoints (`POST /restore` and `POST /v1/jobs`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service_helpers import BOUNDARY, assert_error_shape, multipart
from tests.test_service_api import make_settings, wait_ready

ENDPOINTS = {"/restore": "image", "/v1/jobs": "video"}


@pytest.fixture(scope="module")
def client(tiny_weights_dir: Path, tiny_restorer, tmp_path_factory) -> Iterator[TestClient]:
    # Refusals happen before detection: a restorer and no detector are enough to be ready.
    jobs = tmp_path_factory.mktemp("jobs")
    settings = make_settings(tiny_weights_dir, jobs_dir=jobs)
    app = create_app(settings, restorer=tiny_restorer, detector=object())
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def _post(client: TestClient, path: str, body: bytes, content_type: str):
    return client.post(path, content=body, headers={"Content-Type": content_type})


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_boundary_longer_than_the_parser_takes_is_400(client: TestClient, path: str) -> None:
    boundary = "b" * 2000
    body = f"--{boundary}\r\n".encode() + b'Content-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    response = _post(client, path, body, f"multipart/form-data; boundary={boundary}")
    assert_error_shape(response, 400, "malformed_request")
    assert "boundary" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_missing_boundary_is_400(client: TestClient, path: str) -> None:
    body = multipart([(ENDPOINTS[path], b"data")])
    response = _post(client, path, body, "multipart/form-data")
    assert_error_shape(response, 400, "malformed_request")
    assert "no boundary" in response.json()["error"]["message"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_part_header_without_a_colon_is_400(client: TestClient, path: str) -> None:
    body = f"--{BOUNDARY}\r\nContent-Disposition form-data\r\n\r\ndata\r\n--{BOUNDARY}--\r\n"
    response = _post(client, path, body.encode(), f"multipart/form-data; boundary={BOUNDARY}")
    assert_error_shape(response, 400, "malformed_request")


@pytest.mark.parametrize("path", ENDPOINTS)
def test_a_body_that_never_meets_its_boundary_is_400(client: TestClient, path: str) -> None:
    body = multipart([(ENDPOINTS[path], b"data")])
    response = _post(client, path, body, "multipart/form-data; boundary=someOtherBoundary")
    assert_error_shape(response, 400, "malformed_request")
