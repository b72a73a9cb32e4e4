"""The HTTP endpoints: /restore (and /restore/json), /healthz, /readyz, /metrics, /v1/info."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from model.errors import InvalidInputError
from model.media.pipeline import PhotoResult, RestoreOptions, finish_photo, prepare_photo
from model.runtime.messages import describe, did_you_mean
from service import tracing
from service.background import background_on_worker, both
from service.errors import (
    ErrorKind,
    ServiceError,
)
from service.openapi import (
    OK_HEADERS,
    RESTORE_BODY,
    RESTORE_JSON_RESPONSES,
    RESTORE_RESPONSES,
    ops_responses,
)
from service.queue_items import BatchResult
from service.schemas import (
    FaceOut,
    Health,
    Info,
    QueueStatus,
    Ready,
    RestoreForm,
    RestoreResult,
)
from service.settings import Settings
from service.state import SERVICE_NAME, ServiceState, service_version
from service.upload import IMAGE_FIELD, read_upload, refuse_query

router = APIRouter()
T = TypeVar("T")

_bearer = HTTPBearer(
    auto_error=False,
    description="the API key, when the server has one (`OSDFACE_API_KEY`); else not needed",
)


def get_service(request: Request) -> ServiceState:
    return request.app.state.service


def require_api_key(
    credentials: HTTPAuthorizationCredentials | None = Security(_bearer),
    service: ServiceState = Depends(get_service),
) -> None:
    """`Authorization: Bearer <key>` when `api_key` is set; constant-time comparison."""
    expected = service.settings.api_key
    if not expected:
        return
    given = credentials.credentials.strip() if credentials else ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise ServiceError(
            ErrorKind.UNAUTHORIZED, "a valid 'Authorization: Bearer <API key>' header is required"
        )


# --- health, readiness, metrics, info ----------------------------------------------------------


@router.get(
    "/healthz",
    response_model=Health,
    tags=["ops"],
    operation_id="healthz",
    responses={200: {"headers": OK_HEADERS}, **ops_responses()},
)
async def healthz() -> Health:
    """The process is alive and its event loop answers."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    tags=["ops"],
    operation_id="readyz",
    responses={
        200: {"headers": OK_HEADERS},
        **ops_responses(ErrorKind.NOT_READY, ErrorKind.MODEL_FAILED, ErrorKind.SHUTTING_DOWN),
    },
)
async def readyz(service: ServiceState = Depends(get_service)) -> Ready:
    """Weights loaded and one warm-up batch done; 503 with the reason otherwise."""
    service.check_ready()
    return Ready(status="ready")


@router.get(
    "/metrics",
    tags=["ops"],
    response_class=Response,
    operation_id="metrics",
    responses={
        200: {
            "description": "Prometheus text format 0.0.4, or OpenMetrics 1.0 with trace-id "
            "exemplars when Accept asks for application/openmetrics-text",
            "content": {
                "text/plain": {"example": "osdface_ready 1.0\n"},
                "application/openmetrics-text": {"example": "osdface_ready 1.0\n# EOF\n"},
            },
            "headers": OK_HEADERS,
        },
        **ops_responses(),
    },
)
async def metrics(request: Request, service: ServiceState = Depends(get_service)) -> Response:
    """Prometheus text exposition; OpenMetrics (with exemplars) when Accept asks for it."""
    body, content_type = service.metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type, headers={"Vary": "Accept"})


@router.get(
    "/v1/info",
    response_model=Info,
    tags=["ops"],
    operation_id="info",
    responses={
        200: {"headers": OK_HEADERS},
        **ops_responses(ErrorKind.NOT_READY, ErrorKind.MODEL_FAILED, ErrorKind.SHUTTING_DOWN),
    },
)
async def info(service: ServiceState = Depends(get_service)) -> Info:
    """Model files and checksums, device, dtype, versions, batching settings and limits."""
    if service.restorer is None or service.detector is None:
        service.check_ready()  # says why: loading, failed or shutting down
        raise ServiceError(ErrorKind.NOT_READY, service.reason)
    s = service.settings
    return Info(
        service={
            "name": SERVICE_NAME,
            "version": service_version(),
            "phase": str(service.phase),
            "uptime_s": round(time.time() - service.started_at, 3),
        },
        model={
            **service.restorer.describe(),
            "backgrounds": {n: b.describe() for n, b in service.backgrounds.items()},
        },
        detector=service.detector.describe(),
        batching={
            "max_batch_faces": s.max_batch_faces,
            "max_batch_delay_ms": s.max_batch_delay_ms,
            "max_queue_faces": s.max_queue_faces,
            "max_inflight_requests": s.max_inflight_requests,
            "request_timeout_s": s.request_timeout_s,
            "cpu_workers": s.cpu_workers,
        },
        limits={
            "max_upload_bytes": s.max_upload_bytes,
            "max_pixels": s.max_pixels,
            "max_output_pixels": s.max_output_pixels,
            "max_faces": s.max_faces,
            "allowed_formats": list(s.allowed_formats),
        },
    )


