"""Whole photos end to end: detect, align, restore in one batch, paste back, write the file.

The restorer here is mostly the identity (it returns its input crops): then the output must
reproduce the input photo, which tests the geometry and the mask, the part this module owns.
One test runs the real OSDFace restorer with tiny random weights.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model.errors import ImageTooLargeError, InvalidInputError, ModelOutputError
from model.media.codecs.formats import ImageLimits
from model.media.faces.align import FACE_SIZE
from model.media.faces.detect import FaceDetector
from model.media.faces.paste import paste_faces
from model.media.pipeline import (
    PreparedPhoto,
    RestoreOptions,
    finish_photo,
    prepare_photo,
    restore_photo,
)
from tests.photo_variants import (
    WHOLE_PHOTOS,
    border_cut,
    decode_output,
    detector_weights_dir,
    gradient_alpha,
    grey_restorer,
    identity_restorer,
    load_rgb,
    png_16bit,
    psnr,
    save,
    two_overlapping_faces,
    widen_to_16bit,
    with_orientation,
)

LIMITS = ImageLimits(max_bytes=20_000_000, max_pixels=40_000_000, max_output_pixels=64_000_000)
EXAMPLE = "vqfr/whole_imgs/example.jpg"  # 800x450, 3 faces: the small photo for variants


@pytest.fixture(scope="module")
def detector(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> FaceDetector:
    weights = detector_weights_dir(assets, tmp_path_factory.mktemp("detector-weights"))
    return FaceDetector.load(weights, "retinaface_mobile0.25", "cpu", threshold=0.97)


@pytest.fixture(scope="module")
def example(assets: Path) -> np.ndarray:
    return load_rgb(assets / "images" / EXAMPLE)


def _png(rgb: np.ndarray) -> bytes:
    return save(Image.fromarray(rgb), "PNG")


def _footprints(prepared: PreparedPhoto, scale: int = 1, grow: int = 2) -> np.ndarray:
    """(H', W') bool: where each 512 crop lands in the output (its corners through the inverse
    affine, filled, grown by `grow` px for interpolation). Computed here, apart from the code."""
    height, width = prepared.image.height * scale, prepared.image.width * scale
    covered = np.zeros((height, width), np.uint8)
    corners = np.array([[0, 0], [FACE_SIZE, 0], [FACE_SIZE, FACE_SIZE], [0, FACE_SIZE]], float)
    for affine in prepared.affines:
        inverse = cv2.invertAffineTransform(affine)
        polygon = (corners @ inverse[:, :2].T + inverse[:, 2]) * scale
        cv2.fillConvexPoly(covered, np.rint(polygon).astype(np.int32), 1)
    kernel = np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)
    return cv2.dilate(covered, kernel).astype(bool)


def _restored_with(prepared: PreparedPhoto, restorer: Callable[[torch.Tensor], Any]) -> np.ndarray:
    """The output pixels after restoring the prepared faces with `restorer`."""
    return np.asarray(decode_output(finish_photo(prepared, restorer(prepared.crops).images).data))


def _round_trip(
    data: bytes, detector: FaceDetector, **options: object
) -> tuple[PreparedPhoto, Image.Image]:
    prepared = prepare_photo(data, detector, RestoreOptions(**options), LIMITS)  # type: ignore[arg-type]
    result = finish_photo(prepared, identity_restorer(prepared.crops).images)
    assert len(result.faces) == prepared.crops.shape[0]
    out = decode_output(result.data)
    assert out.size == (result.width, result.height)
    return prepared, out


# --- round trip on the real photos ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WHOLE_PHOTOS))
def test_identity_round_trip_reproduces_the_photo(
    detector: FaceDetector, assets: Path, name: str
) -> None:
    rgb = load_rgb(assets / "images" / name)
    prepared, out = _round_trip(_png(rgb), detector)
    assert len(prepared.faces) == WHOLE_PHOTOS[name]
    out_rgb = np.asarray(out)
    assert out.mode == "RGB" and out_rgb.shape == rgb.shape
    outside = ~_footprints(prepared)
    assert outside.mean() > 0.2
    np.testing.assert_array_equal(out_rgb[outside], rgb[outside])  # untouched, bit for bit
    overall = psnr(out_rgb, rgb)
    inside = psnr(out_rgb[~outside], rgb[~outside])
    print(f"{name}: PSNR {overall:.1f} dB overall, {inside:.1f} dB over the pasted regions")
    assert overall >= 35.0


def test_upscaled_round_trip(detector: FaceDetector, example: np.ndarray) -> None:
    prepared, out = _round_trip(_png(example), detector, upscale=2)
    height, width = example.shape[:2]
    assert out.size == (2 * width, 2 * height)
    background = cv2.resize(example, (2 * width, 2 * height), interpolation=cv2.INTER_LANCZOS4)
    out_rgb = np.asarray(out)
    outside = ~_footprints(prepared, scale=2)
    np.testing.assert_array_equal(out_rgb[outside], background[outside])
    assert psnr(out_rgb, background) >= 35.0


# --- file variants from the real photos -------------------------------------------------------


def test_exif_rotated_jpeg_comes_back_upright(detector: FaceDetector, example: np.ndarray) -> None:
    prepared, out = _round_trip(with_orientation(example, 6, "JPEG"), detector)
    assert len(prepared.faces) == 3  # found only if the photo was turned upright first
    assert out.format == "JPEG" and out.size == (example.shape[1], example.shape[0])
    assert out.getexif().get(0x0112, 1) == 1
    assert psnr(np.asarray(out), example) > 30.0  # two JPEG generations


def test_alpha_comes_back_unchanged(detector: FaceDetector, example: np.ndarray) -> None:
    alpha = gradient_alpha(*example.shape[:2])
    data = save(Image.fromarray(np.dstack([example, alpha]), "RGBA"), "PNG")
    prepared = prepare_photo(data, detector, RestoreOptions(), LIMITS)
    out = decode_output(finish_photo(prepared, grey_restorer(prepared.crops).images).data)
    assert len(prepared.faces) == 3 and out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out)[..., 3], alpha)
    # Upscaled: the alpha is resized with the picture.
    prepared = prepare_photo(data, detector, RestoreOptions(upscale=2), LIMITS)
    out = decode_output(finish_photo(prepared, prepared.crops).data)
    assert out.mode == "RGBA" and out.size == (2 * example.shape[1], 2 * example.shape[0])


def test_grey_photo_stays_grey(detector: FaceDetector, example: np.ndarray) -> None:
    grey = np.asarray(Image.fromarray(example).convert("L"))
    data = save(Image.fromarray(grey, "L"), "PNG")
    prepared = prepare_photo(data, detector, RestoreOptions(), LIMITS)
    assert len(prepared.faces) == 3
    colourful = prepared.crops.clone()
    colourful[:, 0] = 1.0  # a restorer that paints faces red must not colourise the photo
    out = decode_output(finish_photo(prepared, colourful).data)
    assert out.mode == "L" and out.size == (grey.shape[1], grey.shape[0])
    _, identity = _round_trip(data, detector)
    assert identity.mode == "L" and psnr(np.asarray(identity), grey) >= 35.0


def test_16bit_photo_stays_16bit(detector: FaceDetector, example: np.ndarray) -> None:
    rgb16 = widen_to_16bit(example)
    prepared, _ = _round_trip(png_16bit(rgb16), detector)
    result = finish_photo(prepared, prepared.crops)
    assert result.data[24] == 16  # PNG bit depth
    back = cv2.imdecode(np.frombuffer(result.data, np.uint8), cv2.IMREAD_UNCHANGED)[..., ::-1]
    outside = ~_footprints(prepared)
    np.testing.assert_array_equal(back[outside], rgb16[outside])  # all 16 bits kept


def test_cmyk_jpeg_comes_back_as_rgb_jpeg(detector: FaceDetector, example: np.ndarray) -> None:
    data = save(Image.fromarray(example).convert("CMYK"), "JPEG", quality=95)
    prepared, out = _round_trip(data, detector)
    assert len(prepared.faces) == 3
    assert out.format == "JPEG" and out.mode == "RGB"
    assert out.size == (example.shape[1], example.shape[0])


def test_face_cut_by_the_border(detector: FaceDetector, example: np.ndarray) -> None:
    """A face whose left part is outside the photo: restored up to the edge, no black edge."""
    right_face = max(detector.detect(example), key=lambda f: f.box[0])
    x1, y1, x2, y2 = right_face.box
    cut = border_cut(example, (x1, y1, x1 + 0.6 * (x2 - x1), y2))  # 30% of the face is gone
    data = _png(cut)
    prepared = prepare_photo(data, detector, RestoreOptions(), LIMITS)
    assert len(prepared.faces) == 1
    grey = _restored_with(prepared, grey_restorer)
    rows = slice(int(y1) + 20, int(y2) - 20)
    assert np.abs(grey[rows, :3].astype(int) - 127.5).max() <= 1  # restored right to the edge
    _, identity = _round_trip(data, detector)
    edge = np.abs(np.asarray(identity)[rows, :3].astype(int) - cut[rows, :3])
    assert edge.mean() < 3 and psnr(np.asarray(identity), cut) >= 35.0


def test_two_overlapping_faces_blend_without_seams(detector: FaceDetector, assets: Path) -> None:
    crops = assets / "images/gfpgan/cropped_faces"
    photo = two_overlapping_faces(
        load_rgb(crops / "Adele_crop.png"), load_rgb(crops / "Justin_Timberlake_crop.png")
    )
    prepared, out = _round_trip(_png(photo), detector)
    assert len(prepared.faces) == 2
    first, second = (_footprints(replace_affines(prepared, [a]), grow=0) for a in prepared.affines)
    assert (first & second).sum() > 2000  # the two crops really overlap
    assert psnr(np.asarray(out), photo) >= 35.0
    assert psnr(np.asarray(out)[first & second], photo[first & second]) >= 35.0
    # Restored to flat grey, everything either face covers fully is grey, including where one
    # face's feathered edge lies over the other: no strip of the original between two pastes.
    grey = _restored_with(prepared, grey_restorer)
    white = np.ones((1, FACE_SIZE, FACE_SIZE, 3), np.float32)
    full = np.zeros(photo.shape[:2], bool)
    for affine in prepared.affines:
        alone = paste_faces(np.zeros_like(photo), list(white), [affine])
        full |= alone.min(axis=2) == 255
    assert (full & first & second).sum() > 1000
    assert np.abs(grey[full].astype(int) - 127.5).max() <= 1


def replace_affines(prepared: PreparedPhoto, affines: list[np.ndarray]) -> PreparedPhoto:
    return PreparedPhoto(prepared.image, prepared.faces, prepared.crops, affines, prepared.options)


# --- options -------------------------------------------------------------------------------


def test_strength_blends_restored_and_original(detector: FaceDetector, example: np.ndarray) -> None:
    data = _png(example)
    prepared = prepare_photo(data, detector, RestoreOptions(strength=0.0), LIMITS)
    out = _restored_with(prepared, grey_restorer)
    np.testing.assert_array_equal(out, example)  # strength 0: exactly the original
    prepared = prepare_photo(data, detector, RestoreOptions(strength=0.5), LIMITS)
    out = _restored_with(prepared, grey_restorer)
    cx, cy = (int(v) for v in prepared.faces[0].center)
    patch = (slice(cy - 5, cy + 5), slice(cx - 5, cx + 5))
    expected = (example[patch].astype(float) + 127.5) / 2
    assert np.abs(out[patch] - expected).max() <= 1.0


def test_only_center_face_and_max_faces(detector: FaceDetector, example: np.ndarray) -> None:
    data = _png(example)
    centre = prepare_photo(data, detector, RestoreOptions(only_center_face=True), LIMITS)
    assert len(centre.faces) == 1
    assert abs(centre.faces[0].center[0] - example.shape[1] / 2) < 100  # the middle picture
    largest = prepare_photo(data, detector, RestoreOptions(max_faces=2), LIMITS)
    everyone = prepare_photo(data, detector, RestoreOptions(), LIMITS)
    assert largest.faces == everyone.faces[:2] and len(everyone.faces) == 3
    assert largest.crops.shape == (2, 3, FACE_SIZE, FACE_SIZE)


def test_aligned_input_skips_detection(assets: Path) -> None:
    crop = load_rgb(assets / "images/gfpgan/cropped_faces/Adele_crop.png")
    data = _png(crop)
    result = restore_photo(data, None, identity_restorer, RestoreOptions(aligned=True), LIMITS)
    assert len(result.faces) == 1
    np.testing.assert_array_equal(np.asarray(decode_output(result.data)), crop)
    result = restore_photo(data, None, grey_restorer, RestoreOptions(aligned=True), LIMITS)
    assert np.abs(np.asarray(decode_output(result.data)).astype(int) - 127.5).max() <= 1
    with pytest.raises(InvalidInputError, match="512"):
        prepare_photo(_png(crop[:500]), None, RestoreOptions(aligned=True), LIMITS)
    with pytest.raises(InvalidInputError, match="detector"):
        prepare_photo(data, None, RestoreOptions(), LIMITS)


def test_no_face_returns_the_original_bytes(detector: FaceDetector) -> None:
    ramp = np.linspace(0, 255, 300 * 200 * 3).reshape(200, 300, 3).astype(np.uint8)
    data = save(Image.fromarray(ramp), "JPEG", quality=80)
    result = restore_photo(data, detector, identity_restorer, RestoreOptions(), LIMITS)
    assert result.faces == [] and result.data == data and result.format == "jpeg"
    as_png = restore_photo(
        data, detector, identity_restorer, RestoreOptions(output_format="png"), LIMITS
    )
    assert as_png.content_type == "image/png"
    jpeg_pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(decode_output(as_png.data)), jpeg_pixels)
    bigger = restore_photo(data, detector, identity_restorer, RestoreOptions(upscale=2), LIMITS)
    assert (bigger.width, bigger.height) == (600, 400)


def test_output_pixel_limit(example: np.ndarray) -> None:
    data = _png(example)
    pixels = example.shape[0] * example.shape[1]
    tight = ImageLimits(10**8, 10**8, max_output_pixels=4 * pixels)
    with pytest.raises(ImageTooLargeError, match="upscaled"):
        prepare_photo(data, None, RestoreOptions(upscale=3), tight)
    with pytest.raises(InvalidInputError, match="detector"):  # x2 fits: it gets further
        prepare_photo(data, None, RestoreOptions(upscale=2), tight)


@pytest.mark.parametrize(
    "options",
    [
        RestoreOptions(strength=1.5),
        RestoreOptions(strength=-0.1),
        RestoreOptions(upscale=0),
        RestoreOptions(upscale=5),
        RestoreOptions(max_faces=0),
        RestoreOptions(quality=0),
        RestoreOptions(output_format="gif"),
    ],
)
def test_invalid_options(options: RestoreOptions) -> None:
    with pytest.raises(InvalidInputError):
        options.validated()


def test_options_are_normalised() -> None:
    assert RestoreOptions(output_format="JPG").validated().output_format == "jpeg"
    assert RestoreOptions(strength=1).validated().strength == 1.0


def test_restored_batch_is_checked(detector: FaceDetector, example: np.ndarray) -> None:
    prepared = prepare_photo(_png(example), detector, RestoreOptions(), LIMITS)
    with pytest.raises(InvalidInputError):
        finish_photo(prepared, prepared.crops[:1])
    with pytest.raises(ModelOutputError, match="NaN"):
        finish_photo(prepared, torch.full_like(prepared.crops, float("nan")))
    result = finish_photo(prepared, prepared.crops)
    assert {"decode", "detect", "align", "paste", "encode"} <= set(result.timings)


def test_with_the_osdface_restorer(
    detector: FaceDetector, example: np.ndarray, request: pytest.FixtureRequest
) -> None:
    """The real restorer (tiny random weights): one batched call for all faces of the photo."""
    restorer = request.getfixturevalue("tiny_restorer")
    calls: list[int] = []

    def counting(images: torch.Tensor):
        calls.append(images.shape[0])
        return restorer(images)

    result = restore_photo(_png(example), detector, counting, RestoreOptions(), LIMITS)
    assert calls == [3]  # three faces, one call
    out = np.asarray(decode_output(result.data))
    assert out.shape == example.shape
    assert not np.array_equal(out, example)  # the random model did change the faces


def test_faces_of_many_photos_share_calls_and_a_failing_photo_fails_alone(
    tiny_restorer,
) -> None:
    """model/media/batch.py: calls of `batch_size` faces across photos, each photo its own faces
    and time share; when the shared calls fail, each photo alone (the bad one keeps its error)."""
    from model.media.batch import restore_faces, restore_photos

    g = torch.Generator().manual_seed(0)

    def faces(count: int, size: int = 512) -> torch.Tensor:
        return torch.rand(count, 3, size, size, generator=g)

    calls: list[int] = []

    def counting(images: torch.Tensor):
        calls.append(images.shape[0])
        return tiny_restorer(images)

    a, none, c = faces(1), faces(0), faces(2)
    results = restore_photos(counting, [a, none, c], batch_size=2)
    assert calls == [2, 1]  # a0 c0 | c1: calls across photos
    alone = {id(x): tiny_restorer(x).images for x in (a, c)}
    for crops, result in ((a, results[0]), (c, results[2])):
        assert result.error is None and result.seconds > 0
        assert (result.faces - alone[id(crops)]).abs().max() < 1e-3  # its own faces, in order
    assert results[1].faces is not None and results[1].faces.shape[0] == 0
    assert results[1].seconds == 0.0
    assert results[2].seconds == pytest.approx(2 * results[0].seconds)  # shares by faces
    calls.clear()
    bad, good = restore_photos(counting, [faces(1, size=64), a], batch_size=2)
    assert bad.faces is None and "expected (B, 3, 512, 512)" in str(bad.error)
    assert good.error is None and (good.faces - alone[id(a)]).abs().max() < 1e-3
    assert calls == [1, 1]  # no shared call (the sizes differ): each photo alone
    (only,) = restore_photos(tiny_restorer, [faces(1, size=64)])
    assert only.faces is None and only.error is not None  # alone already: no second try
    out = restore_faces(tiny_restorer, c, batch_size=1)
    assert out.images.shape == c.shape and out.timings  # two calls, their stage times summed
    assert (out.images - alone[id(c)]).abs().max() < 1e-3
