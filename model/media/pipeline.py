"""Whole photos: decode, detect, align, ONE batched restorer call, paste back, encode.

The work is split in three so the HTTP service can batch the faces of concurrent requests into
one model call:

    prepared = prepare_photo(data, detector, options, limits)   # CPU: decode, detect, align
    restored = restorer(prepared.crops).images                  # accelerator, batched
    background = make_background(prepared, backgrounds)         # accelerator (or Lanczos)
    result = finish_photo(prepared, restored, background)       # CPU: paste back, encode

`restore_photo` runs the three for one photo; the command line (osdface/restore/runners.py) runs
them for several files at once, their faces sharing model calls (`restore_prepared`, through
model/media/batch.py as every front end).
No face found is a result with 0 faces and the image unchanged, not an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np
import torch

from model.errors import ImageTooLargeError, InvalidInputError, ModelOutputError
from model.image_processor import pixels_to_tensor
from model.media.batch import FaceRestorer, PhotoFaces, restore_photos
from model.media.codecs.decode import decode_image
from model.media.codecs.encode import encode_image_with_report
from model.media.codecs.formats import (
    CONTENT_TYPES,
    DecodedImage,
    ImageLimits,
)
from model.media.codecs.heif import writable_formats
from model.media.faces.align import FACE_SIZE, FFHQ_TEMPLATE, align_face
from model.media.faces.detect import DetectedFace, FaceDetector, select_faces
from model.media.faces.paste import paste_faces
from model.options import RestoreOptions

logger = logging.getLogger(__name__)


class BackgroundStep(Protocol):
    """The pluggable background step (BackgroundUpscaler is one; "none" is a Lanczos resize).

    (H, W, 3) uint8 RGB and an integer scale -> (H * scale, W * scale, 3) uint8 RGB.
    """

    def __call__(self, rgb: np.ndarray, scale: int) -> np.ndarray: ...


@dataclass
class PreparedPhoto:
    """A decoded photo and its aligned faces, waiting for the restorer.

    crops: (F, 3, 512, 512) float32 in [0, 1], RGB, CPU; F may be 0. affines: F (2, 3) photo ->
    crop transforms. Faces are largest first, which is also the paste order: the ones chosen
    by the options (`faces`, `max_faces`, `min_face_size`, `only_center_face`) out of the
    `detected` the detector found (None: as many as were chosen).
    """

    image: DecodedImage
    faces: list[DetectedFace]
    crops: torch.Tensor
    affines: list[np.ndarray]
    options: RestoreOptions
    timings: dict[str, float] = field(default_factory=dict)
    detected: int | None = None

    @property
    def faces_detected(self) -> int:
        return len(self.faces) if self.detected is None else self.detected


@dataclass
class PhotoResult:
    """The restored file and what happened to it (timings in seconds, by stage): `faces` are
    the restored ones, `faces_detected` counts all the detector found."""

    data: bytes
    format: str
    content_type: str
    width: int
    height: int
    faces: list[DetectedFace]
    timings: dict[str, float]
    dropped_metadata: tuple[str, ...] = ()  # "exif", "icc": unreadable, or too large for it
    faces_detected: int = 0


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def prepare_photo(
    data: bytes,
    detector: FaceDetector | None,
    options: RestoreOptions,
    limits: ImageLimits,
    *,
    face_size: int = FACE_SIZE,
) -> PreparedPhoto:
    """Decode, check the output size, detect and align. `detector` may be None when aligned.

    `face_size` is the restorer's input side: aligned crops must have it (512 for the released
    model; a model trained at another size restores aligned crops of that size).
    """
    options = options.validated()
    timings: dict[str, float] = {}
    with _timed(timings, "decode"):
        image = decode_image(data, limits)
    _check_output_size(image, options.upscale, limits)
    if options.aligned:
        return _prepare_aligned(image, options, timings, face_size)
    if detector is None:
        raise InvalidInputError("a face detector is needed unless the input is an aligned crop")
    with _timed(timings, "detect"):
        found = detector.detect(image.rgb)
        faces = select_faces(
            found,
            image.width,
            image.height,
            only_center_face=options.only_center_face,
            max_faces=options.max_faces,
            indices=options.faces,
            min_face_size=options.min_face_size,
        )
    with _timed(timings, "align"):
        aligned = [align_face(image.rgb, face.landmarks_array()) for face in faces]
        crops = _to_tensor([crop for crop, _ in aligned])
    logger.debug("%d faces found, %d kept", len(found), len(faces))
    affines = [a for _, a in aligned]
    return PreparedPhoto(image, faces, crops, affines, options, timings, detected=len(found))


def _prepare_aligned(
    image: DecodedImage, options: RestoreOptions, timings: dict[str, float], size: int
) -> PreparedPhoto:
    if (image.height, image.width) != (size, size):
        raise InvalidInputError(
            f"an aligned face must be {size}x{size}, got {image.width}x{image.height}"
        )
    scale = size / FACE_SIZE  # the template is FACE_SIZE's; a model of another size scales it
    landmarks = tuple((float(x) * scale, float(y) * scale) for x, y in FFHQ_TEMPLATE)
    face = DetectedFace((0.0, 0.0, float(size), float(size)), landmarks, 1.0)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    timings.update(detect=0.0, align=0.0)
    return PreparedPhoto(image, [face], _to_tensor([image.rgb]), [identity], options, timings)


def _check_output_size(image: DecodedImage, upscale: int | None, limits: ImageLimits) -> None:
    assert upscale is not None  # validated() resolved it
    pixels = image.width * image.height * upscale * upscale
    if pixels > limits.max_output_pixels:
        raise ImageTooLargeError(
            f"{image.width}x{image.height} upscaled x{upscale} is {pixels} pixels, "
            f"over the {limits.max_output_pixels} output limit"
        )


def _to_tensor(crops: Sequence[np.ndarray]) -> torch.Tensor:
    """F (512, 512, 3) uint8 RGB -> (F, 3, 512, 512) float32 in [0, 1]."""
    if not crops:
        return torch.zeros((0, 3, FACE_SIZE, FACE_SIZE), dtype=torch.float32)
    return pixels_to_tensor(crops)


def make_background(
    prepared: PreparedPhoto, backgrounds: Mapping[str, BackgroundStep] | None = None
) -> np.ndarray | None:
    """The photo upscaled by the network `options.background` names, timed as "background".

    None for "none": `finish_photo` then resizes with Lanczos. `backgrounds` maps network names
    to loaded steps; asking for one that is not loaded is an InvalidInputError.
    """
    name, scale = prepared.options.background, prepared.options.upscale
    if name == "none":
        return None
    step = (backgrounds or {}).get(name)
    if step is None:
        raise InvalidInputError(f"the background network {name!r} is not loaded")
    assert scale is not None  # validated() resolved it
    with _timed(prepared.timings, "background"):
        return step(prepared.image.rgb, scale)


def output_format(image: DecodedImage, options: RestoreOptions) -> str:
    """The asked format, else the input's when this build can write it, else PNG (lossless)."""
    if options.output_format:
        return options.output_format
    return image.format if image.format in writable_formats() else "png"


