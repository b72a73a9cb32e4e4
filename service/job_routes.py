"""HTTP endpoints of video jobs: POST /v1/jobs, GET /v1/jobs/{id}, its /result, DELETE.

The upload is streamed to the job's folder through python-multipart and refused the moment it
passes `max_job_bytes`; the file is probed (container, video stream, codec, frame count) before
the 202, so bad input is a 4xx at once. A truncated stream can only be found while decoding:
the job then ends `failed` with the error that says so.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse
from python_multipart.multipart import parse_options_header

from model.errors import InvalidInputError
from model.media.video.config import VIDEO_SUFFIXES
from model.media.video.io import VideoSource
from model.media.video.restore import VideoOptions
from model.runtime.messages import did_you_mean
from service.errors import ErrorKind, ServiceError
from service.jobs import Job, JobManager, JobState
from service.openapi import OK_HEADERS, ops_responses
from service.routes import answer_media_type, get_service, require_api_key
from service.schemas import JobView
from service.state import ServiceState
from service.upload import feed_multipart, open_multipart, refuse_query, too_large_message

if TYPE_CHECKING:  # python-multipart defines its callback types for type checkers only
    from python_multipart.multipart import MultipartCallbacks

router = APIRouter(prefix="/v1/jobs", tags=["video jobs"])

VIDEO_FIELD = "video"
FIELDS = ("start", "duration", "crf", "strength", "max_faces")
MAX_FIELD_BYTES = 64
MEDIA_TYPES = {
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
}


class JobNotFoundError(ServiceError):
    """No job with that id (finished jobs expire)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.NOT_FOUND, message)


