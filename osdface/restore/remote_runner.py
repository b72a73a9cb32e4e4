"""The runner of `osdface restore --url`: the local command's jobs, restored by a running
service through `osdface.client` (no torch on this machine).

`connect` reads the service's `/v1/info` and checks the API key before anything is sent (a
wrong URL or key: one line, exit 2); `restore` is the runner command.py calls in place of the
local one. Photos go through `POST /restore` (the JSON answer: the faces for the report), a
bounded number at once so the service's batcher stays full without a flood of 429s; the client
retries 429/503 after their Retry-After and lost connections with backoff, within one deadline
per photo long enough for the service to restart. Videos go through the job API, one at a time,
with progress. Every output is written atomically; a file that fails after the retries is
reported and the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from model.atomic import write_atomic
from model.errors import ImageTooLargeError
from osdface.client import (
    AsyncClient,
    AuthError,
    BusyError,
    Client,
    ClientError,
    ConfigError,
    DeadlineExceededError,
    JobFailedError,
    JobOptions,
    NotFoundError,
    RetryPolicy,
    ServiceError,
    TLSError,
    UnreachableError,
)
from osdface.client import RestoreOptions as Form
from osdface.client.models import Face, OutputFormat
from osdface.client.models import Job as ServiceJob
from osdface.common import UsageError, plural
from osdface.restore import ledger, remote
from osdface.restore.config import RunConfig
from osdface.restore.plan import Job, Plan
from osdface.restore.reporting import Record, Reporter, failed

logger = logging.getLogger("osdface.restore")

# One photo's request, its retries included: long enough for a service to be restarted and to
# load its weights again, short enough that a service gone for good fails the file.
DEADLINE_S = 900.0
RETRY = RetryPolicy(attempts=10_000, max_backoff_s=5.0, max_retry_after_s=30.0)
PROBE_DEADLINE_S = 10.0  # /v1/info and the key check: a wrong URL answers at once
KEY_CHECK_JOB = "osdface-key-check"  # no such job: 404 with a good key, 401 with a bad one
POLL_S = 1.0  # a video job's progress
JOB_TRIES = 3  # a video job the service lost (restarted without a shared job store) is resent
# The restorer's stages (model/networks/restorer.py STAGES; not imported: torch), which the
# service times per batch: a photo's report has its share of the model calls, "restore".
MODEL_STAGES = ("vre", "vae_encode", "unet", "vae_decode")
# Errors that end the run: every other file would fail the same way. A refused key or
# certificate is a usage error (exit 2); a service gone for a whole deadline fails the files
# it was sent (exit 1), and the others are left for a re-run.
FATAL = (AuthError, TLSError, ConfigError, UnreachableError)


# --- before anything is sent -----------------------------------------------------------------


def connect(config: RunConfig, plan: Plan) -> RunConfig:
    """The run's configuration with the service's settings (its /v1/info); UsageError (exit 2)
    for a URL that does not answer as a service, a refused key, or an option the service does
    not support."""
    flags = config.remote
    assert flags is not None
    try:
        with _client(flags, RetryPolicy.never(), PROBE_DEADLINE_S) as probe:
            info = _info(probe, flags.url)
            _check_key(probe, flags.url)
    except (ConfigError, TLSError) as exc:
        raise UsageError(str(exc)) from exc
    concurrency = flags.concurrency or remote.default_concurrency(info)
    config = remote.service_config(config, plan, info)
    config = replace(config, remote=replace(flags, concurrency=concurrency))
    model = info.get("model", {})
    detector = info.get("detector", {})
    logger.info(
        "restoring through %s (%s, %s, detector %s), %d at once",
        flags.url,
        model.get("device", "?"),
        model.get("dtype", "?"),
        detector.get("name", "?"),
        concurrency,
    )
    return config


def _client(flags: remote.RemoteFlags, retry: RetryPolicy, deadline_s: float) -> Client:
    return Client(flags.url, **_credentials(flags), deadline_s=deadline_s, retry=retry)


def _credentials(flags: remote.RemoteFlags) -> dict[str, Any]:
    """The API key and TLS options of the command line, as both clients take them."""
    return {
        "api_key": flags.api_key,
        "api_key_file": flags.api_key_file,
        "ca_bundle": flags.ca_bundle,
    }


def _info(client: Client, url: str) -> dict[str, Any]:
    """/v1/info, waiting while the service loads (503); UsageError when nothing answers."""
    end = time.monotonic() + remote.READY_WAIT_S
    said = False
    while True:
        try:
            info = client.info()
        except BusyError as exc:
            if time.monotonic() > end:
                raise UsageError(
                    f"{url} is not ready after {remote.READY_WAIT_S:g} s: {exc.message}"
                ) from exc
            if not said:
                logger.info("%s is not ready (%s); waiting for it", url, exc.message)
                said = True
            time.sleep(min(exc.retry_after_s or 2.0, 5.0))
            continue
        except AuthError as exc:  # a service whose /v1/info needs the key too
            raise _refused(url, exc) from exc
        except UnreachableError as exc:
            why = str(exc).removeprefix(f"{url}/v1/info: ")
            raise UsageError(f"cannot reach the service at {url}: {why}") from exc
        except DeadlineExceededError as exc:
            raise UsageError(
                f"the service at {url} did not answer within {PROBE_DEADLINE_S:g} s"
            ) from exc
        except (ServiceError, ValueError) as exc:
            what = f"{exc.status} {exc.message}" if isinstance(exc, ServiceError) else "not JSON"
            raise UsageError(
                f"{url} does not answer as an osdface service (GET /v1/info: {what})"
            ) from exc
        if not isinstance(info, dict) or "limits" not in info:
            raise UsageError(f"{url} does not answer as an osdface service (GET /v1/info)")
        return info


def _check_key(client: Client, url: str) -> None:
    """A request that needs the key and does nothing: 401 ends the run with the service's
    words; anything else is left to the run."""
    try:
        client.job(KEY_CHECK_JOB)
    except AuthError as exc:
        raise _refused(url, exc) from exc
    except ClientError:
        return


def _refused(url: str, exc: AuthError) -> UsageError:
    return UsageError(
        f"{url} refused the API key ({exc.status} {exc.type}: {exc.message}); give it with "
        "--api-key-file, --api-key or OSDFACE_API_KEY"
    )


# --- the run -------------------------------------------------------------------------------------


def restore(
    config: RunConfig, jobs: list[Job], reporter: Reporter, writer: ledger.Writer | None
) -> None:
    """Restore `jobs` through the service; each record reported as it comes. UsageError when
    an error that every file would meet (a refused key) stops the run."""
    by_name = {job.name: job for job in jobs}

    def done(record: Record) -> None:
        if writer is not None and record.status == "restored":
            writer.written(by_name[record.input])
        reporter.faces_found(record.face_count or 0)
        reporter.faces_done(record.face_count or 0)
        reporter.record(record)

    with reporter.redirect_logging():
        fatal = asyncio.run(_run(config, jobs, reporter, done))
    if fatal is None:
        return
    left = len(jobs) - reporter.summary.restored - reporter.summary.failed
    if not isinstance(fatal, UnreachableError):
        raise UsageError(f"stopped: {fatal}")
    logger.error(
        "stopped: the service no longer answers (%s); %d files not sent: run the same command "
        "again to resume",
        fatal,
        left,
    )


async def _run(
    config: RunConfig, jobs: list[Job], reporter: Reporter, done: Callable[[Record], None]
) -> ClientError | None:
    """Photos by `concurrency` workers, then videos one at a time; the error that stopped the
    run, if one did."""
    flags = config.remote
    assert flags is not None and flags.concurrency is not None
    stop: list[ClientError] = []
    photos: Iterator[Job] = iter([job for job in jobs if job.kind == "image"])
    videos = [job for job in jobs if job.kind == "video"]
    async with AsyncClient(
        flags.url,
        **_credentials(flags),
        deadline_s=DEADLINE_S,
        retry=RETRY,
        max_connections=flags.concurrency + 2,
    ) as client:

        async def worker() -> None:
            for job in photos:  # one iterator shared by the workers: each job once
                if stop:
                    return
                done(await _photo(client, job, config, stop))

        await asyncio.gather(*(worker() for _ in range(flags.concurrency)))
        for job in videos:
            if stop:
                break
            done(await _video(client, job, config, reporter, stop))
    return stop[0] if stop else None


async def _photo(client: AsyncClient, job: Job, config: RunConfig, stop: list) -> Record:
    try:
        data = await asyncio.to_thread(_read, job.source, config.settings.max_upload_bytes)
        result = await client.restore_json(data, _form(config, job), filename=_filename(job))
        await asyncio.to_thread(_write, job, result.image)
    except FATAL as exc:
        stop.append(exc)
        return _failed(job, exc)
    except (ClientError, OSError, ImageTooLargeError) as exc:
        return _failed(job, exc)
    output = str(job.target) if job.target is not None else "<stdout>"
    faces = [_face_json(face) for face in result.faces]
    timings = {k: v for k, v in result.timings.stages.items() if k not in MODEL_STAGES}
    timings["restore"] = result.timings.inference_s or 0.0  # as the local run: the photo's share
    return Record(job.name, output, "restored", faces, timings, retried=len(result.retried))


def _form(config: RunConfig, job: Job) -> Form:
    """The form fields of one photo: the run's options, the job's output format."""
    o = config.options
    return Form(
        aligned=o.aligned,
        only_center_face=o.only_center_face,
        max_faces=o.max_faces,
        strength=o.strength,
        upscale=o.upscale,
        background=o.background,
        output_format=cast(OutputFormat | None, job.output_format),
        quality=o.quality,
        faces=o.faces,
        min_face_size=o.min_face_size,
    )


def _filename(job: Job) -> str:
    return Path(str(job.source)).name if job.source is not None else "stdin"


def _read(source: Path | str | None, max_bytes: int) -> bytes:
    """The input's bytes; a file over the service's limit fails here, before it is sent."""
    if source is None:
        data = sys.stdin.buffer.read(max_bytes + 1)
        size = len(data)
    else:
        size = Path(source).stat().st_size
        data = b"" if size > max_bytes else Path(source).read_bytes()
    if size > max_bytes:
        raise ImageTooLargeError(f"the file has {size} bytes, over the service's {max_bytes}")
    return data


def _write(job: Job, data: bytes) -> None:
    if job.target is None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        write_atomic(Path(job.target), data)


def _face_json(face: Face) -> dict[str, object]:
    """A face as the local run's report lists it (model DetectedFace.to_json)."""
    return {
        "box": list(face.box),
        "landmarks": [list(point) for point in face.landmarks],
        "score": face.score,
    }


