"""All service configuration, typed and in one place (environment prefix `OSDFACE_`).

`osdface serve` flags override these; tests build a `Settings(...)` and inject it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.media.codecs.formats import FORMATS, ImageFormat, ImageLimits
from model.config import (
    BackgroundNet,
    CompileMode,
    DetectorConfig,
    DetectorName,
    Device,
    DType,
    LatentMode,
    TileConfig,
)
from model.networks.fastpath.config import FastPathConfig
from model.media.video.config import DEFAULT_CRF, DEFAULT_WINDOW_FRAMES, MAX_CRF


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OSDFACE_", extra="forbid", frozen=True)

    # --- model ---------------------------------------------------------------------------
    weights_dir: Path = Field(
        Path("./osdface-weights"), description="weights folder (layout in docs/weights.md)"
    )
    device: Device = Field("auto", description="cuda when available, else cpu")
    dtype: DType = Field("auto", description="float16 on cuda, float32 on cpu")
    detector: DetectorName = DetectorConfig.name
    latent: LatentMode = Field("mode", description="VAE latent: deterministic mode or sample")
    seed: int = Field(0, description="seed for latent=sample")
    compile: bool = Field(
        FastPathConfig.compile, description="torch.compile the UNet and VAE (CUDA)"
    )
    channels_last: bool = FastPathConfig.channels_last
    warmup: bool = Field(True, description="run one batch before reporting ready")

    # --- detection ------------------------------------------------------------------------
    detect_max_side: PositiveInt = Field(
        DetectorConfig.max_side, description="detect on a copy downscaled to this"
    )
    detect_threshold: float = Field(DetectorConfig.threshold, ge=0.0, le=1.0, allow_inf_nan=False)
    min_face_size: PositiveInt = Field(
        DetectorConfig.min_face_size, description="smallest face side in pixels"
    )

    # --- batching -------------------------------------------------------------------------
    max_batch_faces: PositiveInt = 8
    max_batch_delay_ms: float = Field(10.0, ge=0.0, le=10_000.0, allow_inf_nan=False)
    max_queue_faces: PositiveInt = 64
    request_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0, allow_inf_nan=False, description="deadline per request"
    )
    cpu_workers: PositiveInt = Field(2, description="threads for decode, detect and paste")

    # --- limits ---------------------------------------------------------------------------
    max_upload_bytes: PositiveInt = ImageLimits.max_bytes
    max_pixels: PositiveInt = ImageLimits.max_pixels
    max_output_pixels: PositiveInt = ImageLimits.max_output_pixels
    max_faces: PositiveInt = Field(16, description="faces restored per image at most")
    allowed_formats: tuple[ImageFormat, ...] = FORMATS

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

    # --- admission (service area) -------------------------------------------------------------
    max_inflight_requests: PositiveInt = Field(
        32,
        description="POST /restore requests admitted at once, from upload to answer; "
        "beyond it 429 before the upload is read (bounds memory held by waiting uploads)",
    )

    # --- fast path (performance area; `compile` and `channels_last` are above) --------------
    fast_path: bool = Field(
        True, description="the restorer's fast path (model/networks/fastpath/); off: the plain path"
    )
    cuda_graphs: bool = Field(
        FastPathConfig.cuda_graphs,
        description="replay each model stage from CUDA graphs captured at warm-up for batch "
        "sizes 1, 2, 4, ... up to max_batch_faces (CUDA)",
    )
    compile_mode: CompileMode = Field(
        FastPathConfig.compile_mode, description="torch.compile mode when compile is on"
    )
    torch_threads: PositiveInt | None = Field(
        FastPathConfig.num_threads,
        description="CPU threads for the model's operators; unset: one per core",
    )

    # --- background super-resolution (docs/background.md) -----------------------------------
    background_models: tuple[BackgroundNet, ...] = Field(
        (),
        description="Real-ESRGAN networks loaded at start for background=...; their files "
        "come from `osdface weights fetch --background`",
    )
    background_tile: PositiveInt = Field(
        TileConfig.tile, description="input pixels per tile side; memory grows with its square"
    )
    background_tile_overlap: int = Field(
        TileConfig.overlap, ge=0, description="context pixels around each tile, hiding the seams"
    )
    background_tile_batch: PositiveInt = Field(
        TileConfig.batch, description="tiles per network call"
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

    @field_validator("weights_dir", "jobs_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @model_validator(mode="after")
    def _batching_fits_queue(self) -> Settings:
        if self.max_queue_faces < self.max_batch_faces:
            raise ValueError("max_queue_faces must be at least max_batch_faces")
        if self.background_tile <= 2 * self.background_tile_overlap + 2:
            raise ValueError("background_tile must be over 2 * background_tile_overlap + 2")
        return self


ENV_PREFIX = "OSDFACE_"
# OSDFACE_* names that are not settings of the service (read by the test suite only).
_NOT_SETTINGS = frozenset({"OSDFACE_TEST_ASSETS"})


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


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
    """One line per invalid setting, naming its environment variable."""
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err.get("loc") else ""
        where = env_name(field) if field in Settings.model_fields else (field or "settings")
        lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return lines