@router.get(
    "/v1/queue",
    response_model=QueueStatus,
    tags=["ops"],
    operation_id="queue",
    responses={200: {"headers": OK_HEADERS}, **ops_responses(ErrorKind.NOT_READY)},
)
async def queue(service: ServiceState = Depends(get_service)) -> QueueStatus:
    """Faces queued and the predicted wait for one more, from the model worker's speed."""
    if service.batcher is None:
        raise ServiceError(ErrorKind.NOT_READY, service.reason)
    return QueueStatus(
        queued_faces=service.batcher.queued,
        requests_in_flight=service.inflight,
        predicted_wait_s=round(service.batcher.predicted_finish_s(1), 3),
    )


# --- restore -----------------------------------------------------------------------------------


@router.post(
    "/restore",
    tags=["restore"],
    response_class=Response,
    operation_id="restore",
    openapi_extra={"requestBody": RESTORE_BODY},
    responses=RESTORE_RESPONSES,
)
async def restore(
    request: Request,
    service: ServiceState = Depends(get_service),
    _: None = Depends(require_api_key),
) -> Response:
    """Restore the faces of one photo (or one aligned 512x512 face with `aligned=true`).

    No face found (or none chosen) is a 200 with `X-Faces-Restored: 0` and the image unchanged;
    `X-Faces-Detected` counts the faces found before `faces`, `max_faces`, `min_face_size` and
    `only_center_face` chose. A request the model worker cannot finish before its deadline is
    refused at once: 429 `overloaded`. The answer is the image file; `Accept: application/json`
    gives the JSON answer of POST /restore/json.
    """
    return await _restore(request, service, as_json=wants_json(request.headers.get("accept", "")))


@router.post(
    "/restore/json",
    tags=["restore"],
    response_class=JSONResponse,
    operation_id="restore_json",
    openapi_extra={"requestBody": RESTORE_BODY},
    responses=RESTORE_JSON_RESPONSES,
)
async def restore_json(
    request: Request,
    service: ServiceState = Depends(get_service),
    _: None = Depends(require_api_key),
) -> Response:
    """POST /restore with the JSON answer: the image in base64, each restored face's box,
    landmarks and score, the output's size and the timings per stage (same form, same headers).
    """
    return await _restore(request, service, as_json=True)


async def _restore(request: Request, service: ServiceState, *, as_json: bool) -> Response:
    refuse_query(request)
    settings = service.settings
    started = request.scope.get("state", {}).get("started_at", time.monotonic())
    deadline = started + settings.request_timeout_s
    with contextlib.ExitStack() as admitted:
        with tracing.span("admission"):
            service.check_ready()
            admitted.enter_context(service.admitted())
            assert service.batcher is not None
            service.batcher.admit(1, deadline)  # queue room and time, before reading the upload
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                with tracing.span("upload") as span:
                    upload = await read_upload(request, settings.max_upload_bytes)
                    span.set("osdface.upload.bytes", len(upload.image))
                    options = parse_options(upload.fields, settings)
                work = asyncio.ensure_future(
                    _restore_photo(service, upload.image, options, deadline)
                )
                result, batch = await _unless_disconnected(work, request)
        except TimeoutError as exc:
            raise ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                f"the request did not finish within {settings.request_timeout_s:g} s",
            ) from exc
    total = time.monotonic() - started
    return _response(request, result, batch, total, as_json=as_json)


def parse_options(fields: dict[str, str], settings: Settings) -> RestoreOptions:
    """Form fields (strings) -> validated RestoreOptions; a 422 ServiceError if not."""
    given = {name: value for name, value in fields.items() if value != ""}
    try:
        form = RestoreForm.model_validate(given)
    except ValidationError as exc:
        raise ServiceError(ErrorKind.INVALID_PARAMETER, _describe(exc)) from exc
    if form.background != "none" and form.background not in settings.background_models:
        raise ServiceError(
            ErrorKind.INVALID_PARAMETER,
            f"background {form.background} is not loaded on this server "
            f"(loaded: {', '.join(settings.background_models) or 'none'})",
        )
    return form.to_options(max_faces=settings.max_faces, allowed_formats=settings.allowed_formats)


async def _none() -> None:
    return None


def _describe(exc: ValidationError) -> str:
    """`strength must be at most 1`; `strenght is not a known field; did you mean strength?`,
    and the known fields when no name is close."""
    known = (IMAGE_FIELD, *RestoreForm.model_fields)
    text = "; ".join(describe(exc, known=known))
    unknown = [str(e["loc"][-1]) for e in exc.errors() if e["type"] == "extra_forbidden"]
    if unknown and not any(did_you_mean(name, known) for name in unknown):
        text += f" (the fields are {', '.join(known)})"
    return text


