"""Image files in and out: sniffing, limits, decoding to RGB uint8, and writing back faithfully.

Everything inside the model works on `(H, W, 3)` uint8 RGB with the EXIF orientation already
applied. This module is the one place that knows about files, and it keeps what is needed to
give the user back the kind of file they sent:

- alpha is split off before processing and re-attached unchanged (resized when upscaled);
- grey input (`1`, `L`, `LA`, 16-bit grey) is processed as RGB with equal channels and written
  back grey;
- 16-bit PNGs are processed in 8 bits and written back in 16 bits: unchanged pixels keep their
  exact 16-bit values, changed ones get the 8-bit change added to the 16-bit original;
- palette (`P`) input comes back as RGB, or RGBA when the palette has transparency;
- CMYK JPEGs are converted to sRGB (through their ICC profile when they carry one) and come back
  as RGB JPEGs with an sRGB profile;
- the ICC profile and EXIF (minus the orientation tag, which has been applied) are written back.

Decoding is guarded: the byte count is checked before anything is parsed, the pixel count from
the header before any pixel is decoded, and Pillow's own decompression-bomb guard is set too.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps

from model.errors import (
    ImageDecodeError,
    ImageEncodeError,
    ImageTooLargeError,
    InvalidInputError,
    UnsupportedFormatError,
)

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("jpeg", "png", "webp")
CONTENT_TYPES: dict[str, str] = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
EXTENSIONS: dict[str, str] = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_FORMAT_ALIASES: dict[str, str] = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}
_PILLOW_FORMATS: dict[str, str] = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Everything Pillow or a codec raises on a broken file; mapped to ImageDecodeError at one place.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on what a caller may send and receive (decompression-bomb guards)."""

    max_bytes: int
    max_pixels: int
    max_output_pixels: int
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
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    others = {b"GIF87a": "gif", b"GIF89a": "gif", b"II*\x00": "tiff", b"MM\x00*": "tiff"}
    for magic, name in others.items():
        if data.startswith(magic):
            return name
    if data.startswith(b"BM"):
        return "bmp"
    raise UnsupportedFormatError("the file is not a recognised image (expected JPEG, PNG or WebP)")


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
    image = _open_checked(data, fmt, limits)
    if fmt == "png" and _png_bit_depth(data) == 16 and image.mode not in ("I;16", "I;16B", "I"):
        # Pillow reads 16-bit colour PNGs as 8 bits; OpenCV keeps the 16 bits.
        return _decode_png16_colour(data, image)
    return _decode_pillow(data, fmt, image)


def _open_checked(data: bytes, fmt: str, limits: ImageLimits) -> Image.Image:
    """Open lazily (header only), check the pixel count, then force the full decode."""
    _guard_pillow(limits.max_pixels)
    try:
        image = Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[fmt]])
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"the image header claims too many pixels: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot read the {fmt} header: {exc}") from exc
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
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"the {fmt} data is truncated or corrupt: {exc}") from exc
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
    exif = _exif_without_orientation(image)
    icc = image.info.get("icc_profile") or None
    try:
        image = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"the EXIF orientation cannot be applied: {exc}") from exc
    alpha: np.ndarray | None = None
    high_bit: np.ndarray | None = None
    grey = source_mode in ("1", "L", "LA", "La", "I;16", "I;16B", "I")
    if source_mode in ("I;16", "I;16B", "I"):
        high_bit = np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)
        rgb = np.repeat(_to_8bit(high_bit)[..., None], 3, axis=2)
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
        exif=exif,
        data=data,
        webp_lossless=fmt == "webp" and _webp_is_lossless(data),
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
    orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    decoded = apply_orientation(decoded, orientation)
    colour_type = data[25]
    alpha = decoded[..., 3].copy() if decoded.shape[2] == 4 else None
    rgb16 = np.ascontiguousarray(decoded[..., 2::-1])  # OpenCV's BGR -> RGB
    grey = colour_type == 4
    high_bit = rgb16[..., 0].copy() if grey else rgb16
    return DecodedImage(
        rgb=_to_8bit(rgb16),
        alpha=alpha,
        format="png",
        mode=f"{'LA' if grey else 'RGBA' if alpha is not None else 'RGB'};16",
        grey=grey,
        high_bit=high_bit,
        icc_profile=image.info.get("icc_profile") or None,
        exif=_exif_without_orientation(image),
        data=data,
    )


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


def _to_8bit(samples: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 by rounding (65535 -> 255 exactly)."""
    return ((samples.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _exif_without_orientation(image: Image.Image) -> bytes | None:
    """The EXIF block to write back: unchanged, or re-serialised without the orientation tag."""
    raw = image.info.get("exif")
    if not raw:
        return None
    exif = Image.Exif()  # a copy: the image's own Exif must keep the tag for exif_transpose
    exif.load(raw)
    if _EXIF_ORIENTATION not in exif:
        return raw
    del exif[_EXIF_ORIENTATION]
    return exif.tobytes()


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


# --- encoding ------------------------------------------------------------------------------


def encode_image(
    image: DecodedImage, rgb: np.ndarray, *, format: str | None = None, quality: int = 95
) -> bytes:
    """Write `rgb` back as a file like `image`'s: its mode, alpha, bit depth, ICC profile, EXIF.

    `rgb` is (H', W', 3) uint8 RGB: the processed pixels, the size of `image` or larger when
    upscaled (alpha is then resized with Lanczos). `format` defaults to the input's. JPEG has no
    alpha: the image is composited over white. WebP has no grey mode: grey is written as RGB.
    """
    fmt = normalize_format(format) if format else image.format
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
    pil = _to_pillow(rgb, alpha, grey=image.grey and fmt != "webp")
    return _save_pillow(pil, fmt, image, quality)


def _resize_channel(channel: np.ndarray, width: int, height: int) -> np.ndarray:
    if channel.shape[:2] == (height, width):
        return channel
    return cv2.resize(channel, (width, height), interpolation=cv2.INTER_LANCZOS4)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / float(np.iinfo(alpha.dtype).max)
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def _to_pillow(rgb: np.ndarray, alpha: np.ndarray | None, *, grey: bool) -> Image.Image:
    alpha_8 = None if alpha is None else (alpha if alpha.dtype == np.uint8 else _to_8bit(alpha))
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
    out = io.BytesIO()
    pil.save(out, format=_PILLOW_FORMATS[fmt], **options)
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
        return _save_pillow(pil, "png", image, quality=95)
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
