"""Reading the multipart upload of POST /restore, with every limit enforced while reading.

Starlette's form parser spools files of any size to disk before the handler sees them; here the
body is streamed through python-multipart and refused the moment it passes its byte limit (and
before reading anything when Content-Length already says so). The client's filename and
content type are never used: the format is sniffed from the bytes by `model.media.codecs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from service.errors import ErrorKind, ServiceError
from service.settings import env_name

if TYPE_CHECKING:  # python-multipart defines its callback types for type checkers only
    from python_multipart.multipart import MultipartCallbacks

IMAGE_FIELD = "image"
MAX_FIELD_BYTES = 1024  # the options are short words and numbers
MAX_PARTS = 16
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the option fields
MIB = 1024 * 1024


def refuse_query(request: Request) -> None:
    """A 422 for a query string on an upload: options are form fields, and a query parameter
    would otherwise be ignored without a word (`?strength=0.5` restoring at full strength)."""
    if not request.url.query:
        return
    names = ", ".join(dict.fromkeys(request.query_params.keys())) or request.url.query
    raise ServiceError(
        ErrorKind.INVALID_PARAMETER,
        f"options go in the multipart form, not the query string: send {names} as form "
        "fields (curl -F name=value) and leave the URL without '?'",
    )


def byte_limit(limit: int, setting: str) -> str:
    """A byte limit as the operator set it, with its variable: `20 MiB (20971520 bytes),
    OSDFACE_MAX_UPLOAD_BYTES`. The body may be refused a little past it (multipart framing);
    the message still names the configured number, the one the operator can look up."""
    return f"{limit / MIB:.4g} MiB ({limit} bytes), {env_name(setting)}"


def too_large_message(limit: int, setting: str) -> str:
    return f"the upload is over the limit of {byte_limit(limit, setting)}; send a smaller file"


@dataclass
class Upload:
    """The image's bytes (not yet validated) and the text form fields."""

    image: bytes
    fields: dict[str, str]


@dataclass
class _Part:
    name: str | None = None
    data: bytearray = field(default_factory=bytearray)
    header_field: bytearray = field(default_factory=bytearray)
    header_value: bytearray = field(default_factory=bytearray)
    disposition: bytes = b""


class _Collector:
    """python-multipart callbacks that keep the image and the fields, each within its limit."""

    def __init__(self, max_image_bytes: int, too_large: str) -> None:
        self.max_image_bytes, self.too_large = max_image_bytes, too_large
        self.part = _Part()
        self.image: bytearray | None = None
        self.fields: dict[str, str] = {}
        self.parts = 0
        self.ended = False

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise ServiceError(
                ErrorKind.MALFORMED_REQUEST, f"more than {MAX_PARTS} multipart fields"
            )
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self.part.header_field).lower() == b"content-disposition":
            self.part.disposition = bytes(self.part.header_value)
        self.part.header_field.clear()
        self.part.header_value.clear()

    def on_headers_finished(self) -> None:
        kind, params = parse_options_header(self.part.disposition)
        name = params.get(b"name")
        if kind != b"form-data" or not name:
            raise ServiceError(
                ErrorKind.MALFORMED_REQUEST, "a multipart field has no Content-Disposition name"
            )
        self.part.name = name.decode("utf-8", "replace")
        if self.part.name != IMAGE_FIELD and b"filename" in params:
            raise ServiceError(
                ErrorKind.INVALID_PARAMETER,
                f"the picture goes in the form field named {IMAGE_FIELD!r}, not {self.part.name!r}",
            )
        if self.part.name == IMAGE_FIELD and self.image is not None:
            raise ServiceError(ErrorKind.INVALID_PARAMETER, "send exactly one 'image' field")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.part
        part.data += data[start:end]
        if part.name == IMAGE_FIELD:
            if len(part.data) > self.max_image_bytes:
                raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, self.too_large)
        elif len(part.data) > MAX_FIELD_BYTES:
            raise ServiceError(
                ErrorKind.PAYLOAD_TOO_LARGE,
                f"form field {part.name!r} is over {MAX_FIELD_BYTES} bytes",
            )

    def on_part_end(self) -> None:
        part = self.part
        if part.name == IMAGE_FIELD:
            self.image = part.data
        elif part.name is not None:
            if part.name in self.fields:
                raise ServiceError(
                    ErrorKind.INVALID_PARAMETER, f"form field {part.name!r} given twice"
                )
            self.fields[part.name] = bytes(part.data).decode("utf-8", "replace").strip()
        self.part = _Part()

    def on_end(self) -> None:
        self.ended = True


