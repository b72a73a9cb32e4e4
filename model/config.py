"""Model constants, typed and stored beside the weights (`<weights>/osdface/config.json`),
and the names and defaults the service's settings, the command line and the fast path share.

The defaults are the released OSDFace model; tests write tiny configs to disk and load them the
same way the service does. Nothing here imports torch, so settings and `--help` stay fast.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

CONFIG_FILENAME = "config.json"
# Where the weights live unless OSDFACE_WEIGHTS_DIR (or a flag) says otherwise.
DEFAULT_WEIGHTS_DIR = Path("./osdface-weights")

# "cuda:N" is accepted wherever a device name is resolved (model/device.py); settings list these.
Device = Literal["auto", "cpu", "cuda"]
# "auto": float16 on CUDA, float32 elsewhere.
DType = Literal["auto", "float32", "float16", "bfloat16"]
# The VAE latent: the posterior's mode (deterministic) or a seeded sample (the release's).
LatentMode = Literal["mode", "sample"]
# torch.compile modes (the fast path's `compile_mode`).
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# The RetinaFace variants model/media/faces/detect.py can load.
DetectorName = Literal["retinaface_resnet50", "retinaface_mobile0.25"]
# Background networks (Real-ESRGAN, model/networks/background.py) and their output scales;
# "none" is a Lanczos resize.
BackgroundNet = Literal["realesrgan-x2", "realesrgan-x4"]
BackgroundName = Literal["none", BackgroundNet]
BACKGROUND_SCALES: dict[str, int] = {"realesrgan-x2": 2, "realesrgan-x4": 4}
BACKGROUNDS: tuple[str, ...] = get_args(BackgroundName)


@dataclass(frozen=True)
class TileConfig:
    """Background tiles: input pixels per side, context around each core, tiles per call."""

    tile: int = 256
    overlap: int = 16
    batch: int = 1


@dataclass(frozen=True)
class DetectorConfig:
    """Which face detector, and what it counts as a face (model/media/faces/detect.py)."""

    name: DetectorName = "retinaface_resnet50"
    threshold: float = 0.97  # confidence a face must exceed, in (0, 1)
    max_side: int = 1024  # detect on a copy downscaled so its longer side is at most this
    min_face_size: int = 16  # smallest face side kept, in input pixels
    # Photos whose shorter side is under this are detected on a copy upscaled to it (within
    # max_side): RetinaFace's smallest anchors are 16 px, so a 20 px face in a 200 px photo is
    # missed at its own size. 0: never upscale.
    min_side: int = 640


@dataclass(frozen=True)
class VREConfig:
    """Visual Representation Embedder: VQ encoder, LQ codebook, token selection, projection."""

    in_channels: int = 3
    ch: int = 64
    ch_mult: tuple[int, ...] = (1, 2, 2, 2, 4, 8)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 512
    z_channels: int = 512
    norm_groups: int = 32
    codebook_size: int = 1024
    codebook_dim: int = 512
    num_tokens: int = 77
    proj_hidden: int = 256
    prompt_dim: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))


@dataclass(frozen=True)
class OSDFaceConfig:
    """The one-step restorer's constants."""

    timestep: int = 399  # T_L: the UNet runs once, at this timestep
    image_size: int = 512  # aligned FFHQ crops
    lora_rank: int = 16
    lora_alpha: int = 16
    vre: VREConfig = field(default_factory=VREConfig)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> OSDFaceConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown OSDFace config keys: {sorted(unknown)}")
        vre_data = data.get("vre", {})
        vre_known = {f.name for f in fields(VREConfig)}
        if set(vre_data) - vre_known:
            raise ValueError(f"unknown VRE config keys: {sorted(set(vre_data) - vre_known)}")
        return cls(**{**data, "vre": VREConfig(**vre_data)})

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Path) -> OSDFaceConfig:
        """Read `config.json` in `directory`; the released defaults when there is none."""
        path = directory / CONFIG_FILENAME
        if not path.is_file():
            return cls()
        return cls.from_dict(json.loads(path.read_text()))
