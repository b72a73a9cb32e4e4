"""What a caller asks of one photo, checked (no torch: the command line validates its flags
and the HTTP form its fields against these before anything heavy is imported).

`OptionFields` is what a caller may set, field by field (bounds, defaults); the HTTP form
(`service.schemas.RestoreForm`) extends it, and `osdface restore` validates its flags with it.
`OptionFields.to_options` makes the `RestoreOptions` the pipeline takes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field, field_validator

from model.config import BACKGROUND_SCALES, BACKGROUNDS, BackgroundName
from model.errors import InvalidInputError
from model.media.codecs.formats import DEFAULT_QUALITY, FORMATS, normalize_format
from model.media.codecs.heif import writable_formats

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
    # MIN_QUALITY..MAX_QUALITY, for JPEG and lossy WebP; None: a JPEG input's own quality when
    # written as JPEG, else DEFAULT_QUALITY (model/media/codecs/encode.py output_quality)
    quality: int | None = None
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
        if self.quality is not None and not (
            isinstance(self.quality, int) and MIN_QUALITY <= self.quality <= MAX_QUALITY
        ):
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


class OptionFields(BaseModel):
    """The options a caller may set, as strings or values; unknown fields are refused.

    The defaults are `RestoreOptions`'; `to_options` adds what the run's settings decide.
    """

    model_config = ConfigDict(extra="forbid")

    aligned: bool = Field(
        RestoreOptions.aligned, description="the image is already a 512x512 FFHQ-aligned face"
    )
    only_center_face: bool = Field(
        RestoreOptions.only_center_face, description="restore only the face nearest the centre"
    )
    max_faces: int | None = Field(
        RestoreOptions.max_faces, ge=1, description="restore at most this many (largest) faces"
    )
    strength: float = Field(
        RestoreOptions.strength, ge=0.0, le=1.0, description="1 = fully restored, 0 = original"
    )
    upscale: int | None = Field(
        RestoreOptions.upscale,
        ge=MIN_UPSCALE,
        le=MAX_UPSCALE,
        description="output scale; default: the background network's, else 1",
    )
    background: BackgroundName = Field(
        RestoreOptions.background,
        description="how the background is upscaled: Lanczos (none), or Real-ESRGAN x2/x4",
    )
    output_format: str | None = Field(
        RestoreOptions.output_format,
        description="png, jpeg (or jpg), webp, heic or avif; default: the input's format when "
        "it can be written, else png",
        json_schema_extra={"enum": [*FORMATS, "jpg"]},
    )
    quality: int | None = Field(
        RestoreOptions.quality,
        ge=MIN_QUALITY,
        le=MAX_QUALITY,
        description="JPEG / lossy WebP quality; default: a JPEG input's own (estimated from its "
        f"quantisation tables) when written as JPEG, else {DEFAULT_QUALITY}",
    )
    faces: tuple[int, ...] | None = Field(
        RestoreOptions.faces,
        description="restore only these faces, e.g. 0,2: indices into the largest-first list",
    )
    min_face_size: int | None = Field(
        RestoreOptions.min_face_size,
        ge=1,
        description="ignore faces whose box is smaller than this many pixels",
    )

    @field_validator("faces", mode="before")
    @classmethod
    def _split_indices(cls, value: object) -> object:
        """'0,2' (a form field, a command-line flag) -> (0, 2); indices are never negative."""
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if not all(p.isdigit() for p in parts) or not parts:
                raise ValueError("must be face indices like 0,2")
            return tuple(int(p) for p in parts)
        return value

    def to_options(self, *, max_faces: int, allowed_formats: Collection[str]) -> RestoreOptions:
        """The checked options: `max_faces` (the settings') bounds and defaults the field, and
        the output format must be one of `allowed_formats`. InvalidInputError if not."""
        if self.max_faces is not None and self.max_faces > max_faces:
            raise InvalidInputError(f"max_faces is at most {max_faces} (OSDFACE_MAX_FACES)")
        fmt = normalize_format(self.output_format) if self.output_format else None
        if fmt is not None and fmt not in allowed_formats:
            raise InvalidInputError(f"output_format must be one of {', '.join(allowed_formats)}")
        return RestoreOptions(
            aligned=self.aligned,
            only_center_face=self.only_center_face,
            max_faces=self.max_faces or max_faces,
            strength=self.strength,
            upscale=self.upscale,
            background=self.background,
            output_format=fmt,
            quality=self.quality,
            faces=self.faces,
            min_face_size=self.min_face_size,
        ).validated()
