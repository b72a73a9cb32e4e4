"""Decoding an image file to (H, W, 3) uint8 RGB with EXIF orientation applied, within limits.

Decoding is guarded: the byte count is checked before anything is parsed, the pixel count from
the header before any pixel is decoded, and Pillow's own decompression-bomb guard is set too.
"""

from __future__ import annotations

import io
import logging
import re
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageCms

from model.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedFormatError,
)
from model.media.codecs.formats import (
    DECODE_ERRORS,
    EXIF_ORIENTATION,
    PILLOW_FORMATS,
    DecodedImage,
    ImageLimits,
    sniff_format,
)
from model.media.codecs.heif import readable

logger = logging.getLogger(__name__)


def decode_image(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decode an uploaded file into RGB uint8, applying EXIF orientation, within `limits`.

    Raises ImageTooLargeError (bytes, or pixels read from the header before decoding),
    UnsupportedFormatError (not on the allow-list) and ImageDecodeError (truncated, corrupt).
    """
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"the file has {len(data)} bytes, over the {limits.max_bytes} limit"
        )
    fmt = sniff_format(data)
    if fmt not in limits.allowed_formats:
        allowed = ", ".join(limits.allowed_formats)
        raise UnsupportedFormatError(f"{fmt} images are not accepted (allowed: {allowed})")
    if fmt in ("heic", "avif") and not readable(fmt):
        raise UnsupportedFormatError(f"this server has no {fmt} decoder")
    image = _open_checked(data, fmt, limits)
    if fmt == "png" and _png_bit_depth(data) == 16 and image.mode not in ("I;16", "I;16B", "I"):
        # Pillow reads 16-bit colour PNGs as 8 bits; OpenCV keeps the 16 bits.
        return _decode_png16_colour(data, image)
    return _decode_pillow(data, fmt, image)


def _words(exc: BaseException) -> str:
    """Pillow's message without its internals: the count of bytes it did not process, the
    repr of the in-memory file."""
    text = re.sub(r"\s*\(\d+ bytes not processed\)", "", str(exc))
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", text)
    return text.strip() or type(exc).__name__


def _open_checked(data: bytes, fmt: str, limits: ImageLimits) -> Image.Image:
    """Open lazily (header only), check the pixel count, then force the full decode."""
    _guard_pillow(limits.max_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=[PILLOW_FORMATS[fmt]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's guard (twice its own limit, or its warning where warnings are errors) fired
        # before our check could: the same refusal, in our words, with the configured limit.
        raise ImageTooLargeError(
            f"the image header claims too many pixels, over the {limits.max_pixels} limit"
        ) from exc
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot read the {fmt} header: {_words(exc)}") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"the image is {width}x{height} = {width * height} pixels, "
            f"over the {limits.max_pixels} limit"
        )
    if width == 0 or height == 0:
        raise ImageDecodeError("the image has no pixels")
    try:
        image.load()
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"the {fmt} data is truncated or corrupt: {_words(exc)}") from exc
    if getattr(image, "n_frames", 1) > 1:
        logger.info("animated %s: only the first frame is processed", fmt)
    return image


def _guard_pillow(max_pixels: int) -> None:
    """Keep Pillow's own bomb guard on, never below our limit.

    It is process-wide, so it is only ever raised (to our limit), never lowered: lowering it
    would make Pillow refuse images elsewhere in the process that our limits accept. Pillow
    raises past twice its guard; our header check raises past the limit itself.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _decode_pillow(data: bytes, fmt: str, image: Image.Image) -> DecodedImage:
    source_mode = image.mode
    quality = jpeg_quality(image) if fmt == "jpeg" else None  # before a transpose drops the tables
    meta = read_metadata(image)
    icc = meta.icc
    try:
        image = _transpose(image, meta.orientation)
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"the EXIF orientation cannot be applied: {_words(exc)}") from exc
    alpha: np.ndarray | None = None
    high_bit: np.ndarray | None = None
    grey = source_mode in ("1", "L", "LA", "La", "I;16", "I;16B", "I")
    if source_mode in ("I;16", "I;16B", "I"):
        high_bit = np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
        rgb = np.repeat(to_8bit(high_bit)[..., None], 3, axis=2)
    elif grey:
        if source_mode in ("LA", "La"):
            alpha = np.asarray(image.getchannel("A"), dtype=np.uint8).copy()
        grey_8 = np.asarray(image.convert("L"), dtype=np.uint8)
        rgb = np.repeat(grey_8[..., None], 3, axis=2)
    elif source_mode == "CMYK":
        rgb, icc = _cmyk_to_srgb(image, icc)
    else:
        if _has_alpha(image):
            image = image.convert("RGBA")
            alpha = np.asarray(image.getchannel("A"), dtype=np.uint8).copy()
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return DecodedImage(
        rgb=np.ascontiguousarray(rgb),
        alpha=alpha,
        format=fmt,
        mode=source_mode,
        grey=grey,
        high_bit=high_bit,
        icc_profile=icc,
        exif=meta.exif,
        data=data,
        webp_lossless=fmt == "webp" and _webp_is_lossless(data),
        dropped_metadata=meta.dropped,
        jpeg_quality=quality,
    )


