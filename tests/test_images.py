"""Image files: allow-list, limits, decoding faithfully and writing back what the user sent."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from model.errors import (
    ImageDecodeError,
    ImageTooLargeError,
    InvalidInputError,
    UnsupportedFormatError,
)
from model.media.codecs.decode import apply_orientation, decode_image
from model.media.codecs.encode import encode_image
from model.media.codecs.formats import ImageLimits, normalize_format, sniff_format
from tests.photo_variants import (
    decode_output,
    gradient_alpha,
    load_rgb,
    png_16bit,
    png_header_only,
    save,
    srgb_profile,
    widen_to_16bit,
    with_orientation,
)

LIMITS = ImageLimits(max_bytes=20_000_000, max_pixels=40_000_000, max_output_pixels=64_000_000)


@pytest.fixture(scope="module")
def photo(assets: Path) -> np.ndarray:
    """A real photo, (H, W, 3) uint8 RGB, cut to 300x240 to keep encoding fast."""
    return np.ascontiguousarray(load_rgb(assets / "images/gfpgan/whole_imgs/10045.png")[:300, :240])


# --- formats and limits --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_allowed_formats_decode(photo: np.ndarray, fmt: str) -> None:
    data = save(Image.fromarray(photo), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    image = decode_image(data, LIMITS)
    assert image.format == fmt.lower()
    assert image.rgb.shape == photo.shape and image.rgb.dtype == np.uint8
    assert image.alpha is None and not image.grey
    if fmt != "JPEG":
        np.testing.assert_array_equal(image.rgb, photo)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP"])
def test_other_image_formats_are_unsupported(photo: np.ndarray, fmt: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=fmt.lower()):
        decode_image(save(Image.fromarray(photo), fmt), LIMITS)


@pytest.mark.parametrize(
    "data",
    [
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        b"hello, this is text",
        bytes(range(256)) * 4,
    ],
)
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedFormatError):
        decode_image(data, LIMITS)


def test_allow_list_is_configurable(photo: np.ndarray) -> None:
    only_png = ImageLimits(10**7, 10**7, 10**7, allowed_formats=("png",))
    with pytest.raises(UnsupportedFormatError, match="jpeg"):
        decode_image(save(Image.fromarray(photo), "JPEG"), only_png)


def test_empty_file_is_a_decode_error() -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(b"", LIMITS)


def test_byte_limit_checked_before_decoding(photo: np.ndarray) -> None:
    data = save(Image.fromarray(photo), "PNG")
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(data, ImageLimits(len(data) - 1, 10**8, 10**8))
    assert decode_image(data, ImageLimits(len(data), 10**8, 10**8)).width == photo.shape[1]


def test_decompression_bomb_header_is_refused() -> None:
    bomb = png_header_only(100_000, 100_000)  # 10^10 pixels claimed in 100 bytes
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError, match=r"over the 40000000 limit$"):
        decode_image(bomb, LIMITS)


@pytest.mark.parametrize("side", [10_000, 100_000])  # past Pillow's warning, past its error
def test_pillow_bomb_guard_speaks_with_our_limit_even_when_warnings_are_errors(side: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageTooLargeError, match=r"over the 40000000 limit$"):
            decode_image(png_header_only(side, side), LIMITS)


def test_pixel_limit_read_from_header(photo: np.ndarray) -> None:
    data = save(Image.fromarray(photo), "PNG")
    pixels = photo.shape[0] * photo.shape[1]
    # Just over the limit: below Pillow's own guard (2x), so our header check must catch it.
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(data, ImageLimits(10**8, pixels - 1, 10**8))
    assert decode_image(data, ImageLimits(10**8, pixels, 10**8)).height == photo.shape[0]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_file_is_a_decode_error(photo: np.ndarray, fmt: str) -> None:
    data = save(Image.fromarray(photo), fmt)
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2], LIMITS)


def test_sniffing_ignores_the_name_and_reads_bytes(photo: np.ndarray) -> None:
    assert sniff_format(save(Image.fromarray(photo), "PNG")) == "png"
    assert sniff_format(save(Image.fromarray(photo), "JPEG")) == "jpeg"
    assert sniff_format(save(Image.fromarray(photo), "WEBP")) == "webp"
    assert normalize_format("JPG") == "jpeg" and normalize_format(".png") == "png"
    with pytest.raises(InvalidInputError):
        normalize_format("gif")


# --- orientation ---------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pillow(orientation: int) -> None:
    array = np.random.default_rng(orientation).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    reference = save(image, "PNG", exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(reference))))
    np.testing.assert_array_equal(apply_orientation(array, orientation), expected)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_applied_and_tag_dropped(photo: np.ndarray, orientation: int) -> None:
    image = decode_image(with_orientation(photo, orientation), LIMITS)
    np.testing.assert_array_equal(image.rgb, photo)  # upright, as a viewer shows it
    out = decode_output(encode_image(image, image.rgb))
    assert out.size == (photo.shape[1], photo.shape[0])
    assert out.getexif().get(0x0112, 1) == 1
    assert out.getexif().get(0x010F) == "osdface-tests"  # the rest of the EXIF is kept
    np.testing.assert_array_equal(np.asarray(out), photo)


def test_exif_orientation_in_jpeg(photo: np.ndarray) -> None:
    image = decode_image(with_orientation(photo, 6, "JPEG"), LIMITS)
    assert image.rgb.shape == photo.shape
    assert np.abs(image.rgb.astype(int) - photo).mean() < 4  # JPEG loss only


# --- alpha, grey, palette ------------------------------------------------------------------


def test_alpha_kept_unchanged(photo: np.ndarray) -> None:
    alpha = gradient_alpha(*photo.shape[:2])
    data = save(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), "PNG")
    image = decode_image(data, LIMITS)
    np.testing.assert_array_equal(image.rgb, photo)
    np.testing.assert_array_equal(image.alpha, alpha)
    changed = 255 - image.rgb
    out = decode_output(encode_image(image, changed))
    assert out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[..., 3], alpha)
    np.testing.assert_array_equal(np.asarray(out)[..., :3], changed)


def test_alpha_resized_when_upscaled(photo: np.ndarray) -> None:
    alpha = gradient_alpha(*photo.shape[:2])
    image = decode_image(save(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), "PNG"), LIMITS)
    big = cv2.resize(photo, None, fx=2, fy=2, interpolation=cv2.INTER_LANCZOS4)
    out = decode_output(encode_image(image, big))
    assert out.mode == "RGBA" and out.size == (2 * photo.shape[1], 2 * photo.shape[0])
    expected = cv2.resize(alpha, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    assert np.abs(np.asarray(out)[..., 3].astype(int) - expected).mean() < 2


def test_alpha_to_jpeg_is_composited_over_white(photo: np.ndarray) -> None:
    alpha = gradient_alpha(*photo.shape[:2])
    image = decode_image(save(Image.fromarray(np.dstack([photo, alpha]), "RGBA"), "PNG"), LIMITS)
    out = decode_output(encode_image(image, image.rgb, format="jpeg"))
    assert out.format == "JPEG" and out.mode == "RGB"
    corner = np.asarray(out)[:10, :10]  # fully transparent there
    assert corner.min() > 245


def test_alpha_in_lossless_webp(photo: np.ndarray) -> None:
    alpha = gradient_alpha(*photo.shape[:2])
    rgba = Image.fromarray(np.dstack([photo, alpha]), "RGBA")
    image = decode_image(save(rgba, "WEBP", lossless=True), LIMITS)
    assert image.webp_lossless
    out_bytes = encode_image(image, image.rgb)
    assert out_bytes[12:16] == b"VP8L" or b"VP8L" in out_bytes[:64]  # stays lossless
    out = decode_output(out_bytes)
    np.testing.assert_array_equal(np.asarray(out)[..., 3], alpha)


def test_grey_stays_grey(photo: np.ndarray) -> None:
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    image = decode_image(save(Image.fromarray(grey, "L"), "PNG"), LIMITS)
    assert image.grey
    for channel in range(3):
        np.testing.assert_array_equal(image.rgb[..., channel], grey)
    tinted = image.rgb.copy()
    tinted[..., 0] = 255  # a restorer that adds colour must not colourise the output
    out = decode_output(encode_image(image, image.rgb))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), grey)
    assert decode_output(encode_image(image, tinted)).mode == "L"
    assert decode_output(encode_image(image, image.rgb, format="jpeg")).mode == "L"


def test_grey_with_alpha_stays_la(photo: np.ndarray) -> None:
    grey = np.asarray(Image.fromarray(photo).convert("L"))
    alpha = gradient_alpha(*grey.shape)
    la = Image.merge("LA", (Image.fromarray(grey), Image.fromarray(alpha)))
    image = decode_image(save(la, "PNG"), LIMITS)
    out = decode_output(encode_image(image, image.rgb))
    assert out.mode == "LA"
    np.testing.assert_array_equal(np.asarray(out)[..., 0], grey)
    np.testing.assert_array_equal(np.asarray(out)[..., 1], alpha)


def test_palette_becomes_rgb_or_rgba(photo: np.ndarray) -> None:
    palette = Image.fromarray(photo).quantize(64)
    expected = np.asarray(palette.convert("RGB"))
    image = decode_image(save(palette, "PNG"), LIMITS)
    assert image.mode == "P" and image.alpha is None
    np.testing.assert_array_equal(image.rgb, expected)
    assert decode_output(encode_image(image, image.rgb)).mode == "RGB"

    index = int(np.asarray(palette)[0, 0])
    transparent = save(palette, "PNG", transparency=index)
    image = decode_image(transparent, LIMITS)
    assert image.alpha is not None
    np.testing.assert_array_equal(image.alpha == 0, np.asarray(palette) == index)
    assert decode_output(encode_image(image, image.rgb)).mode == "RGBA"


# --- 16 bits, CMYK, ICC ----------------------------------------------------------------------


def _png_depth_and_colour(data: bytes) -> tuple[int, int]:
    return data[24], data[25]


def test_16bit_grey_written_back_in_16_bits(photo: np.ndarray) -> None:
    grey16 = widen_to_16bit(np.asarray(Image.fromarray(photo).convert("L")))
    image = decode_image(png_16bit(grey16), LIMITS)
    assert image.grey and image.rgb.dtype == np.uint8
    np.testing.assert_array_equal(image.rgb[..., 0], np.rint(grey16 / 257.0).astype(np.uint8))
    data = encode_image(image, image.rgb)
    assert _png_depth_and_colour(data) == (16, 0)
    np.testing.assert_array_equal(np.asarray(decode_output(data)), grey16)  # exact, all 16 bits

    changed = image.rgb.copy()
    changed[:50, :50] = np.clip(changed[:50, :50].astype(int) + 10, 0, 255).astype(np.uint8)
    out = np.asarray(decode_output(encode_image(image, changed))).astype(np.int64)
    np.testing.assert_array_equal(out[50:], grey16[50:])
    step = changed[:50, :50, 0].astype(np.int64) - image.rgb[:50, :50, 0]
    expected = np.clip(grey16[:50, :50].astype(np.int64) + 257 * step, 0, 65535)
    np.testing.assert_array_equal(out[:50, :50], expected)


@pytest.mark.parametrize("with_alpha", [False, True])
def test_16bit_colour_written_back_in_16_bits(photo: np.ndarray, with_alpha: bool) -> None:
    rgb16 = widen_to_16bit(photo)
    alpha16 = widen_to_16bit(gradient_alpha(*photo.shape[:2]), seed=1)
    samples = np.dstack([rgb16, alpha16]) if with_alpha else rgb16
    image = decode_image(png_16bit(samples), LIMITS)
    assert not image.grey
    np.testing.assert_array_equal(image.rgb, np.rint(rgb16 / 257.0).astype(np.uint8))
    data = encode_image(image, image.rgb)
    assert _png_depth_and_colour(data) == (16, 6 if with_alpha else 2)
    back = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    back = np.concatenate([back[..., 2::-1], back[..., 3:]], axis=2)  # BGR(A) -> RGB(A)
    np.testing.assert_array_equal(back, samples)


def test_cmyk_jpeg_becomes_rgb_jpeg(photo: np.ndarray) -> None:
    cmyk = Image.fromarray(photo).convert("CMYK")
    data = save(cmyk, "JPEG", quality=95)
    image = decode_image(data, LIMITS)
    assert image.mode == "CMYK"
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(image.rgb, reference)
    assert np.abs(image.rgb.astype(int) - photo).mean() < 6  # close to the photo it came from
    out = decode_output(encode_image(image, image.rgb))
    assert out.format == "JPEG" and out.mode == "RGB"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_icc_profile_kept(photo: np.ndarray, fmt: str) -> None:
    profile = srgb_profile()
    image = decode_image(save(Image.fromarray(photo), fmt, icc_profile=profile), LIMITS)
    assert image.icc_profile == profile
    out = decode_output(encode_image(image, image.rgb))
    assert out.info.get("icc_profile") == profile


def test_icc_profile_kept_in_16bit_png(photo: np.ndarray) -> None:
    grey16 = widen_to_16bit(photo)
    profile = srgb_profile()
    image = decode_image(png_16bit(grey16), LIMITS)
    image.icc_profile = profile
    out = decode_output(encode_image(image, image.rgb))
    assert out.info.get("icc_profile") == profile


def test_output_format_and_quality(photo: np.ndarray) -> None:
    image = decode_image(save(Image.fromarray(photo), "PNG"), LIMITS)
    for fmt in ("jpeg", "png", "webp"):
        assert decode_output(encode_image(image, image.rgb, format=fmt)).format == fmt.upper()
    small = encode_image(image, image.rgb, format="jpeg", quality=20)
    large = encode_image(image, image.rgb, format="jpeg", quality=95)
    assert len(small) < len(large)
    with pytest.raises(InvalidInputError):
        encode_image(image, image.rgb, quality=0)
    with pytest.raises(InvalidInputError):
        encode_image(image, image.rgb, format="gif")
    with pytest.raises(InvalidInputError):
        encode_image(image, image.rgb[..., 0])
