"""What the client sends and gets back: the form fields as typed options, the restore answer
(its headers or its JSON) and the state of a video job.

The options mirror the service's form (`service/schemas.py` `RestoreForm`, whose bounds and
defaults are `model/options.py` `OptionFields`); a field left at None is not sent, so the
service's default applies. The service checks the values and answers 422 naming the field.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from model.atomic import write_atomic

Background = Literal["none", "realesrgan-x2", "realesrgan-x4"]
OutputFormat = Literal["png", "jpeg", "jpg", "webp", "heic", "avif"]


def _form_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class RestoreOptions:
    """The form fields of `POST /restore` besides the image; None: the service's default."""

    aligned: bool | None = None  # the image is already a 512x512 FFHQ-aligned face
    only_center_face: bool | None = None  # restore only the face nearest the centre
    max_faces: int | None = None  # at most this many (largest) faces
    strength: float | None = None  # 1 = fully restored (default), 0 = the original
    upscale: int | None = None  # 1..4; default: the background network's scale, else 1
    background: Background | None = None  # Lanczos ("none", default) or Real-ESRGAN x2/x4
    output_format: OutputFormat | None = None  # default: the input's when writable, else png
    quality: int | None = None  # 1..100, JPEG and lossy WebP
    faces: tuple[int, ...] | None = None  # only these faces, indices in largest-first order
    min_face_size: int | None = None  # ignore faces whose box is smaller (pixels)

    def form(self) -> dict[str, str]:
        """The multipart text fields: every field that is set, as the service parses it."""
        return {
            f.name: _form_value(v) for f in fields(self) if (v := getattr(self, f.name)) is not None
        }


@dataclass(frozen=True)
class JobOptions:
    """The form fields of `POST /v1/jobs` besides the video; None: the service's default."""

    start_s: float | None = None  # seconds to skip
    duration_s: float | None = None  # seconds to restore from `start_s`
    crf: int | None = None  # 0..51, the H.264 quality of the output
    strength: float | None = None  # 0..1
    max_faces: int | None = None  # per frame

    def form(self) -> dict[str, str]:
        names = {"start_s": "start", "duration_s": "duration"}
        return {
            names.get(f.name, f.name): _form_value(v)
            for f in fields(self)
            if (v := getattr(self, f.name)) is not None
        }


@dataclass(frozen=True)
class Timings:
    """Seconds, from the answer's headers (`stages` from the JSON answer only)."""

    queue_s: float | None = None  # the faces waited for the model worker
    inference_s: float | None = None  # the model calls holding this image's faces
    total_s: float | None = None  # from arrival to the answer, on the server
    background_s: float | None = None  # the background network (0 for background=none)
    stages: Mapping[str, float] = field(default_factory=dict)  # decode, detect, unet, ...


@dataclass(frozen=True)
class Face:
    """One restored face, in the input image's pixels (JSON answer only)."""

    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    landmarks: tuple[tuple[float, float], ...]  # eyes, nose, mouth corners
    score: float  # detector confidence


@dataclass(frozen=True)
class RestoreResult:
    """A restored photo: the file's bytes and what the service said about it."""

    image: bytes  # the encoded file, in `output_format`
    content_type: str  # image/png, image/jpeg, ...
    output_format: str | None  # X-Output-Format: png, jpeg, webp, heic, avif
    faces_detected: int | None  # X-Faces-Detected: faces found before any choosing
    faces_restored: int | None  # X-Faces-Restored (None from a server that does not send it)
    timings: Timings
    metadata_dropped: tuple[str, ...]  # X-Metadata-Dropped: exif, icc
    request_id: str | None  # X-Request-Id
    faces: tuple[Face, ...] = ()  # the JSON answer's faces, largest first
    width: int | None = None  # the JSON answer's size of the output
    height: int | None = None
    retried: tuple[str, ...] = ()  # why each retry of this call happened ("429 queue_full")

    def save(self, target: str | Path) -> Path:
        """Write the image to `target` atomically (a temporary file beside it, then a rename)."""
        path = Path(target)
        write_atomic(path, self.image)
        return path


def _number(headers: Mapping[str, str], name: str) -> float | None:
    try:
        return float(headers[name])
    except (KeyError, ValueError):
        return None


