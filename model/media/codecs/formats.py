"""Image formats, limits, and the decoded image that carries what is needed to write it back."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from model.errors import ImageDecodeError, InvalidInputError, UnsupportedFormatError
from model.media.codecs.heif import sniff_bmff

ImageFormat = Literal["jpeg", "png", "webp", "heic", "avif"]
FORMATS: tuple[ImageFormat, ...] = get_args(ImageFormat)
CONTENT_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "heic": "image/heic",
    "avif": "image/avif",
}
EXTENSIONS: dict[str, str] = {
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
    "heic": "heic",
    "avif": "avif",
}
_FORMAT_ALIASES: dict[str, str] = {
    "jpg": "jpeg",
    "jpeg": "jpeg",
    "png": "png",
    "webp": "webp",
    "heic": "heic",
    "heif": "heic",
    "avif": "avif",
}
PILLOW_FORMATS: dict[str, str] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "heic": "HEIF",
    "avif": "AVIF",
}
EXIF_ORIENTATION = 0x0112
# JPEG / lossy WebP / HEIC / AVIF quality written when neither the caller nor the input says.
DEFAULT_QUALITY = 95
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Everything Pillow or a codec raises on a broken file; mapped to ImageDecodeError at one place.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what a caller may send and receive (decompression-bomb guards).

    The defaults are the service's and the command line's (`OSDFACE_MAX_*` override them).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_output_pixels: int = 64_000_000
    allowed_formats: tuple[str, ...] = FORMATS


@dataclass
class DecodedImage:
    """A decoded image file, ready for the face pipeline, and what is needed to write it back.

    `rgb` is (H, W, 3) uint8 RGB with the EXIF orientation applied; `alpha` is (H, W) uint8, or
    uint16 for 16-bit PNGs, or None. For 16-bit sources `high_bit` holds the oriented 16-bit
    samples, (H, W) for grey and (H, W, 3) RGB otherwise, and `rgb` is their rounding to 8 bits.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    format: str
    mode: str  # Pillow mode of the source, before any conversion (e.g. "P", "CMYK", "I;16")
    grey: bool
    high_bit: np.ndarray | None
    icc_profile: bytes | None
    exif: bytes | None  # orientation tag removed (it has been applied to the pixels)
    data: bytes  # the file as received
    webp_lossless: bool = False
    dropped_metadata: tuple[str, ...] = ()  # blocks that could not be parsed ("exif", "icc")
    jpeg_quality: int | None = None  # a JPEG's IJG quality 1..100, estimated from its tables

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


def normalize_format(name: str) -> str:
    """'JPG', 'jpeg', '.png' -> 'jpeg' / 'png'; InvalidInputError for anything else."""
    key = name.lower().lstrip(".")
    if key not in _FORMAT_ALIASES:
        raise InvalidInputError(f"output format {name!r} is not one of {', '.join(FORMATS)}")
    return _FORMAT_ALIASES[key]


def sniff_format(data: bytes) -> str:
    """The container format from the magic bytes: 'jpeg', 'png', 'webp', or a named other one.

    Other recognised formats are named so the error can say what was sent; unrecognised bytes
    (text, SVG, garbage) raise UnsupportedFormatError here.
    """
    if not data:
        raise ImageDecodeError("the image is empty (0 bytes)")
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if bmff := sniff_bmff(data):
        return bmff
    others = {b"GIF87a": "gif", b"GIF89a": "gif", b"II*\x00": "tiff", b"MM\x00*": "tiff"}
    for magic, name in others.items():
        if data.startswith(magic):
            return name
    if data.startswith(b"BM"):
        return "bmp"
    raise UnsupportedFormatError(
        "the file is not a recognised image (expected JPEG, PNG, WebP, HEIC or AVIF)"
    )
