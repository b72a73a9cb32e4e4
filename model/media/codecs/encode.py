"""Writing processed pixels back as a file like the one the user sent: mode, alpha, ICC, EXIF."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from dataclasses import dataclass, replace

import cv2
import numpy as np
from PIL import Image

from model.errors import (
    ImageEncodeError,
    InvalidInputError,
)
from model.media.codecs.decode import to_8bit
from model.media.codecs.formats import (
    DEFAULT_QUALITY,
    PILLOW_FORMATS,
    DecodedImage,
    normalize_format,
)
from model.media.codecs.heif import writable_formats

logger = logging.getLogger(__name__)

NO_GREY = ("webp", "heic", "avif")  # written as RGB with equal channels


# Pillow writes JPEG EXIF into one APP1 marker: 65,535 bytes less the length field.
JPEG_MAX_EXIF_BYTES = 65_533


@dataclass(frozen=True)
class EncodedImage:
    """The file's bytes and the metadata blocks left out of it ("exif", "icc"): unreadable in
    the input, or too large for the output format."""

    data: bytes
    dropped_metadata: tuple[str, ...] = ()


def encode_image(
    image: DecodedImage, rgb: np.ndarray, *, format: str | None = None, quality: int | None = None
) -> bytes:
    """`encode_image_with_report(...)`, the bytes only."""
    return encode_image_with_report(image, rgb, format=format, quality=quality).data


def encode_image_with_report(
    image: DecodedImage, rgb: np.ndarray, *, format: str | None = None, quality: int | None = None
) -> EncodedImage:
    """Write `rgb` like `image` (see `_encode`) at `output_quality`; metadata the output cannot
    carry is dropped.

    EXIF over the JPEG marker limit is left out before writing; a metadata block the writer
    still refuses is left out on a second try, so metadata never costs the user the photo.
    """
    fmt = normalize_format(format) if format else image.format
    quality = output_quality(image, fmt, quality)
    dropped = list(image.dropped_metadata)
    if fmt == "jpeg" and image.exif and len(image.exif) > JPEG_MAX_EXIF_BYTES:
        logger.info("EXIF of %d bytes does not fit a JPEG; left out", len(image.exif))
        image = replace(image, exif=None)
        dropped.append("exif")
    try:
        data = _encode(image, rgb, fmt, quality)
    except (InvalidInputError, ImageEncodeError):
        raise
    except Exception as exc:
        if not (image.exif or image.icc_profile):
            raise
        logger.warning("writing the metadata failed (%s); writing the image without it", exc)
        dropped += [n for n, v in (("exif", image.exif), ("icc", image.icc_profile)) if v]
        data = _encode(replace(image, exif=None, icc_profile=None), rgb, fmt, quality)
    return EncodedImage(data, tuple(dict.fromkeys(dropped)))


def output_quality(image: DecodedImage, fmt: str, quality: int | None) -> int:
    """The quality `fmt` is written at: the caller's; else a JPEG input's own, when written as
    JPEG (so a q75 photo does not come back twice its size, nor a q99 one degraded); else
    DEFAULT_QUALITY."""
    if quality is not None:
        return quality
    if fmt == "jpeg" and image.format == "jpeg" and image.jpeg_quality is not None:
        return image.jpeg_quality
    return DEFAULT_QUALITY


def _encode(image: DecodedImage, rgb: np.ndarray, fmt: str, quality: int) -> bytes:
    """Write `rgb` back as a file like `image`'s: its mode, alpha, bit depth, ICC profile, EXIF.

    `rgb` is (H', W', 3) uint8 RGB: the processed pixels, the size of `image` or larger when
    upscaled (alpha is then resized with Lanczos). `format` defaults to the input's. JPEG has no
    alpha: the image is composited over white. WebP, HEIC and AVIF are written as RGB(A), grey
    included.
    """
    if fmt not in writable_formats():
        raise InvalidInputError(f"this server has no {fmt} encoder; ask for png, jpeg or webp")
    if not 1 <= quality <= 100:
        raise InvalidInputError(f"quality must be in 1..100, got {quality}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidInputError(f"expected (H, W, 3) uint8 RGB, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    alpha = _resize_channel(image.alpha, width, height) if image.alpha is not None else None
    if fmt == "png" and image.high_bit is not None:
        return _encode_png16(image, rgb, alpha)
    if fmt == "jpeg" and alpha is not None:
        rgb = _over_white(rgb, alpha)
        alpha = None
    pil = _to_pillow(rgb, alpha, grey=image.grey and fmt not in NO_GREY)
    return _save_pillow(pil, fmt, image, quality)


def _resize_channel(channel: np.ndarray, width: int, height: int) -> np.ndarray:
    if channel.shape[:2] == (height, width):
        return channel
    return cv2.resize(channel, (width, height), interpolation=cv2.INTER_LANCZOS4)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / float(np.iinfo(alpha.dtype).max)
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _to_pillow(rgb: np.ndarray, alpha: np.ndarray | None, *, grey: bool) -> Image.Image:
    alpha_8 = None if alpha is None else (alpha if alpha.dtype == np.uint8 else to_8bit(alpha))
    if grey:
        luma = Image.fromarray(_luma(rgb), "L")
        if alpha_8 is None:
            return luma
        return Image.merge("LA", (luma, Image.fromarray(alpha_8, "L")))
    if alpha_8 is None:
        return Image.fromarray(rgb, "RGB")
    return Image.fromarray(np.dstack([rgb, alpha_8]), "RGBA")


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) uint8 grey, ITU-R 601 luma (equal channels are kept)."""
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.uint8)