def _integer(headers: Mapping[str, str], name: str) -> int | None:
    value = _number(headers, name)
    return None if value is None else int(value)


def result_from_headers(
    headers: Mapping[str, str], body: bytes, retried: tuple[str, ...] = ()
) -> RestoreResult:
    """The image answer: the body is the file, the headers say the rest (names: lower case)."""
    dropped = headers.get("x-metadata-dropped", "")
    return RestoreResult(
        image=body,
        content_type=headers.get("content-type", "application/octet-stream"),
        output_format=headers.get("x-output-format"),
        faces_detected=_integer(headers, "x-faces-detected"),
        faces_restored=_integer(headers, "x-faces-restored"),
        timings=Timings(
            queue_s=_number(headers, "x-queue-time"),
            inference_s=_number(headers, "x-inference-time"),
            total_s=_number(headers, "x-total-time"),
            background_s=_number(headers, "x-background-time"),
        ),
        metadata_dropped=tuple(p.strip() for p in dropped.split(",") if p.strip()),
        request_id=headers.get("x-request-id"),
        retried=retried,
    )


def result_from_json(
    headers: Mapping[str, str], data: Mapping[str, Any], retried: tuple[str, ...] = ()
) -> RestoreResult:
    """The JSON answer (`Accept: application/json`): the image in base64, faces and stages."""
    image = base64.b64decode(data["image"])
    base = result_from_headers(headers, image, retried)
    timings = data.get("timings", {})
    faces = tuple(
        Face(
            box=tuple(float(v) for v in f["box"]),  # type: ignore[arg-type]
            landmarks=tuple((float(x), float(y)) for x, y in f["landmarks"]),
            score=float(f["score"]),
        )
        for f in data.get("faces", [])
    )
    restored = data.get("faces_restored", base.faces_restored)
    return RestoreResult(
        image=image,
        content_type=str(data.get("content_type", base.content_type)),
        output_format=base.output_format,
        faces_detected=int(data.get("faces_detected", base.faces_detected or 0)),
        faces_restored=None if restored is None else int(restored),
        timings=Timings(
            queue_s=timings.get("queue", base.timings.queue_s),
            inference_s=timings.get("inference", base.timings.inference_s),
            total_s=timings.get("total", base.timings.total_s),
            background_s=base.timings.background_s,
            stages=dict(timings.get("stages", {})),
        ),
        metadata_dropped=base.metadata_dropped,
        request_id=base.request_id,
        faces=faces,
        width=data.get("width"),
        height=data.get("height"),
        retried=retried,
    )


@dataclass(frozen=True)
class JobProgress:
    frames_done: int = 0
    frames_total: int | None = None
    fraction: float | None = None  # 0..1; None while the frame count is unknown
    frames_per_second: float = 0.0
    eta_s: float | None = None
    segments_done: int = 0  # the job is restored in time spans, each its own file
    segments_total: int | None = None


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINISHED_STATES = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Job:
    """A video job as `GET /v1/jobs/{id}` reports it."""

    id: str
    state: str  # queued, running, succeeded, failed, cancelled
    progress: JobProgress
    faces: int = 0
    error: str | None = None
    result: str | None = None  # the result's path once succeeded
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    takeovers: int = 0  # times another replica took the job over after its runner was lost
    segments_redone: int = 0  # segments restored again after a takeover or a restart

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Job:
        progress = data.get("progress") or {}
        return cls(
            id=str(data["id"]),
            state=str(data["state"]),
            progress=JobProgress(
                frames_done=int(progress.get("frames_done") or 0),
                frames_total=progress.get("frames_total"),
                fraction=progress.get("fraction"),
                frames_per_second=float(progress.get("frames_per_second") or 0.0),
                eta_s=progress.get("eta_s"),
                segments_done=int(progress.get("segments_done") or 0),
                segments_total=progress.get("segments_total"),
            ),
            faces=int(data.get("faces") or 0),
            error=data.get("error"),
            result=data.get("result"),
            created_at=data.get("created_at"),
            started_at=data.get("started_at"),
            finished_at=data.get("finished_at"),
            takeovers=int(data.get("takeovers") or 0),
            segments_redone=int(data.get("segments_redone") or 0),
        )