def _has_alpha(image: Image.Image) -> bool:
    if image.mode in ("RGBA", "RGBa", "PA"):
        return True
    return image.mode == "P" and "transparency" in image.info


def _cmyk_to_srgb(image: Image.Image, icc: bytes | None) -> tuple[np.ndarray, bytes | None]:
    """CMYK -> sRGB: through the file's CMYK profile when it has one, else Pillow's formula.

    The output carries an sRGB profile (the CMYK one no longer describes the pixels), or none.
    """
    if icc is not None:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
            assert converted is not None  # inPlace=False always returns an image
            return np.asarray(converted, dtype=np.uint8), ImageCms.ImageCmsProfile(srgb).tobytes()
        except (ImageCms.PyCMSError, OSError) as exc:
            # A broken profile should not lose the user's photo: the plain formula is close.
            logger.warning("CMYK ICC profile unusable (%s); converting without it", exc)
    return np.asarray(image.convert("RGB"), dtype=np.uint8), None


def _decode_png16_colour(data: bytes, image: Image.Image) -> DecodedImage:
    """16-bit RGB, RGBA or grey+alpha PNG through OpenCV, oriented like Pillow would."""
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.dtype != np.uint16 or decoded.ndim != 3:
        raise ImageDecodeError("the 16-bit PNG data is corrupt")
    meta = read_metadata(image)
    decoded = apply_orientation(decoded, meta.orientation)
    colour_type = data[25]
    alpha = decoded[..., 3].copy() if decoded.shape[2] == 4 else None
    rgb16 = np.ascontiguousarray(decoded[..., 2::-1])  # OpenCV's BGR -> RGB
    grey = colour_type == 4
    high_bit = rgb16[..., 0].copy() if grey else rgb16
    return DecodedImage(
        rgb=to_8bit(rgb16),
        alpha=alpha,
        format="png",
        mode=f"{'LA' if grey else 'RGBA' if alpha is not None else 'RGB'};16",
        grey=grey,
        high_bit=high_bit,
        icc_profile=meta.icc,
        exif=meta.exif,
        data=data,
        dropped_metadata=meta.dropped,
    )


# The IJG (libjpeg) luminance quantisation table at quality 50, row by row (natural order, the
# order Pillow's `quantization` lists): the JPEG standard's Annex K table.
_IJG_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.int64,
).ravel()


