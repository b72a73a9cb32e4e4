"""The run-time settings of the model, shared by every front end (environment prefix `OSDFACE_`).

`RuntimeSettings` holds what the model, the detector, the limits, the fast path and the
background tiles need; `service.settings.Settings` extends it with HTTP, batching and jobs, and
`osdface restore` (its flags on top) and the Ray workers read it as it is. Nothing here imports
torch, so `--help` and settings checks stay fast.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, PositiveInt, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.config import (
    DEFAULT_WEIGHTS_DIR,
    BackgroundNet,
    CompileMode,
    DetectorConfig,
    DetectorName,
    Device,
    DType,
    LatentMode,
    TileConfig,
)
from model.media.codecs.formats import FORMATS, ImageFormat, ImageLimits
from model.networks.fastpath.config import FastPathConfig

ENV_PREFIX = "OSDFACE_"


def env_name(field: str) -> str:
    """'weights_dir' -> 'OSDFACE_WEIGHTS_DIR'."""
    return f"{ENV_PREFIX}{field.upper()}"


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    # --- model ---------------------------------------------------------------------------
    weights_dir: Path = Field(
        DEFAULT_WEIGHTS_DIR, description="weights folder (layout in docs/weights.md)"
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

    # --- detection ------------------------------------------------------------------------
    detect_max_side: PositiveInt = Field(
        DetectorConfig.max_side, description="detect on a copy downscaled to this"
    )
    detect_threshold: float = Field(DetectorConfig.threshold, ge=0.0, le=1.0, allow_inf_nan=False)
    min_face_size: PositiveInt = Field(
        DetectorConfig.min_face_size, description="smallest face side in pixels"
    )

    # --- model calls ----------------------------------------------------------------------
    max_batch_faces: PositiveInt = Field(8, description="faces per model call at most")

    # --- limits ---------------------------------------------------------------------------
    max_upload_bytes: PositiveInt = ImageLimits.max_bytes
    max_pixels: PositiveInt = ImageLimits.max_pixels
    max_output_pixels: PositiveInt = ImageLimits.max_output_pixels
    max_faces: PositiveInt = Field(16, description="faces restored per image at most")
    allowed_formats: tuple[ImageFormat, ...] = FORMATS

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

    @field_validator("weights_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @model_validator(mode="after")
    def _tiles_fit(self) -> RuntimeSettings:
        if self.background_tile <= 2 * self.background_tile_overlap + 2:
            raise ValueError("background_tile must be over 2 * background_tile_overlap + 2")
        return self

    @property
    def restorer_seed(self) -> int | None:
        """The seed the restorer's calls take: `seed` for a sampled latent, else None."""
        return self.seed if self.latent == "sample" else None
