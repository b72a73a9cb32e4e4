"""Phone photos: HEIC (pillow-heif) and AVIF (Pillow) sniffed, decoded upright, written back,
through the codecs, the command line and the HTTP API; broken files are 4xx, never 5xx.

The photos are made here from a real JPEG: the upright pixels are rotated the way a phone
stores them and tagged with EXIF orientation 6, so "upright" has an independent reference.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageCms

from model.errors import ImageDecodeError, ImageError, UnsupportedFormatError
from model.media.codecs.decode import decode_image
from model.media.codecs.encode import encode_image
from model.media.codecs.formats import ImageLimits, sniff_format
from model.media.codecs.heif import writable_formats
from model.media.pipeline import RestoreOptions, output_format
from osdface.cli import main
from service.app import create_app
from tests.service_helpers import BOUNDARY, multipart
from tests.tiny_realesrgan import write_tiny_realesrgan

LIMITS = ImageLimits(max_bytes=20_000_000, max_pixels=40_000_000, max_output_pixels=64_000_000)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
MAKE = 0x010F  # an EXIF tag that must survive


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def upright(assets: Path) -> np.ndarray:
    with Image.open(assets / "images/gfpgan/whole_imgs/Blake_Lively.jpg") as im:
        return np.asarray(im.convert("RGB"))  # (464, 700, 3): 2 faces


def phone_file(upright: np.ndarray, fmt: str, **save) -> bytes:
    """As a phone stores it: pixels turned 90° anticlockwise, EXIF orientation 6 (turn right)."""
    pillow_heif.register_heif_opener()
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[MAKE] = "TestPhone"
    buf = io.BytesIO()
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))
    stored.save(buf, format=fmt, exif=exif.tobytes(), icc_profile=SRGB, quality=90, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def heic(upright: np.ndarray) -> bytes:
    return phone_file(upright, "HEIF")


def is_upright(rgb: np.ndarray, upright: np.ndarray) -> bool:
    """Same size as the upright photo, and much closer to it than to it turned 180°."""
    if rgb.shape != upright.shape:
        return False
    a, b = rgb.astype(int), upright.astype(int)
    return np.abs(a - b).mean() < 0.5 * np.abs(a - b[::-1, ::-1]).mean()


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + b"\x00" * 16


# --- codecs ------------------------------------------------------------------------------------


def test_sniffing_by_brands() -> None:
    assert sniff_format(_ftyp(b"heic", b"mif1", b"heic")) == "heic"
    assert sniff_format(_ftyp(b"heix", b"mif1")) == "heic"
    assert sniff_format(_ftyp(b"mif1", b"heic")) == "heic"
    assert sniff_format(_ftyp(b"msf1", b"hevc")) == "heic"
    assert sniff_format(_ftyp(b"avif", b"mif1", b"miaf")) == "avif"
    assert sniff_format(_ftyp(b"mif1", b"avif", b"miaf")) == "avif"
    with pytest.raises(UnsupportedFormatError):
        sniff_format(_ftyp(b"isom", b"mp41"))  # a video


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_photo_decodes_upright_with_icc_and_exif(upright, fmt) -> None:
    data = phone_file(upright, fmt)
    image = decode_image(data, LIMITS)
    assert image.format == ("heic" if fmt == "HEIF" else "avif")
    assert is_upright(image.rgb, upright)
    assert image.icc_profile == SRGB
    exif = Image.Exif()
    exif.load(image.exif)
    assert exif.get(MAKE) == "TestPhone" and exif.get(0x0112, 1) == 1


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_photo_is_written_back_in_its_format(upright, fmt) -> None:
    image = decode_image(phone_file(upright, fmt), LIMITS)
    fmt = output_format(image, RestoreOptions().validated())
    assert fmt == image.format and fmt in writable_formats()
    with Image.open(io.BytesIO(encode_image(image, image.rgb, format=fmt))) as back:
        assert back.format == ("HEIF" if fmt == "heic" else "AVIF")
        assert back.info.get("icc_profile") == SRGB
        assert is_upright(np.asarray(back.convert("RGB")), upright)


def test_without_an_encoder_the_answer_is_png(upright, monkeypatch) -> None:
    image = decode_image(phone_file(upright, "HEIF"), LIMITS)
    monkeypatch.setattr("model.media.pipeline.writable_formats", lambda: {"jpeg", "png", "webp"})
    assert output_format(image, RestoreOptions().validated()) == "png"
    assert output_format(image, RestoreOptions(output_format="jpg").validated()) == "jpeg"


def test_truncated_or_garbled_heic_is_a_decode_error(heic: bytes) -> None:
    for cut in (8, 30, 200, len(heic) // 3, len(heic) // 2, len(heic) - 100):
        with pytest.raises(ImageError):
            decode_image(heic[:cut], LIMITS)
    with pytest.raises(ImageDecodeError):
        decode_image(heic[: len(heic) // 2], LIMITS)


# --- command line ------------------------------------------------------------------------------


def test_cli_restores_a_heic_upright(tmp_path: Path, tiny_weights_dir: Path, heic, upright):
    source = tmp_path / "in" / "IMG_0001.HEIC"
    source.parent.mkdir()
    source.write_bytes(heic)
    out = tmp_path / "out"
    argv = ["restore", str(source.parent), "-o", str(out), "--weights", str(tiny_weights_dir)]
    argv += ["--device", "cpu", "--detector", "retinaface_mobile0.25"]
    assert main(argv) == 0
    written = out / "IMG_0001.heic"
    assert source.read_bytes() == heic  # the input is untouched
    with Image.open(written) as im:
        assert im.format == "HEIF"
        restored = np.asarray(im.convert("RGB"))
    assert is_upright(restored, upright)
    assert not np.array_equal(restored, decode_image(heic, LIMITS).rgb)  # faces restored


def test_cli_background_upscales_with_the_network(tmp_path: Path, tiny_weights_dir: Path, upright):
    weights = tmp_path / "weights"
    weights.mkdir()
    for entry in tiny_weights_dir.iterdir():
        (weights / entry.name).symlink_to(entry)
    write_tiny_realesrgan(weights, "realesrgan-x2")
    source = tmp_path / "photo.png"
    Image.fromarray(upright[:232, :350]).save(source)
    argv = ["restore", str(source), "-o", str(tmp_path / "out"), "--weights", str(weights)]
    argv += ["--device", "cpu", "--detector", "retinaface_mobile0.25"]
    assert main([*argv, "--background", "realesrgan-x2"]) == 0
    with Image.open(tmp_path / "out/photo.png") as im:
        assert im.size == (700, 464)  # the network's scale, by default
    missing = [*argv[:3], str(tmp_path / "out4"), *argv[4:], "--background", "realesrgan-x4"]
    assert main(missing) == 2  # not fetched: refused before anything loads
    assert not (tmp_path / "out4").exists()


# --- HTTP --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_weights_dir, tiny_restorer, tmp_path_factory) -> TestClient:
    from model.media.faces.detect import FaceDetector
    from service.settings import Settings

    root = tmp_path_factory.mktemp("bg-weights")
    write_tiny_realesrgan(root, "realesrgan-x2")
    settings = Settings(
        weights_dir=root,
        detector="retinaface_mobile0.25",
        device="cpu",
        warmup=False,
        cpu_workers=1,
        background_models=("realesrgan-x2",),
        background_tile=128,
        background_tile_overlap=8,
    )
    detector = FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25")
    app = create_app(settings, restorer=tiny_restorer, detector=detector)
    with TestClient(app) as c:
        for _ in range(600):
            if c.get("/readyz").status_code == 200:
                break
            __import__("time").sleep(0.1)
        assert c.get("/readyz").status_code == 200, c.get("/readyz").text
        yield c


def post(client: TestClient, image: bytes, **fields: str):
    parts = [("image", image), *((k, v.encode()) for k, v in fields.items())]
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    return client.post("/restore", content=multipart(parts), headers=headers)


def test_http_restores_a_heic_upright_as_heic(client: TestClient, heic, upright) -> None:
    response = post(client, heic)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/heic"
    assert response.headers["x-output-format"] == "heic"
    assert int(response.headers["x-faces-detected"]) == 2
    with Image.open(io.BytesIO(response.content)) as im:
        assert is_upright(np.asarray(im.convert("RGB")), upright)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9])
def test_http_truncated_heic_is_4xx(client: TestClient, heic, cut: float) -> None:
    response = post(client, heic[: int(len(heic) * cut)])
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["type"] in ("invalid_image", "unsupported_format")


def test_http_background_runs_on_the_worker_at_its_scale(client: TestClient, upright) -> None:
    small = Image.fromarray(upright[:232, :350])
    buf = io.BytesIO()
    small.save(buf, "PNG")
    response = post(client, buf.getvalue(), background="realesrgan-x2")
    assert response.status_code == 200, response.text
    with Image.open(io.BytesIO(response.content)) as im:
        assert im.size == (700, 464)
    assert float(response.headers["x-background-time"]) > 0
    metrics = client.get("/metrics").text
    assert 'osdface_stage_duration_seconds_count{stage="background"} 1.0' in metrics
    info = client.get("/v1/info").json()
    assert info["model"]["backgrounds"]["realesrgan-x2"]["scale"] == 2
    refused = post(client, buf.getvalue(), background="realesrgan-x4")
    assert refused.status_code == 422 and "not loaded" in refused.json()["error"]["message"]


def test_asking_for_a_format_without_encoder_is_refused(monkeypatch) -> None:
    from model.errors import InvalidInputError

    monkeypatch.setattr("model.options.writable_formats", lambda: {"jpeg", "png", "webp"})
    with pytest.raises(InvalidInputError, match="no heic encoder"):
        RestoreOptions(output_format="heif").validated()