def _failed(job: Job, exc: BaseException) -> Record:
    """The record of a file that failed: the service's own words, with its request id."""
    if not isinstance(exc, ServiceError):
        return failed(job, exc)
    rid = f", request id {exc.request_id}" if exc.request_id else ""
    return replace(failed(job, exc), error=f"{exc.message} ({exc.status} {exc.type}{rid})")


# --- videos --------------------------------------------------------------------------------------


async def _video(
    client: AsyncClient, job: Job, config: RunConfig, reporter: Reporter, stop: list
) -> Record:
    """One video through the job API: submitted with an Idempotency-Key made from its content
    and fields, followed with a progress bar, downloaded to a temporary file and renamed."""
    from tqdm import tqdm

    assert job.source is not None and job.target is not None  # videos never use stdio
    source, target = Path(job.source), Path(job.target)
    options = _job_options(config)
    hidden = reporter.quiet or not reporter.tty
    try:
        key = await asyncio.to_thread(remote.idempotency_key, source, options.form())
        with tqdm(unit="frame", desc=source.name, disable=hidden, leave=False) as bar:

            def progress(state: ServiceJob, bar: Any = bar) -> None:
                bar.total = state.progress.frames_total
                bar.update(state.progress.frames_done - bar.n)

            finished = await _follow(client, source, target, options, key, progress)
    except FATAL as exc:
        stop.append(exc)
        return _failed(job, exc)
    except JobFailedError as exc:
        return replace(failed(job, exc), error=exc.job.error or str(exc))
    except (ClientError, OSError) as exc:
        return _failed(job, exc)
    if finished.takeovers:
        logger.info(
            "%s: a replica running it was lost; another took it over (%s), %s restored again",
            source,
            plural(finished.takeovers, "time"),
            plural(finished.segments_redone, "segment"),
        )
    started, ended = finished.started_at, finished.finished_at
    seconds = ended - started if started is not None and ended is not None else 0.0
    record = Record(job.name, str(target), "restored", [], {"video": seconds})
    return replace(record, frames=finished.progress.frames_done, face_count=finished.faces)


async def _follow(
    client: AsyncClient,
    source: Path,
    target: Path,
    options: JobOptions,
    key: str,
    progress: Callable[[ServiceJob], None],
) -> ServiceJob:
    """Submit, wait, download, delete; a job the service lost is sent again."""
    for attempt in range(1, JOB_TRIES + 1):
        submitted = await client.submit_job(source, options, idempotency_key=key)
        try:
            finished = await client.wait_job(submitted.id, on_progress=progress, poll_s=POLL_S)
            await client.download_job(submitted.id, target)
        except NotFoundError:
            if attempt == JOB_TRIES:
                raise
            logger.warning("the service lost the job of %s; sending it again", source)
            continue
        with contextlib.suppress(ClientError):
            await client.delete_job(submitted.id)
        return finished
    raise AssertionError("unreachable")


def _job_options(config: RunConfig) -> JobOptions:
    """The fields of a video job: the run's video flags, strength and face limit."""
    video = config.video
    assert video is not None  # a run with videos has its checked video flags
    return JobOptions(
        start_s=video.start or None,
        duration_s=video.duration,
        crf=video.crf,
        strength=config.options.strength,
        max_faces=config.options.max_faces,
    )