@dataclass(frozen=True)
class MultipartBody:
    """A multipart request that passed the header checks: its parser and byte limit."""

    parser: MultipartParser
    body_limit: int  # the file's limit plus the framing slack
    too_large: str  # the message for a body past the limit, naming the configured setting


def open_multipart(
    request: Request, callbacks: MultipartCallbacks, max_bytes: int, setting: str, field: str
) -> MultipartBody:
    """Check the headers of a multipart upload whose file goes in `field`, and build its parser.

    Every refusal is the client's: 415 for another content type, 400 for a missing or unusable
    boundary (python-multipart refuses long ones in its constructor), 413 for a declared length
    over `max_bytes` plus framing.
    """
    kind, params = parse_options_header(request.headers.get("content-type"))
    if kind != b"multipart/form-data":
        raise ServiceError(
            ErrorKind.UNSUPPORTED_MEDIA_TYPE,
            f"send multipart/form-data with the file in the '{field}' field",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServiceError(
            ErrorKind.MALFORMED_REQUEST, "the multipart Content-Type has no boundary"
        )
    body_limit = max_bytes + MULTIPART_OVERHEAD
    too_large = too_large_message(max_bytes, setting)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > body_limit:
        raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, too_large)
    try:
        parser = MultipartParser(boundary, callbacks)
    except (MultipartParseError, ValueError) as exc:
        raise ServiceError(
            ErrorKind.MALFORMED_REQUEST,
            f"the multipart boundary cannot be used ({exc}); a boundary is 1 to 70 characters",
        ) from exc
    return MultipartBody(parser, body_limit, too_large)


async def read_upload(request: Request, max_image_bytes: int) -> Upload:
    """Stream and parse the multipart body; raise the service error that explains a refusal."""
    collector = _Collector(max_image_bytes, too_large_message(max_image_bytes, "max_upload_bytes"))
    body = open_multipart(
        request, collector.callbacks(), max_image_bytes, "max_upload_bytes", IMAGE_FIELD
    )
    await feed_multipart(request, body.parser, body.body_limit, body.too_large)
    if not collector.ended:
        raise ServiceError(
            ErrorKind.MALFORMED_REQUEST, "the multipart body ended before its closing boundary"
        )
    if collector.image is None:
        raise ServiceError(ErrorKind.INVALID_PARAMETER, "the multipart field 'image' is missing")
    return Upload(bytes(collector.image), collector.fields)


async def feed_multipart(
    request: Request, parser: MultipartParser, body_limit: int, too_large: str
) -> None:
    """Stream the request body into `parser`, refusing it past `body_limit` bytes (`too_large`
    says so, naming the configured limit rather than `body_limit`'s framing slack).

    Parser callbacks may raise ServiceError (field limits); the body's own failures (client
    gone, unparseable multipart) become ServiceErrors here.
    """
    try:
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise ServiceError(ErrorKind.PAYLOAD_TOO_LARGE, too_large)
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect as exc:
        raise ServiceError(
            ErrorKind.CLIENT_DISCONNECTED, "the client disconnected during the upload"
        ) from exc
    except (MultipartParseError, ValueError) as exc:
        raise ServiceError(
            ErrorKind.MALFORMED_REQUEST, f"the multipart body cannot be parsed: {exc}"
        ) from exc