async def _restore_photo(
    service: ServiceState, data: bytes, options: RestoreOptions, deadline: float
) -> tuple[PhotoResult, BatchResult | None]:
    """Decode/detect/align on the CPU pool, faces through the batcher, paste/encode on the pool.

    The stages' spans are made from the pipeline's own timings (service/tracing.py)."""
    assert service.batcher is not None
    prepared, began = await service.run_cpu(
        _started, prepare_photo, data, service.detector, options, service.limits
    )
    tracing.stages(began, prepared.timings, tracing.PREPARE_STAGES)
    count = int(prepared.crops.shape[0])
    batch = None
    restored = prepared.crops  # (0, 3, 512, 512) when no face was found
    try:
        faces = service.batcher.submit(prepared.crops, deadline=deadline) if count else _none()
        work = background_on_worker(service.batcher, prepared, service.backgrounds, deadline)
        batch, background = await both(faces, work)
        if batch is not None:
            tracing.model_wait(batch, count)
        restored = batch.output if batch is not None else restored
        result, began = await service.run_cpu(
            _started, finish_photo, prepared, restored, background
        )
        tracing.stages(began, result.timings, tracing.FINISH_STAGES)
    except InvalidInputError as exc:
        # The client's input was accepted by prepare_photo; an input error past that point
        # (a bad tensor into the restorer, NaN out of it) is ours: a 500, not a 422.
        raise RuntimeError(f"the model stage broke its contract: {exc}") from exc
    service.metrics.faces_per_image.observe(count)
    # Stages that did not run for this image (detect for aligned input, paste without faces)
    # are reported as 0.0 by the pipeline; they are not observations.
    service.metrics.observe_stages({k: v for k, v in result.timings.items() if v > 0})
    return result, batch


def _started(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """`fn(*args)` and the `time.monotonic()` instant it began: where its stages' spans start."""
    began = time.monotonic()
    return fn(*args), began


async def _unless_disconnected(
    work: asyncio.Future[tuple[PhotoResult, BatchResult | None]], request: Request
) -> tuple[PhotoResult, BatchResult | None]:
    """Await `work`, cancelling it (and so dropping its queued faces) if the client leaves."""
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        either: set[asyncio.Future[Any]] = {work, watcher}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ServiceError(
            ErrorKind.CLIENT_DISCONNECTED, "the client disconnected before the answer was ready"
        )
    finally:
        work.cancel()
        watcher.cancel()
        await asyncio.gather(work, watcher, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read, so the server's next message is the disconnect (if any).
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _response(
    request: Request, result: PhotoResult, batch: BatchResult | None, total: float, *, as_json: bool
) -> Response:
    queue = batch.queue_wait_s if batch else 0.0
    inference = batch.inference_s if batch else 0.0
    headers = {
        "X-Faces-Detected": str(result.faces_detected),
        "X-Faces-Restored": str(len(result.faces)),
        "X-Queue-Time": f"{queue:.4f}",
        "X-Inference-Time": f"{inference:.4f}",
        "X-Total-Time": f"{total:.4f}",
        "X-Background-Time": f"{result.timings.get('background', 0.0):.4f}",
        "X-Output-Format": result.format,
        "Vary": "Accept",
    }
    if result.dropped_metadata:
        headers["X-Metadata-Dropped"] = ",".join(result.dropped_metadata)
    if not as_json:
        media_type = answer_media_type(request.headers.get("accept", ""), result.content_type)
        return Response(result.data, media_type=media_type, headers=headers)
    stages = dict(result.timings)
    if batch is not None:
        stages.update(batch.timings)
    body = RestoreResult(
        image=base64.b64encode(result.data).decode("ascii"),
        content_type=result.content_type,
        width=result.width,
        height=result.height,
        faces_detected=result.faces_detected,
        faces_restored=len(result.faces),
        faces=[FaceOut.model_validate(f.to_json()) for f in result.faces],
        timings={"queue": queue, "inference": inference, "total": total, "stages": stages},
    )
    return JSONResponse(body.model_dump(), headers=headers)


def wants_json(accept: str) -> bool:
    """True when Accept lists application/json (q > 0) at least as high as any image type."""
    json_q, image_q, _ = _accept_qualities(accept)
    return json_q > 0 and json_q >= image_q


def answer_media_type(accept: str, media_type: str) -> str:
    """`media_type` (image/png, video/mp4, ...), or application/octet-stream when Accept ranks
    that above every image or video type: what clients generated from the schema may ask for."""
    _, typed_q, octet_q = _accept_qualities(accept)
    return "application/octet-stream" if octet_q > 0 and octet_q > typed_q else media_type


def _accept_qualities(accept: str) -> tuple[float, float, float]:
    """The highest q of application/json, of image/* and video/* types, and of
    application/octet-stream in an Accept header (0 where absent)."""
    json_q, image_q, octet_q = 0.0, 0.0, 0.0
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.strip().lower()
        if media == "application/json":
            json_q = max(json_q, q)
        elif media.startswith(("image/", "video/")):
            image_q = max(image_q, q)
        elif media == "application/octet-stream":
            octet_q = max(octet_q, q)
    return json_q, image_q, octet_q
