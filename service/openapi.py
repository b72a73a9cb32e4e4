"""What the OpenAPI schema says beyond what FastAPI infers: the multipart body of /restore, the
headers of each answer, and the error responses of each route (built from `ErrorKind`).

The two answers of a restore are two operations, so clients generated from the schema get each
right: `restore` (POST /restore) answers the image file, declared as binary only; `restore_json`
(POST /restore/json) answers `RestoreResult`.

The bearer scheme is declared on /restore; when the server has no API key it is optional
(`security: [{}, {HTTPBearer: []}]`), which is what the server then does.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from model.media.codecs.formats import CONTENT_TYPES
from service.errors import COMMON_KINDS, REQUEST_ID_HEADER, ErrorKind, openapi_responses
from service.schemas import RESULT_EXAMPLE, RestoreResult, form_properties
from service.settings import Settings
from service.tracing import TRACE_ID_HEADER
from service.upload import IMAGE_FIELD

RESULT_HEADERS = (
    "X-Faces-Detected",
    "X-Faces-Restored",
    "X-Queue-Time",
    "X-Inference-Time",
    "X-Total-Time",
    "X-Background-Time",
    "X-Output-Format",
    "X-Metadata-Dropped",
)
RESULT_HEADER_DOCS = {
    "X-Faces-Detected": (
        "faces the detector found, before faces, max_faces, min_face_size and only_center_face "
        "chose",
        "integer",
    ),
    "X-Faces-Restored": (
        "faces restored; with 0 the pixels are the input's (the same bytes when the format and "
        "scale are kept)",
        "integer",
    ),
    "X-Queue-Time": ("seconds the faces waited for the model worker", "number"),
    "X-Inference-Time": ("seconds of the model calls holding this image's faces", "number"),
    "X-Total-Time": ("seconds from arrival to the answer", "number"),
    "X-Background-Time": ("seconds of the background network (0 for background=none)", "number"),
    "X-Output-Format": ("the format written (png, jpeg, webp, heic, avif)", "string"),
    "X-Metadata-Dropped": (
        "metadata blocks left out (exif, icc): unreadable, or too large for the format",
        "string",
    ),
}


def ops_responses(*kinds: ErrorKind) -> dict[int | str, dict[str, Any]]:
    return openapi_responses(*kinds, *COMMON_KINDS)


OK_HEADERS = {
    "X-Request-Id": REQUEST_ID_HEADER,
    TRACE_ID_HEADER: {
        "description": "the trace id (32 hex digits) when tracing is on and this request was "
        "sampled (docs/operations.md#traces); absent otherwise",
        "schema": {"type": "string"},
    },
}


# `faces` is one text field, "0,2": a field sent twice is refused, so the array the form's
# model describes (which generators send as one part per item) is declared as the string it is.
FACES_FIELD = {
    "type": "string",
    "description": form_properties()["faces"]["description"] + "; one field, comma-separated",
    "examples": ["0,2"],
}
RESTORE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [IMAGE_FIELD],
                "additionalProperties": False,
                "properties": {
                    IMAGE_FIELD: {
                        "type": "string",
                        "format": "binary",
                        "description": "the photo: JPEG, PNG or WebP (sniffed from the bytes)",
                    },
                    **form_properties(),
                    "faces": FACES_FIELD,
                },
            },
            "example": {IMAGE_FIELD: "(binary JPEG)", "aligned": False, "output_format": "png"},
        }
    },
}
IMAGE_CONTENT = {"schema": {"type": "string", "format": "binary"}, "example": "(binary image)"}
RESTORE_ERRORS = (
    ErrorKind.MALFORMED_REQUEST,
    ErrorKind.INVALID_IMAGE,
    ErrorKind.UNAUTHORIZED,
    ErrorKind.PAYLOAD_TOO_LARGE,
    ErrorKind.IMAGE_TOO_LARGE,
    ErrorKind.UNSUPPORTED_MEDIA_TYPE,
    ErrorKind.UNSUPPORTED_FORMAT,
    ErrorKind.INVALID_PARAMETER,
    ErrorKind.QUEUE_FULL,
    ErrorKind.OVERLOADED,
    ErrorKind.TOO_MANY_REQUESTS,
    ErrorKind.MODEL_OUTPUT,
    ErrorKind.NOT_READY,
    ErrorKind.MODEL_FAILED,
    ErrorKind.SHUTTING_DOWN,
    ErrorKind.DEADLINE_EXCEEDED,
)


RESULT_HEADERS_SCHEMA = {
    **{
        name: {"description": text, "schema": {"type": kind}}
        for name, (text, kind) in RESULT_HEADER_DOCS.items()
    },
    **OK_HEADERS,
}

# POST /restore declares only binary answers: generators take the first content type they can
# parse for an operation's result (openapi-python-client: JSON, octet-stream or text) or ask
# for JSON when it is listed (openapi-generator), so a JSON entry here would make the
# generated default call parse the image as JSON. The JSON answer has its own operation,
# POST /restore/json; `Accept: application/json` on /restore still gives it (curl, the page).
RESTORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the restored image file, in the format `X-Output-Format` names "
        "(`application/octet-stream` when that is what the client asks for); "
        "`Accept: application/json` gives the JSON answer of POST /restore/json instead",
        "content": {
            **{t: IMAGE_CONTENT for t in CONTENT_TYPES.values()},
            "application/octet-stream": IMAGE_CONTENT,
        },
        "headers": RESULT_HEADERS_SCHEMA,
    },
    **ops_responses(*RESTORE_ERRORS),
}
RESTORE_JSON_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the restored image file in base64, with its faces, size and timings",
        "model": RestoreResult,
        "content": {"application/json": {"example": RESULT_EXAMPLE}},
        "headers": RESULT_HEADERS_SCHEMA,
    },
    **ops_responses(*RESTORE_ERRORS),
}
RESTORE_PATHS = ("/restore", "/restore/json")


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Generate the schema once, with this server's limits on the form fields, and bearer auth
    marked optional when no API key is set."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            _apply_limits(schema, settings)
            if not settings.api_key:
                for item in schema["paths"].values():
                    for operation in item.values():
                        if operation.get("security"):
                            operation["security"] = [{}, *operation["security"]]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _apply_limits(schema: dict[str, Any], settings: Settings) -> None:
    """The form fields' bounds that depend on the server's settings."""
    allowed = [*settings.allowed_formats, *(["jpg"] if "jpeg" in settings.allowed_formats else [])]
    for path in RESTORE_PATHS:
        body = schema["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        fields = body["schema"]["properties"]
        if "max_faces" in fields:
            fields["max_faces"]["maximum"] = settings.max_faces
        if "output_format" in fields:
            fields["output_format"]["enum"] = allowed
