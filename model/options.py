"""What a caller asks of one photo, checked (no torch: the command line validates its flags
and the HTTP form its fields against these before anything heavy is imported)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from model.media.codecs.formats import normalize_format
from model.media.codecs.heif import writable_formats
from model.config import BACKGROUND_SCALES, BACKGROUNDS, BackgroundName
from model.errors import InvalidInputError

# What a caller may ask for; the command line and the HTTP form validate against these too.
MIN_UPSCALE, MAX_UPSCALE = 1, 4
MIN_QUALITY, MAX_QUALITY = 1, 100


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
    faces: tuple[int, ...] | None = None  # indices in the largest-first order; None = all
    min_face_size: int | None = None  # smaller faces (box's shorter side, pixels) are ignored

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
        if self.faces is not None and not all(isinstance(i, int) and i >= 0 for i in self.faces):
            raise InvalidInputError(f"faces must be indices >= 0, got {self.faces}")
        if self.min_face_size is not None and not (
            isinstance(self.min_face_size, int) and self.min_face_size >= 1
        ):
            raise InvalidInputError(f"min_face_size must be >= 1 pixel, got {self.min_face_size}")
        fmt = normalize_format(self.output_format) if self.output_format else None
        if fmt is not None and fmt not in writable_formats():
            raise InvalidInputError(f"this build has no {fmt} encoder")
        faces = tuple(self.faces) if self.faces is not None else None
        return replace(self, strength=float(self.strength), output_format=fmt, faces=faces)
