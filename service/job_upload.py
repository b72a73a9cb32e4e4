"""The upload of a video job: the multipart body streamed to the job's folder through
python-multipart, refused the moment it passes `max_job_bytes`, hashed on the way (the
`Idempotency-Key` compares uploads by that digest), and the `Idempotency-Key` header checked.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fastapi import Request
from python_multipart.multipart import parse_options_header

from model.media.video.config import VIDEO_SUFFIXES
from model.runtime.messages import did_you_mean
from service.errors import ErrorKind, ServiceError
from service.upload import feed_multipart, open_multipart, too_large_message

if TYPE_CHECKING:  # python-multipart defines its callback types for type checkers only
    from python_multipart.multipart import MultipartCallbacks

VIDEO_FIELD = "video"
FIELDS = ("start", "duration", "crf", "strength", "max_faces")
MAX_FIELD_BYTES = 64


class VideoPart:
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
        self.digest = hashlib.sha256()  # of the video's bytes, for Idempotency-Key

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
            self.digest.update(data[start:end])
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


async def read_video(request: Request, folder: Path, max_bytes: int) -> VideoPart:
    part = VideoPart(folder, max_bytes, too_large_message(max_bytes, "max_job_bytes"))
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


IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")  # printable ASCII, no spaces


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, checked (422 for one that cannot be a key)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.match(key):
        raise ServiceError(
            ErrorKind.INVALID_PARAMETER,
            f"the {IDEMPOTENCY_HEADER} header must be 1 to 255 printable ASCII characters "
            "without spaces (a UUID, say)",
        )
    return key


def upload_digest(part: VideoPart) -> str:
    """What makes two submissions "the same upload": the video's bytes and the form fields."""
    digest = part.digest.copy()
    for name in sorted(part.fields):
        digest.update(f"\0{name}={part.fields[name]}".encode())
    return digest.hexdigest()