def ijg_luminance_table(quality: int) -> np.ndarray:
    """The (64,) luminance table libjpeg writes at `quality` 1..100 (baseline: 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((_IJG_LUMINANCE * scale + 50) // 100, 1, 255)


def jpeg_quality(image: Image.Image) -> int | None:
    """The IJG quality 1..100 whose luminance table is nearest the JPEG's own (sum of absolute
    differences; ties go to the higher quality); None without a readable 64-entry table.

    Exact for files written by libjpeg (Pillow, OpenCV, most software); for a camera's own
    tables, the quality that quantises about as coarsely.
    """
    tables = getattr(image, "quantization", None) or {}
    table = tables.get(0)
    if table is None or len(table) != 64:
        return None
    own = np.asarray(table, dtype=np.int64)
    errors = [int(np.abs(ijg_luminance_table(q) - own).sum()) for q in range(100, 0, -1)]
    return 100 - int(np.argmin(errors))


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an (H, W, ...) array, as ImageOps.exif_transpose does."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(ops.get(orientation, ops[1])(array))


def to_8bit(samples: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 by rounding (65535 -> 255 exactly)."""
    return ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


@dataclass(frozen=True)
class _Metadata:
    """What the file's metadata contributes: orientation 1..8, the EXIF block to write back
    (orientation tag removed), the ICC profile, and the names of blocks dropped as unreadable."""

    orientation: int = 1
    exif: bytes | None = None
    icc: bytes | None = None
    dropped: tuple[str, ...] = ()


# Pillow's EXIF reader raises whatever the malformed block provokes (SyntaxError for a block
# that is not TIFF, TypeError/ValueError for mistyped tags, struct.error for short ones):
# metadata is never worth losing the photo over, so any failure drops that block.
_METADATA_ERRORS = (Exception,)

# Pillow's transposition for each EXIF orientation (what ImageOps.exif_transpose applies).
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def read_metadata(image: Image.Image) -> _Metadata:
    """Parse EXIF and ICC defensively: an unreadable block is dropped (and logged), never fatal.

    An orientation that is not an integer 1..8 counts as absent (1).
    """
    dropped: list[str] = []
    icc = image.info.get("icc_profile") or None
    if icc is not None and not isinstance(icc, bytes):
        _log_dropped("icc", "not a byte string")
        icc, dropped = None, ["icc"]
    raw = image.info.get("exif") or None
    orientation = 1
    if raw is not None:
        try:
            exif = Image.Exif()  # a copy, separate from the image's own
            exif.load(raw)
            orientation = _orientation(exif.get(EXIF_ORIENTATION, 1))
            if EXIF_ORIENTATION in exif:
                del exif[EXIF_ORIENTATION]
                raw = exif.tobytes()
        except _METADATA_ERRORS as exc:
            _log_dropped("exif", f"{type(exc).__name__}: {exc}")
            raw = None  # an orientation read before the failure is still applied
            dropped.append("exif")
    return _Metadata(orientation, raw, icc, tuple(dropped))


def _orientation(value: object) -> int:
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _transpose(image: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return image if method is None else image.transpose(method)


_logged_drops: set[str] = set()


def _log_dropped(block: str, why: str) -> None:
    """Log an unreadable metadata block once per kind and cause; the photo goes on without it."""
    key = f"{block}:{why.split(':')[0]}"
    if key not in _logged_drops:
        _logged_drops.add(key)
        logger.warning("unreadable %s metadata dropped (%s); logged once per kind", block, why)


def _png_bit_depth(data: bytes) -> int:
    # IHDR is always the first chunk: signature (8), length (4), type (4), width, height, depth.
    return data[24] if len(data) > 25 and data[12:16] == b"IHDR" else 8


def _webp_is_lossless(data: bytes) -> bool:
    """True when the first image chunk of a WebP file is VP8L (lossless)."""
    offset = 12
    while offset + 8 <= len(data):
        tag = data[offset : offset + 4]
        if tag in (b"VP8L", b"VP8 "):
            return tag == b"VP8L"
        size = struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        offset += 8 + size + (size & 1)
    return False
