"""The blocking client: `Client(url).restore("photo.jpg")`.

Every method is one call with one deadline (`deadline_s`, the client's default unless given),
retried as `osdface.client.retry` says, and raises an `osdface.client.errors` error on failure.
A `Client` holds a connection pool: use it as a context manager, or `close()` it.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from model.atomic import atomic_path
from osdface.client.core import (
    DEFAULT_DEADLINE_S,
    DOWNLOAD_CHUNK,
    Call,
    ImageInput,
    Settings,
    error_of,
    job_call,
    job_path,
    restore_call,
    restore_result,
)
from osdface.client.errors import (
    BusyError,
    ClientError,
    DeadlineExceededError,
    JobFailedError,
    UnreachableError,
)
from osdface.client.models import Job, JobOptions, RestoreOptions, RestoreResult
from osdface.client.retry import Attempts, RetryPolicy, from_transport

ProgressCallback = Callable[[Job], None]


class Client:
    """A typed client of one OSDFace service.

    `url`: the service's base URL. The API key comes from `api_key`, else `api_key_file`, else
    `OSDFACE_API_KEY`, else the file `OSDFACE_API_KEY_FILE` names. TLS certificates are
    verified, against `ca_bundle` (a PEM file) when given. `deadline_s` bounds each call, its
    retries included (None: no bound); `retry` says what is retried (`RetryPolicy.never()`: one
    try). `transport` replaces httpx's (a Unix socket, a proxy); `env` replaces `os.environ` for
    the key lookup.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        api_key_file: str | os.PathLike[str] | None = None,
        verify: bool = True,
        ca_bundle: str | os.PathLike[str] | None = None,
        deadline_s: float | None = DEFAULT_DEADLINE_S,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        transport: httpx.BaseTransport | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = Settings.make(
            url,
            api_key=api_key,
            api_key_file=api_key_file,
            verify=verify,
            ca_bundle=ca_bundle,
            deadline_s=deadline_s,
            retry=retry,
            env=env,
        )
        self.url = self.settings.url
        self._http = httpx.Client(
            base_url=self.url,
            headers=self.settings.headers,
            verify=self.settings.verify,
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
            follow_redirects=False,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- photos --------------------------------------------------------------------------------

    def restore(
        self,
        image: ImageInput,
        options: RestoreOptions | None = None,
        *,
        filename: str | None = None,
        deadline_s: float | None = None,
    ) -> RestoreResult:
        """Restore the faces of one photo (or one aligned crop: `RestoreOptions(aligned=True)`);
        the file comes back in `result.image`, what the service said in the other fields."""
        call = restore_call(image, options, filename, json=False)
        response, attempts = self._send(call, deadline_s)
        return restore_result(response, attempts.retried)

    def restore_json(
        self,
        image: ImageInput,
        options: RestoreOptions | None = None,
        *,
        filename: str | None = None,
        deadline_s: float | None = None,
    ) -> RestoreResult:
        """As `restore`, through the JSON answer: also each face's box, landmarks and score,
        the output's size and the per-stage timings."""
        call = restore_call(image, options, filename, json=True)
        response, attempts = self._send(call, deadline_s)
        return restore_result(response, attempts.retried)

    # --- the service ---------------------------------------------------------------------------

    def ready(self, *, deadline_s: float | None = None) -> bool:
        """True when `/readyz` answers 200, False on 503 (loading, failed, shutting down)."""
        try:
            self._send(Call("GET", "/readyz"), deadline_s, retry=RetryPolicy.never())
        except BusyError:
            return False
        return True

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
        """Wait until `/readyz` answers 200 (refused connections included: the server may be
        starting); DeadlineExceededError after `timeout_s`."""
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(f"{self.url} was not ready within {timeout_s:g} s")
            with contextlib.suppress(UnreachableError):
                if self.ready(deadline_s=left):
                    return
            time.sleep(max(0.0, min(poll_s, end - time.monotonic())))

    def info(self, *, deadline_s: float | None = None) -> dict[str, Any]:
        """`/v1/info`: model files, device, dtype, batching settings and limits."""
        response, _ = self._send(Call("GET", "/v1/info"), deadline_s)
        data: dict[str, Any] = response.json()
        return data

    # --- video jobs ----------------------------------------------------------------------------

    def submit_job(
        self,
        video: str | os.PathLike[str],
        options: JobOptions | None = None,
        *,
        idempotency_key: str | None = None,
        deadline_s: float | None = None,
    ) -> Job:
        """Upload a clip (streamed from its file) as a video job; the queued job."""
        call = job_call(video, options, idempotency_key or uuid.uuid4().hex)
        response, _ = self._send(call, deadline_s)
        return Job.from_json(response.json())

    def job(self, job_id: str, *, deadline_s: float | None = None) -> Job:
        response, _ = self._send(Call("GET", job_path(job_id)), deadline_s)
        return Job.from_json(response.json())

    def wait_job(
        self,
        job_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> Job:
        """Poll the job until it ends, calling `on_progress(job)` after each poll; the
        succeeded job, or JobFailedError (failed, cancelled). `timeout_s` bounds the whole
        wait (None: as long as the job runs); each poll has the client's deadline."""
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.finished:
                if job.state != "succeeded":
                    raise JobFailedError(job)
                return job
            if end is not None and time.monotonic() + poll_s > end:
                raise DeadlineExceededError(f"job {job_id} still {job.state} after {timeout_s:g} s")
            time.sleep(poll_s)

    def download_job(
        self, job_id: str, target: str | os.PathLike[str], *, deadline_s: float | None = None
    ) -> Path:
        """Stream the succeeded job's video to a temporary file beside `target`, then rename
        it to `target`: a partial download never has the final name."""
        path = Path(target)
        attempts = Attempts(self.settings.retry, self.settings.deadline(deadline_s))
        while True:
            try:
                with self._http.stream(
                    "GET", job_path(job_id, "/result"), timeout=attempts.timeout()
                ) as response:
                    if response.is_success:
                        with atomic_path(path) as temp, temp.open("wb") as out:
                            for chunk in response.iter_bytes(DOWNLOAD_CHUNK):
                                out.write(chunk)
                        return path
                    response.read()
                    error: ClientError = error_of(response)
            except httpx.TransportError as exc:
                error = from_transport(exc, f"{self.url}{job_path(job_id, '/result')}")
            time.sleep(attempts.after(error))

    def delete_job(self, job_id: str, *, deadline_s: float | None = None) -> Job:
        """Cancel a queued or running job, or remove a finished one with its files."""
        response, _ = self._send(Call("DELETE", job_path(job_id)), deadline_s)
        return Job.from_json(response.json())

    def restore_video(
        self,
        video: str | os.PathLike[str],
        target: str | os.PathLike[str],
        options: JobOptions | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> Job:
        """Submit, wait (at most `timeout_s`), download to `target`, then delete the job on
        the service."""
        job = self.submit_job(video, options)
        done = self.wait_job(job.id, on_progress=on_progress, poll_s=poll_s, timeout_s=timeout_s)
        self.download_job(job.id, target)
        self.delete_job(job.id)
        return done

    # --- sending -------------------------------------------------------------------------------

    def _send(
        self, call: Call, deadline_s: float | None, *, retry: RetryPolicy | None = None
    ) -> tuple[httpx.Response, Attempts]:
        """Send `call` until it succeeds, fails for good, or its deadline passes."""
        attempts = Attempts(retry or self.settings.retry, self.settings.deadline(deadline_s))
        while True:
            try:
                with call.kwargs() as kwargs:
                    response = self._http.request(
                        call.method, call.path, timeout=attempts.timeout(), **kwargs
                    )
                if response.is_success:
                    return response, attempts
                error: ClientError = error_of(response)
            except httpx.TransportError as exc:
                error = from_transport(exc, f"{self.url}{call.path}")
            time.sleep(attempts.after(error))