class JobNotDoneError(ServiceError):
    """The result of a job that has not succeeded (yet)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.JOB_NOT_DONE, message)


JOB_EXAMPLE = {
    "id": "3f2c9a",
    "state": "running",
    "progress": {
        "frames_done": 120,
        "frames_total": 480,
        "fraction": 0.25,
        "frames_per_second": 9.5,
        "eta_s": 37.9,
    },
    "faces": 118,
    "created_at": 1764500000.0,
    "started_at": 1764500001.2,
    "finished_at": None,
    "error": None,
    "result": None,
}
_JOB_JSON = {"application/json": {"example": JOB_EXAMPLE}}
JOB_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [VIDEO_FIELD],
                "additionalProperties": False,
                "properties": {
                    VIDEO_FIELD: {
                        "type": "string",
                        "format": "binary",
                        "description": "the clip, with its file name: "
                        + " ".join(sorted(MEDIA_TYPES)),
                    },
                    "start": {"type": "number", "minimum": 0, "description": "seconds to skip"},
                    "duration": {"type": "number", "exclusiveMinimum": 0},
                    "crf": {"type": "integer", "minimum": 0, "maximum": 51},
                    "strength": {"type": "number", "minimum": 0, "maximum": 1},
                    "max_faces": {"type": "integer", "minimum": 1},
                },
            },
            "example": {VIDEO_FIELD: "(binary MP4)", "duration": 5},
        }
    },
}
_UPLOAD_ERRORS = (
    ErrorKind.MALFORMED_REQUEST,
    ErrorKind.INVALID_VIDEO,
    ErrorKind.UNAUTHORIZED,
    ErrorKind.PAYLOAD_TOO_LARGE,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    ErrorKind.UNSUPPORTED_FORMAT,
    ErrorKind.INVALID_PARAMETER,
    ErrorKind.TOO_MANY_JOBS,
    ErrorKind.NOT_READY,
    ErrorKind.MODEL_FAILED,
    ErrorKind.SHUTTING_DOWN,
)


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


class _VideoPart:
    """python-multipart callbacks: the `video` field streamed to a file, short text fields."""

    def __init__(self, target_dir: Path, max_bytes: int, too_large: str) -> None:
        self.target_dir, self.max_bytes, self.too_large = target_dir, max_bytes, too_large
        self.path: Path | None = None
        self.filename = ""
        self.fields: dict[str, str] = {}
        self.ended = False
        self._name: str | None = None
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = bytearray(), bytearray()
        self._file: BinaryIO | None = None
        self._size = 0
        self._text = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, a, b: self._field.extend(d[a:b]),
            "on_header_value": lambda d, a, b: self._value.extend(d[a:b]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": lambda: setattr(self, "ended", True),
        }

    def _begin(self) -> None:
        self._headers, self._name, self._text = {}, None, bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        kind, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name")
        if kind != b"form-data" or not name:
            raise ServiceError(
                ErrorKind.MALFORMED_REQUEST, "a multipart field has no Content-Disposition name"
            )
        self._name = name.decode("utf-8", "replace")
        if self._name == VIDEO_FIELD:
            if self.path is not None:
                raise ServiceError(ErrorKind.INVALID_PARAMETER, "send exactly one 'video' field")
            self.filename = Path(params.get(b"filename", b"").decode("utf-8", "replace")).name
            suffix = Path(self.filename).suffix.lower()
            if suffix not in VIDEO_SUFFIXES:
                raise ServiceError(
                    ErrorKind.UNSUPPORTED_MEDIA_TYPE,
                    f"the video's file name must end in one of {' '.join(VIDEO_SUFFIXES)}",
                )
            self.path = self.target_dir / f"input{suffix}"
            self._file = self.path.open("wb")
        elif self._name not in FIELDS:
            raise ServiceError(
                ErrorKind.INVALID_PARAMETER, unknown_field(self._name, b"filename" in params)
            )

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._size += end - start
            if self._size > self.max_bytes:
                raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, self.too_large)
            self._file.write(data[start:end])
        else:
            self._text += data[start:end]
            if len(self._text) > MAX_FIELD_BYTES:
                raise ServiceError(
                    ErrorKind.PAYLOAD_TOO_LARGE, f"form field {self._name!r} is too long"
                )

    def _end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        elif self._name is not None:
            self.fields[self._name] = bytes(self._text).decode("utf-8", "replace").strip()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def unknown_field(name: str, is_file: bool) -> str:
    """Why a form field is refused: a file belongs in `video`; a close name is suggested, else
    the fields are listed."""
    if is_file:
        return (
            f"the video goes in the field {VIDEO_FIELD!r}, not {name!r}; "
            f"the other fields are {', '.join(FIELDS)}"
        )
    hint = did_you_mean(name, (VIDEO_FIELD, *FIELDS))
    return f"{name} is not a known field" + (
        hint or f"; the fields are {', '.join((VIDEO_FIELD, *FIELDS))}"
    )


async def _read_video(request: Request, folder: Path, max_bytes: int) -> _VideoPart:
    part = _VideoPart(folder, max_bytes, too_large_message(max_bytes, "max_job_bytes"))
    body = open_multipart(request, part.callbacks(), max_bytes, "max_job_bytes", VIDEO_FIELD)
    try:
        await feed_multipart(request, body.parser, body.body_limit, body.too_large)
    finally:
        part.close()
    if not part.ended:
        raise ServiceError(
            ErrorKind.MALFORMED_REQUEST, "the multipart body ended before its closing boundary"
        )
    if part.path is None:
        raise ServiceError(ErrorKind.INVALID_PARAMETER, "the multipart field 'video' is missing")
    return part


def _options(fields: dict[str, str], service: ServiceState) -> VideoOptions:
    s = service.settings
    try:
        given = {k: v for k, v in fields.items() if v != ""}
        options = VideoOptions(
            crf=int(given.get("crf", s.job_crf)),
            start_s=float(given.get("start", 0.0)),
            duration_s=float(given["duration"]) if "duration" in given else None,
            strength=float(given.get("strength", 1.0)),
            max_faces=int(given.get("max_faces", s.max_faces)),
            batch_faces=s.max_batch_faces,
            window_frames=s.job_window_frames,
        )
        if options.max_faces is not None and options.max_faces > s.max_faces:
            raise InvalidInputError(f"max_faces is at most {s.max_faces}")
        return options.validated()
    except (ValueError, InvalidInputError) as exc:
        raise ServiceError(ErrorKind.INVALID_PARAMETER, f"bad video option: {exc}") from exc


def _probe(path: Path, options: VideoOptions, max_frames: int, filename: str) -> None:
    """Open the upload as the job will (VideoError for bad input); refuse too many frames."""
    with VideoSource(path, start_s=options.start_s, duration_s=options.duration_s) as source:
        frames = source.expected_frames()
    if frames is not None and frames > max_frames:
        raise ServiceError(
            ErrorKind.PAYLOAD_TOO_LARGE,
            f"{filename} has {frames} frames in the asked range, over the {max_frames} limit; "
            "send a shorter piece (start, duration)",
        )


@router.post(
    "",
    status_code=202,
    dependencies=[Depends(require_api_key)],
    operation_id="submit_job",
    openapi_extra={"requestBody": JOB_BODY},
    responses={
        202: {"model": JobView, "content": _JOB_JSON, "headers": OK_HEADERS},
        **ops_responses(*_UPLOAD_ERRORS),
    },
)
async def submit(
    request: Request,
    service: ServiceState = Depends(get_service),
    jobs: JobManager = Depends(get_jobs),
) -> JSONResponse:
    """Upload a video (multipart field `video`; optional start, duration, crf, strength,
    max_faces); 202 with the job, whose progress GET /v1/jobs/{id} reports."""
    refuse_query(request)
    service.check_ready()
    if not jobs.has_room():
        raise ServiceError(
            ErrorKind.TOO_MANY_JOBS,
            f"{len(jobs.jobs)} video jobs held (limit {jobs.settings.max_jobs}); fetch or "
            "DELETE finished ones",
            retry_after_s=jobs.retry_after_s(),
        )
    job_id, folder = jobs.new_folder()
    filename = "the upload"
    try:
        part = await _read_video(request, folder, jobs.settings.max_job_bytes)
        assert part.path is not None  # _read_video refuses a body without the video
        filename = part.filename or filename
        options = _options(part.fields, service)
        await asyncio.to_thread(_probe, part.path, options, jobs.settings.max_job_frames, filename)
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        _hide_paths(exc, folder, filename)
        raise
    job = jobs.add(job_id, folder, part.path, options, part.filename)
    return JSONResponse(job.view(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


def _hide_paths(exc: BaseException, folder: Path, name: str) -> None:
    """Errors name the file by the client's name, never by the server's path."""
    if exc.args and isinstance(exc.args[0], str) and str(folder) in exc.args[0]:
        text = exc.args[0]
        for suffix in VIDEO_SUFFIXES:
            text = text.replace(str(folder / f"input{suffix}"), name)
        exc.args = (text.replace(str(folder), name), *exc.args[1:])


def _job(jobs: JobManager, job_id: str) -> Job:
    job = jobs.get(job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id!r} (finished jobs expire, or it was deleted)")
    return job


@router.get(
    "/{job_id}",
    dependencies=[Depends(require_api_key)],
    operation_id="job_status",
    responses={
        200: {"model": JobView, "content": _JOB_JSON, "headers": OK_HEADERS},
        **ops_responses(ErrorKind.UNAUTHORIZED, ErrorKind.NOT_FOUND),
    },
)
async def status(job_id: str, jobs: JobManager = Depends(get_jobs)) -> dict:
    """State (queued, running, succeeded, failed) and progress in frames, with fps and ETA."""
    return _job(jobs, job_id).view()


@router.get(
    "/{job_id}/result",
    dependencies=[Depends(require_api_key)],
    operation_id="job_result",
    response_class=FileResponse,
    responses={
        200: {
            "description": "the restored video (`application/octet-stream` when that is what the "
            "client asks for: clients generated from this schema read it as a file)",
            "content": {
                t: {"schema": {"type": "string", "format": "binary"}, "example": "(binary video)"}
                for t in (*MEDIA_TYPES.values(), "application/octet-stream")
            },
            "headers": OK_HEADERS,
        },
        **ops_responses(ErrorKind.UNAUTHORIZED, ErrorKind.NOT_FOUND, ErrorKind.JOB_NOT_DONE),
    },
)
async def result(
    job_id: str, request: Request, jobs: JobManager = Depends(get_jobs)
) -> FileResponse:
    """The restored video of a succeeded job; 409 while it is not done."""
    job = _job(jobs, job_id)
    if job.state is not JobState.SUCCEEDED:
        raise JobNotDoneError(f"job {job_id} is {job.state}; its result is not available")
    stem = Path(job.filename).stem or "video"
    return FileResponse(
        job.output,
        media_type=answer_media_type(
            request.headers.get("accept", ""),
            MEDIA_TYPES.get(job.output.suffix, "application/octet-stream"),
        ),
        filename=f"{stem}-restored{job.output.suffix}",
    )


@router.delete(
    "/{job_id}",
    dependencies=[Depends(require_api_key)],
    operation_id="delete_job",
    responses={
        200: {"model": JobView, "content": _JOB_JSON, "headers": OK_HEADERS},
        **ops_responses(ErrorKind.UNAUTHORIZED, ErrorKind.NOT_FOUND),
    },
)
async def delete(job_id: str, jobs: JobManager = Depends(get_jobs)) -> dict:
    """Cancel a queued or running job, or remove a finished one, with its files."""
    job = jobs.delete(job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id!r}")
    return job.view() | {"result": None}
