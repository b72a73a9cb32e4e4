"""Test inputs made from the real photos in the shared assets: file variants and helpers.

Every variant is built here from a real photo with Pillow or OpenCV (never with the code under
test), so the tests compare the pipeline's output with an independent expectation.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

# Face counts from the assets README (counted by eye).
WHOLE_PHOTOS: dict[str, int] = {
    "gfpgan/whole_imgs/00.jpg": 2,
    "gfpgan/whole_imgs/10045.png": 3,
    "gfpgan/whole_imgs/Blake_Lively.jpg": 2,
    "vqfr/whole_imgs/example.jpg": 3,
}

MOBILE_FILE = "detection_mobilenet0.25_Final.pth"


def detector_weights_dir(assets: Path, root: Path) -> Path:
    """A weights dir holding only `facexlib/<mobile0.25 file>`, symlinked from the assets."""
    (root / "facexlib").mkdir(parents=True, exist_ok=True)
    link = root / "facexlib" / MOBILE_FILE
    if not link.exists():
        link.symlink_to(assets / "detectors" / MOBILE_FILE)
    return root


def load_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB as Pillow decodes it."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


@dataclass
class RestoredBatch:
    images: torch.Tensor


def identity_restorer(images: torch.Tensor, *, seed: int | None = None) -> RestoredBatch:
    """Returns its input crops: what is under test is the geometry around the restorer."""
    return RestoredBatch(images.detach().clone().cpu())


def grey_restorer(images: torch.Tensor, *, seed: int | None = None) -> RestoredBatch:
    """Every face restored to mid grey 0.5: makes pasted regions and strength visible."""
    return RestoredBatch(torch.full_like(images, 0.5).cpu())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def decode_output(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# --- file variants -------------------------------------------------------------------------


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


# Pillow transposition that undoes each EXIF orientation (orientations 6 and 8 undo each other).
_UNDO_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def with_orientation(rgb: np.ndarray, orientation: int, fmt: str = "PNG") -> bytes:
    """A file whose stored pixels, displayed with its EXIF orientation tag, show `rgb` upright."""
    stored = Image.fromarray(rgb).transpose(_UNDO_ORIENTATION[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "osdface-tests"  # Make: a tag that must survive
    return save(stored, fmt, exif=exif.tobytes())


def gradient_alpha(height: int, width: int) -> np.ndarray:
    """(H, W) uint8: a ramp plus a fully transparent corner, so every alpha value class shows."""
    ramp = np.linspace(40, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    alpha = np.rint(ramp).astype(np.uint8)
    alpha[: height // 8, : width // 8] = 0
    return alpha


def png_16bit(samples: np.ndarray) -> bytes:
    """A 16-bit PNG from (H, W) grey or (H, W, 3|4) RGB(A) uint16 samples, through OpenCV."""
    if samples.ndim == 3:
        samples = np.concatenate([samples[..., 2::-1], samples[..., 3:]], axis=2)  # to BGR(A)
    ok, encoded = cv2.imencode(".png", samples)
    assert ok
    return encoded.tobytes()


def widen_to_16bit(rgb: np.ndarray, seed: int = 0) -> np.ndarray:
    """8-bit -> 16-bit with random low bits, so values 8 bits cannot hold are present."""
    low = np.random.default_rng(seed).integers(0, 257, rgb.shape)
    return np.clip(rgb.astype(np.int64) * 257 + low - 128, 0, 65535).astype(np.uint16)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a tiny IDAT: a bomb header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def border_cut(rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The photo cropped so its left edge runs through the middle of `box` (a face)."""
    x1, _, x2, _ = box
    return np.ascontiguousarray(rgb[:, int((x1 + x2) / 2) :])


def two_overlapping_faces(face: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Two aligned face crops, shrunk to 256 px, side by side with their 512-crop regions
    overlapping (faces 190 px apart, each crop covering about 2x its face), on a grey canvas."""
    canvas = np.full((420, 620, 3), 128, np.uint8)
    small = [cv2.resize(f, (256, 256), interpolation=cv2.INTER_AREA) for f in (face, other)]
    canvas[80:336, 60:316] = small[0]
    canvas[80:336, 250:506] = small[1]
    return canvas
