"""Request and response shapes of the HTTP API (also what `/docs` shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.options import OptionFields


class ErrorDetail(BaseModel):
    type: str = Field(description="stable machine-readable kind, e.g. invalid_image, queue_full")
    message: str = Field(description="what went wrong, for people")


class ErrorBody(BaseModel):
    error: ErrorDetail

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"error": {"type": "queue_full", "message": "model queue full"}}]
        }
    )


# What the form's fields mean in HTTP words (the JSON answer, the headers, the server's limits);
# bounds and defaults are the options' own (model/options.py OptionFields).
HTTP_DESCRIPTIONS = {
    "output_format": "png, jpeg (or jpg), webp, heic or avif; default: the input's format when "
    "the server can write it, else png (the X-Output-Format header says which)",
    "faces": "restore only these faces, e.g. 0,2: indices in the order the JSON lists "
    "the faces of a run without this field (largest first)",
    "min_face_size": "ignore faces whose box is smaller than this many pixels; the detector "
    "always drops those under OSDFACE_MIN_FACE_SIZE (default 16)",
}


def _http_descriptions(schema: dict[str, Any]) -> None:
    for name, text in HTTP_DESCRIPTIONS.items():
        schema["properties"][name]["description"] = text


class RestoreForm(OptionFields):
    """The form fields of POST /restore besides the `image` file. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_http_descriptions)


def form_properties() -> dict[str, Any]:
    """RestoreForm's JSON-schema properties as a multipart form sends them: a field is a value
    or absent, never `null` (an empty field means the default), with its default as example."""
    properties = RestoreForm.model_json_schema()["properties"]
    out = {}
    for name, prop in properties.items():
        prop = dict(prop)
        variants = [v for v in prop.pop("anyOf", []) if v.get("type") != "null"]
        if variants:
            prop.update(variants[0])
        if prop.get("default", 0) is None:
            del prop["default"]
        if "default" in prop:
            prop["examples"] = [prop["default"]]
        out[name] = prop
    return out


class FaceOut(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in input pixels, to 2 decimals")
    landmarks: list[list[float]] = Field(
        description="5 (x, y) points: eyes, nose, mouth corners, to 2 decimals"
    )
    score: float = Field(description="detector confidence, to 4 decimals")


class Timings(BaseModel):
    queue: float = Field(description="seconds the faces waited for the model worker")
    inference: float = Field(description="seconds of the model calls holding this image's faces")
    total: float = Field(description="seconds from request arrival to the answer")
    stages: dict[str, float] = Field(description="seconds per stage (decode, detect, unet, ...)")


RESULT_EXAMPLE: dict[str, Any] = {
    "image": "iVBORw0KGgo...",
    "content_type": "image/png",
    "width": 512,
    "height": 512,
    "faces_detected": 1,
    "faces_restored": 1,
    "faces": [
        {
            "box": [0.0, 0.0, 512.0, 512.0],
            "landmarks": [
                [192.98, 239.95],
                [318.9, 240.19],
                [256.63, 314.02],
                [201.26, 371.41],
                [313.09, 371.15],
            ],
            "score": 1.0,
        }
    ],
    "timings": {"queue": 0.01, "inference": 1.9, "total": 2.0, "stages": {"decode": 0.003}},
}


class RestoreResult(BaseModel):
    image: str = Field(description="the restored image file, base64")
    content_type: str
    width: int
    height: int
    faces_detected: int = Field(
        description="faces the detector found, before faces, max_faces, min_face_size and "
        "only_center_face chose"
    )
    faces_restored: int = Field(description="faces restored: the ones `faces` lists")
    faces: list[FaceOut] = Field(description="the restored faces, largest first")
    timings: Timings

    model_config = ConfigDict(json_schema_extra={"examples": [RESULT_EXAMPLE]})


class Health(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ok"}]})

    status: Literal["ok"] = Field(description="ok")


class Ready(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"status": "ready"}]})

    status: Literal["ready"] = Field(description="ready")


class Info(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "service": {"name": "osdface-service", "version": "0.1.0", "phase": "ready"},
                    "model": {"device": "cuda:0", "dtype": "float16", "files": {}},
                    "detector": {"name": "retinaface_resnet50"},
                    "batching": {"max_batch_faces": 8, "request_timeout_s": 60.0},
                    "limits": {"max_upload_bytes": 20971520, "max_faces": 16},
                }
            ]
        }
    )

    service: dict[str, Any] = Field(description="name, version, uptime")
    model: dict[str, Any] = Field(description="files and sha256, device, dtype, versions")
    detector: dict[str, Any]
    batching: dict[str, Any]
    limits: dict[str, Any]


class QueueStatus(BaseModel):
    """What a new request would wait for now (the page shows it while restoring)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"queued_faces": 3, "requests_in_flight": 2, "predicted_wait_s": 4.2}]
        }
    )

    queued_faces: int = Field(description="faces waiting for the model worker")
    requests_in_flight: int = Field(description="POST /restore requests being served")
    predicted_wait_s: float = Field(
        description="predicted seconds until one more face would be restored (0: no estimate)"
    )


class JobProgress(BaseModel):
    frames_done: int = Field(description="frames restored and written")
    frames_total: int | None = Field(description="frames in the asked range (None: unknown)")
    fraction: float | None = Field(description="frames_done / frames_total, 0..1")
    frames_per_second: float = Field(description="frames restored per second so far")
    eta_s: float | None = Field(description="predicted seconds until the job ends")
    segments_done: int = Field(description="output segments finished (a job resumes after them)")
    segments_total: int | None = Field(description="output segments of the job (None: not yet)")


class JobError(BaseModel):
    type: str = Field(description="the error type, as in the error table")
    message: str


class JobView(BaseModel):
    """A video job as `GET /v1/jobs/{id}` reports it (`service/jobs.py` `job_view`)."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: JobProgress
    faces: int = Field(description="faces restored so far, over all frames")
    created_at: float = Field(description="Unix time of the upload")
    started_at: float | None = Field(description="Unix time the job started running")
    finished_at: float | None = Field(description="Unix time the job ended")
    error: JobError | None = Field(description="why the job failed")
    takeovers: int = Field(
        description="times another replica resumed the job after its replica stopped answering"
    )
    segments_redone: int = Field(description="segments restored again after such a cut")
    result: str | None = Field(description="the path of the restored video once succeeded")