def finish_photo(
    prepared: PreparedPhoto, restored: torch.Tensor, background: np.ndarray | None = None
) -> PhotoResult:
    """Paste the restored faces, (F, 3, 512, 512) float in [0, 1] RGB, back and encode.

    `background` is `make_background`'s result: (H * upscale, W * upscale, 3) uint8 RGB (the
    faces are pasted into it, in place), or None for a Lanczos resize of the photo.
    """
    image, options = prepared.image, prepared.options
    faces = _restored_to_numpy(restored, tuple(prepared.crops.shape))
    timings = dict(prepared.timings)
    out_format = output_format(image, options)
    if out_format != image.format and not options.output_format:
        logger.info("no %s encoder: writing %s instead", image.format, out_format)
    unchanged = background is None and options.upscale == 1 and out_format == image.format
    if not faces and unchanged:
        # Nothing to change: the file as it came (its orientation tag still tells viewers).
        timings.update(paste=0.0, encode=0.0)
        return _result(image.data, out_format, image.width, image.height, [], timings, prepared)
    assert options.upscale is not None  # validated() resolved it
    with _timed(timings, "paste"):
        canvas = _canvas(image, options, background)
        paste_faces(
            canvas,
            faces,
            prepared.affines,
            scale=options.upscale,
            strength=options.strength,
            feather=not options.aligned,
        )
    with _timed(timings, "encode"):
        encoded = encode_image_with_report(
            image, canvas, format=out_format, quality=options.quality
        )
    height, width = canvas.shape[:2]
    faces_out = list(prepared.faces)
    result = _result(encoded.data, out_format, width, height, faces_out, timings, prepared)
    result.dropped_metadata = encoded.dropped_metadata
    return result


