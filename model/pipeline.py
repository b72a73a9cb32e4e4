"""Whole photos: decode, detect, align, ONE batched restorer call, paste back, encode.

The work is split in three so the HTTP service can batch the faces of concurrent requests into
one model call:

    prepared = prepare_photo(data, detector, options, limits)   # CPU: decode, detect, align
    restored = restorer(prepared.crops).images                  # accelerator, batched
    background = make_background(prepared, backgrounds)         # accelerator (or Lanczos)
    result = finish_photo(prepared, restored, background)       # CPU: paste back, encode

`restore_photo` runs the three for one photo; `restore_files` runs it over files for the CLI.
No face found is a result with 0 faces and the image unchanged, not an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from model.codecs.decode import decode_image
from model.codecs.encode import encode_image_with_report
from model.codecs.formats import (
    CONTENT_TYPES,
    EXTENSIONS,
    DecodedImage,
    ImageLimits,
    normalize_format,
)
from model.codecs.heif import writable_formats
from model.config import BACKGROUND_SCALES, BACKGROUNDS, BackgroundName
from model.errors import ImageTooLargeError, InvalidInputError
from model.faces.align import FACE_SIZE, FFHQ_TEMPLATE, align_face
from model.faces.detect import DetectedFace, FaceDetector, select_faces
from model.faces.paste import paste_faces

logger = logging.getLogger(__name__)

# What a caller may ask for; the command line and the HTTP form validate against these too.
MIN_UPSCALE, MAX_UPSCALE = 1, 4
MIN_QUALITY, MAX_QUALITY = 1, 100


class _RestoredBatch(Protocol):
    images: torch.Tensor


class FaceRestorer(Protocol):
    """What the pipeline needs of a restorer (OSDFaceRestorer is one).

    images: (B, 3, 512, 512) float32 in [0, 1], RGB -> `.images` of the same shape and range.
    `seed` is passed only when the caller sets one (it matters for a sampled VAE latent).
    """

    def __call__(self, images: torch.Tensor, *, seed: int | None = None) -> _RestoredBatch: ...


class BackgroundStep(Protocol):
    """The pluggable background step (BackgroundUpscaler is one; "none" is a Lanczos resize).

    (H, W, 3) uint8 RGB and an integer scale -> (H * scale, W * scale, 3) uint8 RGB.
    """

    def __call__(self, rgb: np.ndarray, scale: int) -> np.ndarray: ...


@dataclass(frozen=True)
class RestoreOptions:
    """What the caller asks for one photo; `validated()` checks and normalises it."""

    aligned: bool = False  # the input is already a FACE_SIZE square FFHQ-aligned crop
    only_center_face: bool = False
    max_faces: int | None = None
    strength: float = 1.0  # 1 = fully restored, 0 = the original
    upscale: int | None = None  # MIN_UPSCALE..MAX_UPSCALE; None: the background network's scale
    background: BackgroundName = "none"  # "none" (Lanczos) or a Real-ESRGAN network
    output_format: str | None = None  # jpeg, png, webp, heic, avif; None: see output_format()
    quality: int = 95  # MIN_QUALITY..MAX_QUALITY, for JPEG and lossy WebP

    def validated(self) -> RestoreOptions:
        if self.background not in BACKGROUNDS:
            raise InvalidInputError(f"background must be one of {', '.join(BACKGROUNDS)}")
        if self.upscale is None:
            return replace(self, upscale=BACKGROUND_SCALES.get(self.background, 1)).validated()
        if not (isinstance(self.strength, int | float) and 0.0 <= self.strength <= 1.0):
            raise InvalidInputError(f"strength must be in [0, 1], got {self.strength}")
        if not (isinstance(self.upscale, int) and MIN_UPSCALE <= self.upscale <= MAX_UPSCALE):
            raise InvalidInputError(f"upscale must be an integer {MIN_UPSCALE}..{MAX_UPSCALE}")
        if self.max_faces is not None and not (
            isinstance(self.max_faces, int) and self.max_faces >= 1
        ):
            raise InvalidInputError(f"max_faces must be a positive integer, got {self.max_faces}")
        if not (isinstance(self.quality, int) and MIN_QUALITY <= self.quality <= MAX_QUALITY):
            raise InvalidInputError(
                f"quality must be an integer {MIN_QUALITY}..{MAX_QUALITY}, got {self.quality}"
            )
        fmt = normalize_format(self.output_format) if self.output_format else None
        if fmt is not None and fmt not in writable_formats():
            raise InvalidInputError(f"this build has no {fmt} encoder")
        return replace(self, strength=float(self.strength), output_format=fmt)


@dataclass
class PreparedPhoto:
    """A decoded photo and its aligned faces, waiting for the restorer.

    crops: (F, 3, 512, 512) float32 in [0, 1], RGB, CPU; F may be 0. affines: F (2, 3) photo ->
    crop transforms. Faces are largest first, which is also the paste order.
    """

    image: DecodedImage
    faces: list[DetectedFace]
    crops: torch.Tensor
    affines: list[np.ndarray]
    options: RestoreOptions
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class PhotoResult:
    """The restored file and what happened to it (timings in seconds, by stage)."""

    data: bytes
    format: str
    content_type: str
    width: int
    height: int
    faces: list[DetectedFace]
    timings: dict[str, float]
    dropped_metadata: tuple[str, ...] = ()  # "exif", "icc": unreadable, or too large for it


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
) -> PreparedPhoto:
    """Decode, check the output size, detect and align. `detector` may be None when aligned."""
    options = options.validated()
    timings: dict[str, float] = {}
    with _timed(timings, "decode"):
        image = decode_image(data, limits)
    _check_output_size(image, options.upscale, limits)
    if options.aligned:
        return _prepare_aligned(image, options, timings)
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
        )
    with _timed(timings, "align"):
        aligned = [align_face(image.rgb, face.landmarks_array()) for face in faces]
        crops = _to_tensor([crop for crop, _ in aligned])
    logger.debug("%d faces found, %d kept", len(found), len(faces))
    return PreparedPhoto(image, faces, crops, [a for _, a in aligned], options, timings)


def _prepare_aligned(
    image: DecodedImage, options: RestoreOptions, timings: dict[str, float]
) -> PreparedPhoto:
    if (image.height, image.width) != (FACE_SIZE, FACE_SIZE):
        raise InvalidInputError(
            f"an aligned face must be {FACE_SIZE}x{FACE_SIZE}, got {image.width}x{image.height}"
        )
    landmarks = tuple((float(x), float(y)) for x, y in FFHQ_TEMPLATE)
    face = DetectedFace((0.0, 0.0, float(FACE_SIZE), float(FACE_SIZE)), landmarks, 1.0)
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
    stacked = torch.from_numpy(np.stack(crops))  # (F, 512, 512, 3) uint8
    return stacked.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


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
    faces = _restored_to_numpy(restored, len(prepared.faces))
    timings = dict(prepared.timings)
    out_format = output_format(image, options)
    if out_format != image.format and not options.output_format:
        logger.info("no %s encoder: writing %s instead", image.format, out_format)
    unchanged = background is None and options.upscale == 1 and out_format == image.format
    if not faces and unchanged:
        # Nothing to change: the file as it came (its orientation tag still tells viewers).
        timings.update(paste=0.0, encode=0.0)
        return _result(image.data, out_format, image.width, image.height, [], timings)
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
    result = _result(encoded.data, out_format, width, height, list(prepared.faces), timings)
    result.dropped_metadata = encoded.dropped_metadata
    return result


def _restored_to_numpy(restored: torch.Tensor, count: int) -> list[np.ndarray]:
    """(F, 3, 512, 512) tensor -> F (512, 512, 3) float32 arrays in [0, 1]."""
    expected = (count, 3, FACE_SIZE, FACE_SIZE)
    if not isinstance(restored, torch.Tensor) or tuple(restored.shape) != expected:
        shape = tuple(getattr(restored, "shape", ()))
        raise InvalidInputError(f"restored faces must be {expected}, got {shape}")
    if count == 0:
        return []
    array = restored.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    if not np.isfinite(array).all():
        raise InvalidInputError("restored faces contain NaN or infinity")
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
) -> PhotoResult:
    return PhotoResult(data, fmt, CONTENT_TYPES[fmt], width, height, faces, timings)


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
    restored = _restore_crops(restorer, prepared, seed=seed)
    return finish_photo(prepared, restored, make_background(prepared, backgrounds))


def _restore_crops(
    restorer: FaceRestorer,
    prepared: PreparedPhoto,
    *,
    batch_size: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """(F, 3, 512, 512) restored; one call, or calls of `batch_size` faces to bound memory."""
    crops = prepared.crops
    if crops.shape[0] == 0:
        return crops
    step = batch_size or crops.shape[0]
    extra = {} if seed is None else {"seed": seed}
    with _timed(prepared.timings, "restore"):
        parts = [restorer(crops[i : i + step], **extra).images for i in range(0, len(crops), step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def restore_files(
    paths: Sequence[Path],
    out_dir: Path,
    detector: FaceDetector | None,
    restorer: FaceRestorer,
    options: RestoreOptions,
    limits: ImageLimits,
    *,
    save_faces: bool,
    batch_size: int | None = None,
    seed: int | None = None,
    backgrounds: Mapping[str, BackgroundStep] | None = None,
) -> list[Path]:
    """Restore each file into `out_dir` (`<stem>.<ext of the output format>`); the written paths.

    With `save_faces`, also `out_dir/faces/<stem>_<k>_aligned.png` and `..._restored.png` per
    face. A photo's faces go to the restorer in one call, or in calls of at most `batch_size`
    faces; `backgrounds` holds the loaded background networks. Errors are raised, not
    skipped: the exception carries a note naming the file.
    """
    options = options.validated()
    if batch_size is not None and batch_size < 1:
        raise InvalidInputError(f"batch_size must be positive, got {batch_size}")
    targets = [_target_path(Path(p), out_dir, options) for p in paths]
    if len(set(targets)) != len(targets):
        raise InvalidInputError("two inputs would be written to the same output file")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, target in zip(paths, targets, strict=True):
        try:
            prepared = prepare_photo(Path(path).read_bytes(), detector, options, limits)
            restored = _restore_crops(restorer, prepared, batch_size=batch_size, seed=seed)
            background = make_background(prepared, backgrounds)
            result = finish_photo(prepared, restored, background)
            # The format is sniffed from the bytes; the name's extension may have been wrong.
            target = target.with_suffix(f".{EXTENSIONS[result.format]}")
            target.write_bytes(result.data)
            written.append(target)
            if save_faces:
                written.extend(_save_crops(target, prepared.crops, restored))
        except Exception as exc:
            exc.add_note(f"while restoring {path}")
            raise
        logger.info("%s: %d faces -> %s", path, len(result.faces), target)
    return written


def _target_path(path: Path, out_dir: Path, options: RestoreOptions) -> Path:
    fmt = options.output_format or _format_from_name(path)
    return out_dir / f"{path.stem}.{EXTENSIONS[fmt]}"


def _format_from_name(path: Path) -> str:
    # The real format is sniffed from the bytes; the extension only picks the output name.
    try:
        return normalize_format(path.suffix)
    except InvalidInputError:
        return "png"


def _save_crops(target: Path, crops: torch.Tensor, restored: torch.Tensor) -> list[Path]:
    folder = target.parent / "faces"
    written = []
    for k in range(crops.shape[0]):
        for kind, batch in (("aligned", crops), ("restored", restored)):
            rgb = (batch[k].detach().cpu().float().clamp(0, 1) * 255).round().byte()
            path = folder / f"{target.stem}_{k:02d}_{kind}.png"
            folder.mkdir(parents=True, exist_ok=True)
            ok = cv2.imwrite(str(path), rgb.permute(1, 2, 0).numpy()[..., ::-1])  # BGR for cv2
            if not ok:
                raise OSError(f"cannot write {path}")
            written.append(path)
    return written
