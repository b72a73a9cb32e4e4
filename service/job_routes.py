"""HTTP endpoints of video jobs: POST /v1/jobs, GET /v1/jobs/{id}, its /result, DELETE.

The upload is streamed to the job's folder through python-multipart and refused the moment it
passes `max_job_bytes`; the file is probed (container, video stream, codec, frame count) before
the 202, so bad input is a 4xx at once. A truncated stream can only be found while decoding:
the job then ends `failed` with the error that says so.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse

from model.errors import InvalidInputError
from model.media.video.config import VIDEO_SUFFIXES
from model.media.video.io import VideoSource
from model.media.video.restore import VideoOptions
from service.errors import ErrorKind, ServiceError
from service.job_runner import options_to_dict
from service.job_upload import VIDEO_FIELD, idempotency_key, read_video, upload_digest
from service.jobs import JobManager, job_view
from service.jobstore import JobRecord, JobState, StoreFullError
from service.openapi import OK_HEADERS, ops_responses
from service.routes import answer_media_type, get_service, require_api_key
from service.schemas import JobView
from service.state import ServiceState
from service.tracing_worker import carrier
from service.upload import refuse_query

router = APIRouter(prefix="/v1/jobs", tags=["video jobs"])

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
    "id": "3f2c9a0d6b1e4f7a8c5d2e9b0a1f3c4d",
    "state": "running",
    "progress": {
        "frames_done": 120,
        "frames_total": 480,
        "fraction": 0.25,
        "frames_per_second": 9.5,
        "eta_s": 37.9,
        "segments_done": 0,
        "segments_total": 2,
    },
    "faces": 118,
    "created_at": 1764500000.0,
    "started_at": 1764500001.2,
    "finished_at": None,
    "error": None,
    "takeovers": 0,
    "segments_redone": 0,
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


def _too_many_jobs(full: StoreFullError, retention_s: float) -> ServiceError:
    wait = 30.0
    if full.oldest_finished_at is not None:
        wait = max(1.0, full.oldest_finished_at + retention_s - time.time())
    return ServiceError(
        ErrorKind.TOO_MANY_JOBS,
        f"{full.held} video jobs held (limit {full.limit}); fetch or DELETE finished ones",
        retry_after_s=wait,
    )


@router.post(
    "",
    status_code=202,
    dependencies=[Depends(require_api_key)],
    operation_id="submit_job",
    openapi_extra={"requestBody": JOB_BODY},
    responses={
        200: {
            "model": JobView,
            "content": _JOB_JSON,
            "headers": OK_HEADERS,
            "description": "the job an earlier submission with the same Idempotency-Key made",
        },
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
    max_faces); 202 with the job, whose progress GET /v1/jobs/{id} reports. With an
    `Idempotency-Key` header, a repeated submission of the same upload answers 200 with the
    job the first one made (any replica), and the same key with another upload is refused."""
    refuse_query(request)
    key = idempotency_key(request)
    service.check_ready()
    if key is None:  # refused before the upload is read; a keyed retry is always answered
        try:
            await jobs.check_room()
        except StoreFullError as full:
            raise _too_many_jobs(full, jobs.settings.job_retention_s) from None
    job_id, folder = jobs.new_folder()
    filename = "the upload"
    try:
        part = await read_video(request, folder, jobs.settings.max_job_bytes)
        assert part.path is not None  # _read_video refuses a body without the video
        filename = part.filename or filename
        options = _options(part.fields, service)
        await asyncio.to_thread(_probe, part.path, options, jobs.settings.max_job_frames, filename)
        record = JobRecord(
            job_id,
            part.filename,
            part.path.suffix,
            options_to_dict(options),
            idempotency_key=key,
            upload_digest=upload_digest(part),
            trace=carrier() or None,
        )
        record, created = await jobs.create(record)
    except StoreFullError as full:
        shutil.rmtree(folder, ignore_errors=True)
        raise _too_many_jobs(full, jobs.settings.job_retention_s) from None
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        _hide_paths(exc, folder, filename)
        raise
    if not created:  # a repeated submission: the first one's job
        shutil.rmtree(folder, ignore_errors=True)
    return JSONResponse(
        job_view(record),
        status_code=202 if created else 200,
        headers={"Location": f"/v1/jobs/{record.id}"},
    )


def _hide_paths(exc: BaseException, folder: Path, name: str) -> None:
    """Errors name the file by the client's name, never by the server's path."""
    if exc.args and isinstance(exc.args[0], str) and str(folder) in exc.args[0]:
        text = exc.args[0]
        for suffix in VIDEO_SUFFIXES:
            text = text.replace(str(folder / f"input{suffix}"), name)
        exc.args = (text.replace(str(folder), name), *exc.args[1:])


async def _job(jobs: JobManager, job_id: str) -> JobRecord:
    job = await jobs.get(job_id)
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
    return job_view(await _job(jobs, job_id))


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
    job = await _job(jobs, job_id)
    if job.state is not JobState.SUCCEEDED:
        raise JobNotDoneError(f"job {job_id} is {job.state}; its result is not available")
    stem = Path(job.filename).stem or "video"
    output = jobs.folder(job.id) / f"output{job.suffix}"
    if not output.is_file():  # the record says succeeded, the shared folder lacks the file
        raise JobNotFoundError(
            f"job {job_id} succeeded but its video is not in this replica's jobs folder "
            "(is OSDFACE_JOBS_DIR a volume every replica mounts?)"
        )
    return FileResponse(
        output,
        media_type=answer_media_type(
            request.headers.get("accept", ""),
            MEDIA_TYPES.get(job.suffix, "application/octet-stream"),
        ),
        filename=f"{stem}-restored{job.suffix}",
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
    job = await jobs.delete(job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id!r}")
    return job_view(job) | {"result": None}
