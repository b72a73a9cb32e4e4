"""What the sync and async clients share: their settings (URL, API key, TLS, deadline, retries),
the requests they make, described once, and how answers become results or errors.

Only the sending differs between `Client` and `AsyncClient` (a blocking or an awaited call, a
blocking or an awaited sleep); everything here is plain data and pure functions.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from osdface.client.errors import Answer, ConfigError, ServiceError, error_from_answer
from osdface.client.models import (
    JobOptions,
    RestoreOptions,
    RestoreResult,
    result_from_headers,
    result_from_json,
)
from osdface.client.retry import RetryPolicy

API_KEY_ENV = "OSDFACE_API_KEY"
API_KEY_FILE_ENV = "OSDFACE_API_KEY_FILE"
DEFAULT_DEADLINE_S = 300.0  # one call, retries and waits included
DOWNLOAD_CHUNK = 1 << 20
VIDEO_TYPES = {
    ".mp4": "video/mp4",
    ".mov": "video/quicktime",
    ".mkv": "video/x-matroska",
    ".webm": "video/webm",
    ".avi": "video/x-msvideo",
}

# What `restore` accepts as the picture: its bytes, a path, or an open binary file.
ImageInput = bytes | str | os.PathLike[str] | IO[bytes]


def resolve_api_key(
    api_key: str | None, api_key_file: str | os.PathLike[str] | None, env: Mapping[str, str]
) -> str | None:
    """The key from the argument, the key file argument, `OSDFACE_API_KEY`, or the file
    `OSDFACE_API_KEY_FILE` names, in that order; None when none is given."""
    if api_key is not None and api_key_file is not None:
        raise ConfigError("give api_key or api_key_file, not both")
    if api_key is not None:
        return api_key.strip() or None
    if api_key_file is not None:
        return _read_key(Path(api_key_file), "api_key_file")
    if env.get(API_KEY_ENV, "").strip():
        return env[API_KEY_ENV].strip()
    if env.get(API_KEY_FILE_ENV, "").strip():
        return _read_key(Path(env[API_KEY_FILE_ENV].strip()), API_KEY_FILE_ENV)
    return None


def _read_key(path: Path, source: str) -> str:
    path = path.expanduser()
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the API key file {path} ({source}): {exc}") from exc
    if not key:
        raise ConfigError(f"the API key file {path} ({source}) is empty")
    return key


def tls_verify(verify: bool, ca_bundle: str | os.PathLike[str] | None) -> bool | ssl.SSLContext:
    """httpx's `verify`: on by default, against `ca_bundle` when given (a PEM file)."""
    if ca_bundle is None:
        return verify
    if not verify:
        raise ConfigError("ca_bundle is given but verify is off")
    try:
        return ssl.create_default_context(cafile=os.path.expanduser(os.fspath(ca_bundle)))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA bundle {os.fspath(ca_bundle)}: {exc}") from exc


def base_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise ConfigError(f"the service URL must start with http:// or https://, got {url!r}")
    return url


@dataclass(frozen=True)
class Upload:
    """One file part of a multipart body; opened anew for each try."""

    field: str
    filename: str
    media_type: str
    data: bytes | None = None
    path: Path | None = None

    @contextlib.contextmanager
    def opened(self) -> Iterator[tuple[str, bytes | IO[bytes], str]]:
        if self.data is not None:
            yield self.filename, self.data, self.media_type
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            yield self.filename, f, self.media_type


@dataclass(frozen=True)
class Call:
    """One HTTP request as the clients send it (each try sends it again)."""

    method: str
    path: str
    form: dict[str, str] = field(default_factory=dict)
    upload: Upload | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @contextlib.contextmanager
    def kwargs(self) -> Iterator[dict[str, Any]]:
        """httpx's request arguments, with the upload's file open while they are used."""
        extra: dict[str, Any] = {"headers": self.headers}
        if self.form:
            extra["data"] = self.form
        if self.upload is None:
            yield extra
            return
        with self.upload.opened() as part:
            yield {**extra, "files": {self.upload.field: part}}


def image_upload(image: ImageInput, filename: str | None) -> Upload:
    """The `image` part: bytes as they are, a path read now, a file read from where it is."""
    if isinstance(image, bytes | bytearray | memoryview):
        data, name = bytes(image), "image"
    elif isinstance(image, str | os.PathLike):
        path = Path(image)
        data, name = path.read_bytes(), path.name
    else:
        data, name = image.read(), Path(str(getattr(image, "name", "image"))).name
    return Upload("image", filename or name, "application/octet-stream", data=data)


def restore_call(
    image: ImageInput, options: RestoreOptions | None, filename: str | None, json: bool
) -> Call:
    accept = "application/json" if json else "image/*"
    form = (options or RestoreOptions()).form()
    return Call("POST", "/restore", form, image_upload(image, filename), {"Accept": accept})


def job_call(video: str | os.PathLike[str], options: JobOptions | None, key: str) -> Call:
    """POST /v1/jobs with the clip streamed from its file; the Idempotency-Key lets a service
    that keeps such keys answer a retried upload with the job it already made."""
    path = Path(video)
    media_type = VIDEO_TYPES.get(path.suffix.lower(), "application/octet-stream")
    upload = Upload("video", path.name, media_type, path=path)
    form = (options or JobOptions()).form()
    return Call("POST", "/v1/jobs", form, upload, {"Idempotency-Key": key})


def job_path(job_id: str, tail: str = "") -> str:
    if not job_id or "/" in job_id or job_id in (".", ".."):
        raise ConfigError(f"not a job id: {job_id!r}")
    return f"/v1/jobs/{job_id}{tail}"


def error_of(response: httpx.Response) -> ServiceError:
    """The typed error of an error answer whose body has been read."""
    answer = Answer(response.status_code, response.headers, response.content, str(response.url))
    return error_from_answer(answer)


def restore_result(response: httpx.Response, retried: list[str]) -> RestoreResult:
    """The result of a 200 from POST /restore, image or JSON by its Content-Type."""
    if response.headers.get("content-type", "").startswith("application/json"):
        return result_from_json(response.headers, response.json(), tuple(retried))
    return result_from_headers(response.headers, response.content, tuple(retried))


def user_agent() -> str:
    from osdface import __version__

    return f"osdface-client/{__version__}"


@dataclass(frozen=True)
class Settings:
    """A client's settings, checked once when it is made."""

    url: str
    headers: dict[str, str]
    verify: bool | ssl.SSLContext
    deadline_s: float | None
    retry: RetryPolicy

    @classmethod
    def make(
        cls,
        url: str,
        *,
        api_key: str | None,
        api_key_file: str | os.PathLike[str] | None,
        verify: bool,
        ca_bundle: str | os.PathLike[str] | None,
        deadline_s: float | None,
        retry: RetryPolicy | None,
        env: Mapping[str, str] | None,
    ) -> Settings:
        key = resolve_api_key(api_key, api_key_file, os.environ if env is None else env)
        headers = {"User-Agent": user_agent()}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        if deadline_s is not None and deadline_s <= 0:
            raise ConfigError("deadline_s must be positive (or None: no deadline)")
        return cls(
            base_url(url),
            headers,
            tls_verify(verify, ca_bundle),
            deadline_s,
            retry or RetryPolicy(),
        )

    def deadline(self, given: float | None) -> float | None:
        return self.deadline_s if given is None else given
