"""JPEG results keep the input's quality: estimated from its quantisation tables, used when the
caller gives none, overridden by `quality`; other inputs written as JPEG get the default.

References are independent of the code under test: Pillow writes the inputs at known qualities,
and file sizes are compared at the same pixel size.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from model.media.codecs.decode import decode_image, jpeg_quality
from model.media.codecs.formats import DEFAULT_QUALITY, ImageLimits
from model.media.faces.detect import FaceDetector
from model.media.pipeline import RestoreOptions, restore_photo
from model.options import OptionFields

PHOTO = "images/gfpgan/whole_imgs/Blake_Lively.jpg"  # 700x464, two faces


@pytest.fixture(scope="module")
def photo(assets: Path) -> Image.Image:
    with Image.open(assets / PHOTO) as im:
        return im.convert("RGB")


@pytest.fixture(scope="module")
def detector(tiny_weights_dir: Path, assets: Path) -> FaceDetector:
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25")


def _jpeg(image: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _quality_of(data: bytes) -> int | None:
    with Image.open(io.BytesIO(data)) as im:
        return jpeg_quality(im)


@pytest.mark.parametrize("quality", [50, 75, 90, 95])
def test_the_quality_is_estimated_from_the_tables(photo: Image.Image, quality: int) -> None:
    data = _jpeg(photo, quality)
    assert abs(_quality_of(data) - quality) <= 3
    assert decode_image(data, ImageLimits()).jpeg_quality == _quality_of(data)


def test_no_quality_without_jpeg_tables(photo: Image.Image) -> None:
    png = io.BytesIO()
    photo.save(png, "PNG")
    assert decode_image(png.getvalue(), ImageLimits()).jpeg_quality is None


@pytest.mark.parametrize("quality", [75, 95])
def test_a_restored_jpeg_keeps_the_input_size_and_quality(
    photo: Image.Image, detector: FaceDetector, tiny_restorer, quality: int
) -> None:
    data = _jpeg(photo, quality)
    result = restore_photo(data, detector, tiny_restorer, RestoreOptions(), ImageLimits())
    assert len(result.faces) == 2, "the faces were restored, so the pixels changed"
    assert (result.format, result.width, result.height) == ("jpeg", *photo.size)
    assert abs(len(result.data) / len(data) - 1) <= 0.2, (len(result.data), len(data))
    assert abs(_quality_of(result.data) - quality) <= 3


def test_quality_given_wins_and_other_inputs_get_the_default(
    photo: Image.Image, detector: FaceDetector, tiny_restorer
) -> None:
    def restored(data: bytes, **options) -> bytes:
        opts = RestoreOptions(**options)
        return restore_photo(data, detector, tiny_restorer, opts, ImageLimits()).data

    assert _quality_of(restored(_jpeg(photo, 75), quality=40)) == 40
    png = io.BytesIO()
    photo.save(png, "PNG")
    as_jpeg = restored(png.getvalue(), output_format="jpeg")
    assert _quality_of(as_jpeg) == DEFAULT_QUALITY


def test_the_quality_field_is_optional_and_bounded() -> None:
    assert OptionFields().quality is None
    assert OptionFields(quality="60").quality == 60
    for bad in ("0", "101"):
        with pytest.raises(ValueError):
            OptionFields(quality=bad)
