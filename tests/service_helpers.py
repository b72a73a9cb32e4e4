"""Uploads for the service tests, generated here: good photos from the assets and a corpus of
hostile ones, each with the status and error type the API promises for it."""

from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BOUNDARY = "osdfaceTestBoundary7MA4YWxk"

# Every metric the service exports, as its `# TYPE` line names it (counters with `_total`).
EXPORTED_METRICS = (
    "osdface_request_duration_seconds",
    "osdface_queue_wait_seconds",
    "osdface_stage_duration_seconds",
    "osdface_batch_size",
    "osdface_faces_per_image",
    "osdface_requests_in_flight",
    "osdface_queue_depth",
    "osdface_rejected_total",
    "osdface_errors_total",
    "osdface_device_memory_bytes",
    "osdface_ready",
    "osdface_startup_duration_seconds",
    "osdface_build_info",
)


def jpeg_bytes(image: Image.Image, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def aligned_crop(assets: Path, name: str = "Adele_crop.png", quality: int = 80) -> bytes:
    """A real 512x512 FFHQ-aligned face, re-encoded as a small JPEG (~30 KB)."""
    with Image.open(assets / "images/gfpgan/cropped_faces" / name) as im:
        return jpeg_bytes(im, quality)


def faceless_png(width: int = 160, height: int = 120) -> bytes:
    """A smooth colour gradient: no face for any detector."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], -1)
    return png_bytes(Image.fromarray(rgb.astype(np.uint8), "RGB"))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header for a huge RGB image followed by a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small valid baseline JPEG whose frame header is patched to claim width x height."""
    data = bytearray(jpeg_bytes(Image.new("RGB", (16, 16), (90, 120, 150))))
    sof = data.index(b"\xff\xc0")  # baseline frame: FF C0, length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def other_format(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@dataclass(frozen=True)
class Hostile:
    """One hostile request: an image upload (with extra form fields) or a raw body."""

    name: str
    status: int
    error_type: str
    image: bytes | None = None
    filename: str = "upload.jpg"
    fields: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None  # sent as-is, with `content_type`
    content_type: str | None = None

    def request_kwargs(self) -> dict:
        """Keyword arguments for httpx / TestClient `.post`."""
        if self.raw_body is not None:
            return {"content": self.raw_body, "headers": {"Content-Type": self.content_type}}
        files = {"image": (self.filename, self.image, "image/jpeg")}
        return {"files": files, "data": self.fields}


def multipart(parts: list[tuple[str, bytes]], *, close: bool = True) -> bytes:
    """A multipart/form-data body with BOUNDARY; `close=False` leaves the last boundary off."""
    out = b""
    for name, value in parts:
        out += f"--{BOUNDARY}\r\n".encode()
        out += f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value + b"\r\n"
    if close:
        out += f"--{BOUNDARY}--\r\n".encode()
    return out


def _file_part(name: str, data: bytes) -> bytes:
    """One multipart part carrying a file (with a filename), as curl -F name=@file sends it."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="a.jpg"\r\n'
    return head.encode() + b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n"


def _tiff(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian TIFF header and one IFD: (tag, type, count, 4-byte value) entries."""
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack("<HHI", tag, kind, count) + value
    return out + struct.pack("<I", 0)


def _with_exif(fmt: str, exif: bytes, size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 80, 40)).save(buf, fmt, exif=exif)
    return buf.getvalue()


def _png16_with_exif(exif_tiff: bytes) -> bytes:
    """A 16-bit RGB PNG (OpenCV writes it) with an eXIf chunk right after IHDR."""
    import cv2

    pixels = (np.arange(48 * 64 * 3, dtype=np.uint16).reshape(48, 64, 3) * 7).astype(np.uint16)
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    data = encoded.tobytes()
    return data[:33] + _png_chunk(b"eXIf", exif_tiff) + data[33:]


ORIENTATION_6 = (0x0112, 3, 1, struct.pack("<HH", 6, 0))


def exif_uploads() -> dict[str, tuple[bytes, dict[str, str]]]:
    """Files whose metadata Pillow cannot parse or write: name -> (file, form fields).

    EXIF that is not TIFF (JPEG, PNG, WebP), Orientation 6 beside a mistyped tag (XResolution
    as ASCII), a 16-bit PNG whose Orientation is ASCII, and 100 KB of EXIF asked out as JPEG
    (one JPEG marker holds 64 KB). Each must be restored without its unusable metadata.
    """
    garbage = b"Exif\x00\x00garbage" + bytes(range(256)) * 4
    mistyped = _tiff([ORIENTATION_6, (0x011A, 2, 4, b"abc\x00")])
    big = _tiff([(0x010E, 2, 100_000, struct.pack("<I", 26))]) + b"A" * 100_000
    return {
        "not_tiff_jpeg": (_with_exif("JPEG", garbage), {}),
        "not_tiff_png": (_with_exif("PNG", garbage), {}),
        "not_tiff_webp": (_with_exif("WEBP", garbage), {}),
        "orientation_6_beside_mistyped_tag": (_with_exif("JPEG", b"Exif\x00\x00" + mistyped), {}),
        "png16_ascii_orientation": (_png16_with_exif(_tiff([(0x0112, 2, 4, b"six\x00")])), {}),
        "100kb_exif_to_jpeg": (
            _with_exif("PNG", b"Exif\x00\x00" + big),
            {"output_format": "jpeg"},
        ),
    }