def _save_pillow(pil: Image.Image, fmt: str, image: DecodedImage, quality: int) -> bytes:
    options: dict[str, object] = {}
    if image.icc_profile:
        options["icc_profile"] = image.icc_profile
    if image.exif:
        options["exif"] = image.exif
    if fmt == "jpeg":
        options.update(quality=quality)
    elif fmt == "webp":
        lossless = image.webp_lossless and image.format == "webp"
        options.update(quality=quality, lossless=lossless)
    elif fmt in ("heic", "avif"):
        options.update(quality=quality)
    out = io.BytesIO()
    pil.save(out, format=PILLOW_FORMATS[fmt], **options)
    return out.getvalue()


def _encode_png16(image: DecodedImage, rgb: np.ndarray, alpha: np.ndarray | None) -> bytes:
    """16-bit PNG: the 8-bit change added to the 16-bit original, so untouched pixels are exact.

    When upscaled there is no original to add to: the 8-bit result is widened (x 257).
    """
    assert image.high_bit is not None
    target = _luma(rgb) if image.grey else rgb  # (H', W') or (H', W', 3) uint8
    source = image.rgb[..., 0] if image.grey else image.rgb
    if target.shape == source.shape:
        change = target.astype(np.int32) - source.astype(np.int32)
        out16 = np.clip(image.high_bit.astype(np.int32) + change * 257, 0, 65535).astype(np.uint16)
    else:
        out16 = target.astype(np.uint16) * 257
    if alpha is not None and alpha.dtype != np.uint16:
        alpha = alpha.astype(np.uint16) * 257
    if image.grey and alpha is None:
        # Pillow writes 16-bit grey PNGs natively.
        pil = Image.fromarray(out16)
        return _save_pillow(pil, "png", image, quality=DEFAULT_QUALITY)  # unused by PNG
    # 16-bit colour (or grey+alpha, written as RGBA with equal channels): OpenCV, BGR order.
    channels = [out16] * 3 if image.grey else [out16[..., 2], out16[..., 1], out16[..., 0]]
    if alpha is not None:
        channels.append(alpha)
    ok, encoded = cv2.imencode(".png", np.dstack(channels))
    if not ok:
        raise ImageEncodeError("OpenCV could not encode the 16-bit PNG")
    chunks = []
    if image.icc_profile:
        chunks.append(_png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(image.icc_profile)))
    if image.exif:
        chunks.append(_png_chunk(b"eXIf", _exif_payload(image.exif)))
    return _png_insert_after_header(encoded.tobytes(), chunks)


def _exif_payload(exif: bytes) -> bytes:
    # Pillow's EXIF bytes start with the JPEG APP1 marker text; PNG's eXIf holds the TIFF part.
    return exif[6:] if exif.startswith(b"Exif\x00\x00") else exif


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_insert_after_header(png: bytes, chunks: list[bytes]) -> bytes:
    """Insert ancillary chunks right after IHDR (iCCP and eXIf must precede the image data)."""
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + b"".join(chunks) + png[end_of_ihdr:]