def _restored_to_numpy(restored: torch.Tensor, expected: tuple[int, ...]) -> list[np.ndarray]:
    """(F, 3, S, S) tensor, the crops' shape -> F (S, S, 3) float32 arrays in [0, 1]."""
    if not isinstance(restored, torch.Tensor) or tuple(restored.shape) != expected:
        shape = tuple(getattr(restored, "shape", ()))
        raise InvalidInputError(f"restored faces must be {expected}, got {shape}")
    if expected[0] == 0:
        return []
    array = restored.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    if not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).any(axis=(1, 2, 3)).sum())
        raise ModelOutputError(f"the model returned NaN or infinity in {bad} of {len(array)} faces")
    return list(np.clip(array, 0.0, 1.0))


def _canvas(
    image: DecodedImage, options: RestoreOptions, background: np.ndarray | None
) -> np.ndarray:
    assert options.upscale is not None  # validated() resolved it
    if background is None:
        return _background(image.rgb, options.upscale)
    expected = (image.height * options.upscale, image.width * options.upscale, 3)
    if background.shape != expected or background.dtype != np.uint8:
        raise InvalidInputError(f"the background must be {expected} uint8, got {background.shape}")
    return background


def _background(rgb: np.ndarray, upscale: int) -> np.ndarray:
    if upscale == 1:
        return rgb.copy()
    height, width = rgb.shape[:2]
    return cv2.resize(rgb, (width * upscale, height * upscale), interpolation=cv2.INTER_LANCZOS4)


def _result(
    data: bytes,
    fmt: str,
    width: int,
    height: int,
    faces: list[DetectedFace],
    timings: dict[str, float],
    prepared: PreparedPhoto,
) -> PhotoResult:
    return PhotoResult(
        data,
        fmt,
        CONTENT_TYPES[fmt],
        width,
        height,
        faces,
        timings,
        faces_detected=prepared.faces_detected,
    )


def restore_photo(
    data: bytes,
    detector: FaceDetector | None,
    restorer: FaceRestorer,
    options: RestoreOptions,
    limits: ImageLimits,
    *,
    seed: int | None = None,
    backgrounds: Mapping[str, BackgroundStep] | None = None,
) -> PhotoResult:
    """One photo end to end: all its faces go through ONE restorer call."""
    prepared = prepare_photo(data, detector, options, limits)
    (faces,) = restore_prepared(restorer, [prepared], seed=seed)
    if faces.error is not None:
        raise faces.error
    assert faces.faces is not None
    return finish_photo(prepared, faces.faces, make_background(prepared, backgrounds))


def restore_prepared(
    restorer: FaceRestorer,
    photos: Sequence[PreparedPhoto],
    *,
    batch_size: int | None = None,
    seed: int | None = None,
) -> list[PhotoFaces]:
    """The faces of several prepared photos in shared calls of at most `batch_size` faces
    (model/media/batch.py `restore_photos`: a failing call retries each photo alone).

    Each photo's share of the calls' time is its "restore" timing.
    """
    results = restore_photos(restorer, [p.crops for p in photos], batch_size=batch_size, seed=seed)
    for photo, result in zip(photos, results, strict=True):
        photo.timings["restore"] = result.seconds
    return results
