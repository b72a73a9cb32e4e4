"""What the OpenAPI schema says beyond what FastAPI infers: the multipart body of /restore, the
headers of each answer, and the error responses of each route (built from `ErrorKind`).

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
from service.upload import IMAGE_FIELD

RESULT_HEADERS = (
    "X-Faces-Detected",
    "X-Queue-Time",
    "X-Inference-Time",
    "X-Total-Time",
    "X-Background-Time",
    "X-Output-Format",
    "X-Metadata-Dropped",
)
RESULT_HEADER_DOCS = {
    "X-Faces-Detected": ("faces found and restored", "integer"),
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


OK_HEADERS = {"X-Request-Id": REQUEST_ID_HEADER}


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
                },
            },
            "example": {IMAGE_FIELD: "(binary JPEG)", "aligned": False, "output_format": "png"},
        }
    },
}
IMAGE_CONTENT = {"schema": {"type": "string", "format": "binary"}}
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


RESTORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the restored image (or JSON with `Accept: application/json`)",
        "model": RestoreResult,
        "content": {
            "application/json": {"example": RESULT_EXAMPLE},
            **{t: IMAGE_CONTENT for t in CONTENT_TYPES.values()},
        },
        "headers": {
            **{
                name: {"description": text, "schema": {"type": kind}}
                for name, (text, kind) in RESULT_HEADER_DOCS.items()
            },
            **OK_HEADERS,
        },
    },
    **ops_responses(*RESTORE_ERRORS),
}


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
    body = schema["paths"]["/restore"]["post"]["requestBody"]["content"]["multipart/form-data"]
    fields = body["schema"]["properties"]
    if "max_faces" in fields:
        fields["max_faces"]["maximum"] = settings.max_faces
    if "output_format" in fields:
        allowed = [
            *settings.allowed_formats,
            *(["jpg"] if "jpeg" in settings.allowed_formats else []),
        ]
        fields["output_format"]["enum"] = allowed
