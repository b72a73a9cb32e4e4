"""Request and response shapes of the HTTP API (also what `/docs` shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.config import BackgroundName
from model.pipeline import MAX_QUALITY, MAX_UPSCALE, MIN_QUALITY, MIN_UPSCALE, RestoreOptions


class ErrorDetail(BaseModel):
    type: str = Field(description="stable machine-readable kind, e.g. invalid_image, queue_full")
    message: str = Field(description="what went wrong, for people")


class ErrorBody(BaseModel):
    error: ErrorDetail


class RestoreForm(BaseModel):
    """The form fields of POST /restore besides the `image` file. Unknown fields are refused."""

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
        description="png, jpeg, webp, heic or avif; default: the input's format when the "
        "server can write it, else png (the X-Output-Format header says which)",
    )
    quality: int = Field(
        RestoreOptions.quality,
        ge=MIN_QUALITY,
        le=MAX_QUALITY,
        description="JPEG / lossy WebP quality",
    )


class FaceOut(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in input pixels")
    landmarks: list[list[float]] = Field(description="5 (x, y) points: eyes, nose, mouth corners")
    score: float = Field(description="detector confidence")


class Timings(BaseModel):
    queue: float = Field(description="seconds the faces waited for the model worker")
    inference: float = Field(description="seconds of the model calls holding this image's faces")
    total: float = Field(description="seconds from request arrival to the answer")
    stages: dict[str, float] = Field(description="seconds per stage (decode, detect, unet, ...)")


class RestoreResult(BaseModel):
    image: str = Field(description="the restored image file, base64")
    content_type: str
    width: int
    height: int
    faces_detected: int
    faces: list[FaceOut]
    timings: Timings


class Health(BaseModel):
    status: str = Field(description="ok")


class Ready(BaseModel):
    status: str = Field(description="ready")


class Info(BaseModel):
    service: dict[str, Any] = Field(description="name, version, uptime")
    model: dict[str, Any] = Field(description="files and sha256, device, dtype, versions")
    detector: dict[str, Any]
    batching: dict[str, Any]
    limits: dict[str, Any]
