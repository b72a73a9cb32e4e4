"""All service configuration, typed and in one place (environment prefix `OSDFACE_`).

`Settings` extends the run-time settings the command line and the Ray workers share
(model/runtime/settings.py: model, detector, limits, fast path, background tiles) with what only
the service has: HTTP, the batching queue, admission and video jobs. `osdface serve` flags
override these; tests build a `Settings(...)` and inject it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from model.media.video.config import DEFAULT_CRF, DEFAULT_WINDOW_FRAMES, MAX_CRF
from model.runtime.messages import describe
from model.runtime.settings import ENV_PREFIX, RuntimeSettings, env_name

__all__ = ["ENV_PREFIX", "Settings", "describe_settings_error", "env_name", "unknown_env_names"]


class Settings(RuntimeSettings):
    # The model's settings are inherited (model/runtime/settings.py); env prefix, frozen, extra.
    warmup: bool = Field(True, description="run one batch before reporting ready")

    # --- batching -------------------------------------------------------------------------
    max_batch_delay_ms: float = Field(10.0, ge=0.0, le=10_000.0, allow_inf_nan=False)
    max_queue_faces: PositiveInt = 64
    request_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, allow_inf_nan=False, description="deadline per request"
    )
    cpu_workers: PositiveInt = Field(2, description="threads for decode, detect and paste")

    # --- HTTP -----------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = Field(None, description="if set, /restore needs Authorization: Bearer")
    cors_origins: tuple[str, ...] = ()
    shutdown_grace_s: float = Field(20.0, ge=0.0, le=3600.0, allow_inf_nan=False)
    headers_timeout_s: float = Field(
        10.0,
        gt=0.0,
        le=600.0,
        allow_inf_nan=False,
        description="a connection's request headers must be complete within this (else 408)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "text", "json"] = Field(
        "auto",
        description="json: one JSON object per line (for log collectors; docs/operations.md); "
        "text: for people; auto: text when stderr is a terminal, else json",
    )

    # --- admission (service area) -------------------------------------------------------------
    max_inflight_requests: PositiveInt = Field(
        32,
        description="POST /restore requests admitted at once, from upload to answer; "
        "beyond it 429 before the upload is read (bounds memory held by waiting uploads)",
    )

    # --- video jobs (video area; docs/video.md) ---------------------------------------------
    jobs_dir: Path = Field(
        Path("/tmp/osdface-jobs"),
        description="folder for the uploaded and restored videos of /v1/jobs",
    )
    max_jobs: PositiveInt = Field(
        8, description="video jobs kept at once (queued, running or finished); beyond it 429"
    )
    max_job_bytes: PositiveInt = Field(512 * 1024 * 1024, description="largest video upload")
    max_job_frames: PositiveInt = Field(
        54_000, description="most frames a video job may have (30 min at 30 fps)"
    )
    job_retention_s: float = Field(
        3600.0, gt=0.0, description="finished jobs and their files are removed after this"
    )
    job_window_frames: PositiveInt = Field(
        DEFAULT_WINDOW_FRAMES,
        description="frames a video job holds at once; their faces share model calls",
    )
    job_crf: int = Field(
        DEFAULT_CRF, ge=0, le=MAX_CRF, description="quality of restored videos (CRF)"
    )
    jobs_redis_url: SecretStr | None = Field(
        None,
        description="redis://[:password@]host:port/db of a Redis or Valkey shared by every "
        "replica (jobs_dir then on a volume they all mount); unset: a SQLite database in "
        "jobs_dir, shared by the replicas of one host",
    )
    job_lease_s: float = Field(
        30.0,
        ge=1.0,
        le=3600.0,
        allow_inf_nan=False,
        description="a running job's lease; renewed every third of it, and a replica that "
        "stops renewing (killed, lost) has its job taken over this long after",
    )
    job_segment_frames: PositiveInt = Field(
        256,
        description="frames of one output segment (a multiple of job_window_frames): a job "
        "taken over or resumed redoes at most one",
    )

    @field_validator("jobs_dir")
    @classmethod
    def _expand_jobs_dir(cls, v: Path) -> Path:
        return v.expanduser()

    @model_validator(mode="after")
    def _batching_fits_queue(self) -> Settings:
        if self.max_queue_faces < self.max_batch_faces:
            raise ValueError("max_queue_faces must be at least max_batch_faces")
        return self

    @model_validator(mode="after")
    def _segments_are_whole_windows(self) -> Settings:
        if self.job_segment_frames % self.job_window_frames:
            raise ValueError(
                f"job_segment_frames ({self.job_segment_frames}) must be a multiple of "
                f"job_window_frames ({self.job_window_frames})"
            )
        return self

    @field_validator("jobs_redis_url")
    @classmethod
    def _redis_scheme(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


# Settings whose values never appear in a message (a URL may hold a password).
SECRET_SETTINGS = frozenset({"api_key", "jobs_redis_url"})

# OSDFACE_* names that are not settings of the service (read by the test suite only).
_NOT_SETTINGS = frozenset({"OSDFACE_TEST_ASSETS"})


def unknown_env_names(environ: Mapping[str, str]) -> list[str]:
    """One line per `OSDFACE_*` variable that names no setting, with the closest real name."""
    known = [env_name(name) for name in Settings.model_fields]
    lines = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() in _NOT_SETTINGS:
            continue
        if name.upper() in known:
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        lines.append(f"{name} is not a setting{hint}")
    return lines


def describe_settings_error(exc: ValidationError) -> list[str]:
    """One line per invalid setting, naming its environment variable, in the project's words
    (model/runtime/messages.py): 'OSDFACE_PORT: must be at most 65535 (got 99999)'."""

    def label(field: str) -> str:
        return f"{env_name(field) if field in Settings.model_fields else field}:"

    return describe(
        exc, label=label, known=Settings.model_fields, show_input=True, secret=SECRET_SETTINGS
    )