def hostile_uploads(good_jpeg: bytes, good_png: bytes, max_upload_bytes: int) -> list[Hostile]:
    """The corpus. Formats are sniffed from the bytes: every file here is named .jpg."""
    rng = random.Random(20250601)
    small = Image.new("RGB", (32, 32), (200, 30, 30))
    multipart_type = f"multipart/form-data; boundary={BOUNDARY}"
    gif_js = b"GIF89a/*\x00\x00\x00\x00*/=alert(document.domain);//" + b"PK\x03\x04" * 8
    jpeg_html = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01<html><script>alert(1)</script></html>"
    return [
        Hostile("empty", 400, "invalid_image", image=b""),
        Hostile("random_bytes", 415, "unsupported_format", image=rng.randbytes(4096)),
        Hostile("truncated_jpeg", 400, "invalid_image", image=good_jpeg[: len(good_jpeg) // 2]),
        Hostile("truncated_png", 400, "invalid_image", image=good_png[: len(good_png) // 2]),
        Hostile(
            "png_claims_100k_x_100k", 413, "image_too_large", image=png_claiming(100_000, 100_000)
        ),
        Hostile("pixel_flood_jpeg", 413, "image_too_large", image=jpeg_claiming(65_000, 65_000)),
        Hostile("gif", 415, "unsupported_format", image=other_format(small, "GIF")),
        Hostile("tiff", 415, "unsupported_format", image=other_format(small, "TIFF")),
        Hostile("bmp", 415, "unsupported_format", image=other_format(small, "BMP")),
        Hostile(
            "svg",
            415,
            "unsupported_format",
            image=b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
            filename="upload.svg",
        ),
        Hostile("text_named_jpg", 415, "unsupported_format", image=b"hello, I am a JPEG\n" * 9),
        Hostile("polyglot_gif_js_zip", 415, "unsupported_format", image=gif_js),
        Hostile("polyglot_jpeg_html", 400, "invalid_image", image=jpeg_html),
        Hostile(
            "huge_multipart_field",
            413,
            "too_large",
            image=good_jpeg,
            fields={"strength": "0." + "5" * 2_000_000},
        ),
        Hostile(
            "over_upload_limit", 413, "too_large", image=good_jpeg[:4] + bytes(max_upload_bytes)
        ),
        Hostile(
            "not_multipart",
            415,
            "unsupported_media_type",
            raw_body=good_jpeg,
            content_type="image/jpeg",
        ),
        Hostile(
            "multipart_without_end",
            400,
            "malformed_request",
            raw_body=multipart([("image", good_jpeg)], close=False),
            content_type=multipart_type,
        ),
        Hostile(
            "no_image_field",
            422,
            "invalid_parameter",
            raw_body=multipart([("aligned", b"true")]),
            content_type=multipart_type,
        ),
        Hostile(
            "two_images",
            422,
            "invalid_parameter",
            raw_body=multipart([("image", good_jpeg), ("image", good_jpeg)]),
            content_type=multipart_type,
        ),
        Hostile(
            "unknown_field", 422, "invalid_parameter", image=good_jpeg, fields={"path": "/etc"}
        ),
        Hostile(
            "strength_not_a_number",
            422,
            "invalid_parameter",
            image=good_jpeg,
            fields={"strength": "lots"},
        ),
        Hostile(
            "upscale_too_big", 422, "invalid_parameter", image=good_jpeg, fields={"upscale": "64"}
        ),
        Hostile(
            "output_format_gif",
            422,
            "invalid_parameter",
            image=good_jpeg,
            fields={"output_format": "gif"},
        ),
        Hostile(
            "file_in_field_named_file",
            422,
            "invalid_parameter",
            raw_body=_file_part("file", good_jpeg) + f"--{BOUNDARY}--\r\n".encode(),
            content_type=multipart_type,
        ),
        Hostile(
            "aligned_but_not_512",
            422,
            "invalid_parameter",
            image=jpeg_bytes(small),
            fields={"aligned": "true"},
        ),
    ]


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text `text` (0.0 when the series is absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def batches_larger_than_one(text: str) -> float:
    """Model calls that held more than one face, from the osdface_batch_size histogram."""
    count = metric(text, "osdface_batch_size_count")
    return count - metric(text, "osdface_batch_size_bucket", le="1.0")


def assert_error_shape(response, status: int, error_type: str) -> None:
    """Status, JSON error body `{"error": {"type", "message"}}` and a request id."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == error_type, body
    assert body["error"]["message"]
    assert response.headers.get("x-request-id")
