"""Typed training configs: dataclasses, read from a YAML or JSON file, then `--set key=value`.

Every number the training uses lives here with its default and the reason for it; nothing is
read from an argparse Namespace inside the modules. A config file holds any subset of the
fields (nested as in the dataclasses); overrides use dotted paths::

    osdface train stage2 --config my.yaml --set engine.batch_size=2 --set data.train_dir=/ffhq

Unknown keys are errors, values are converted to the field's type (tuples from YAML lists).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import yaml

from model.config import DEFAULT_WEIGHTS_DIR, VREConfig

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# --- data ------------------------------------------------------------------------------------


@dataclass
class DegradationStage:
    """One pass of blur -> downsample -> noise -> JPEG. Each step runs with its probability.

    Ranges are sampled uniformly. `downsample` is the factor by which the current image
    shrinks (1 = same size, < 1 upsamples a little, as GFPGAN does); `noise_sigma` is on the
    0-255 scale; `blur_sigma` in pixels of the image at that point.
    """

    prob: float = 1.0
    blur_prob: float = 1.0
    kernel_size: int = 41
    isotropic_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 10.0)
    downsample_prob: float = 1.0
    downsample: tuple[float, float] = (0.8, 8.0)
    noise_prob: float = 1.0
    noise_sigma: tuple[float, float] = (0.0, 20.0)
    jpeg_prob: float = 1.0
    jpeg_quality: tuple[int, int] = (30, 100)

    def validate(self, name: str) -> None:
        for prob in (
            "prob",
            "blur_prob",
            "isotropic_prob",
            "downsample_prob",
            "noise_prob",
            "jpeg_prob",
        ):
            if not 0.0 <= getattr(self, prob) <= 1.0:
                raise ValueError(f"{name}.{prob} must lie in [0, 1]")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"{name}.kernel_size must be odd and at least 3")
        _check_range(f"{name}.blur_sigma", self.blur_sigma, low=1e-3)
        _check_range(f"{name}.downsample", self.downsample, low=0.1)
        _check_range(f"{name}.noise_sigma", self.noise_sigma, low=0.0)
        _check_range(f"{name}.jpeg_quality", self.jpeg_quality, low=1, high=100)


def _first_stage() -> DegradationStage:
    # GFPGAN's blur and downsampling ranges and its noise; JPEG down to 30 as DifFace and
    # OSEDiff use, since real web photos (WebPhoto-Test) are often compressed that hard.
    return DegradationStage()


def _second_stage() -> DegradationStage:
    # A milder second pass on half the images (Real-ESRGAN's idea, the "two-stage" synthetic
    # degradation the paper takes from WaveFace). It acts on the already shrunken image, so
    # compounding reaches 32x downsampling (DifFace's envelope, CodeFormer's heavy end) and
    # blur and noise the first pass alone cannot, while the median image stays GFPGAN-like
    # rather than as hopeless as CodeFormer's 4-30x single pass.
    return DegradationStage(
        prob=0.5,
        blur_prob=0.8,
        kernel_size=21,
        blur_sigma=(0.1, 5.0),
        downsample=(1.0, 4.0),
        noise_prob=0.8,
        noise_sigma=(0.0, 10.0),
        jpeg_quality=(60, 100),
    )


@dataclass
class DegradationConfig:
    """Two stages, then a resize back to the training size. See docs/training.md."""

    first: DegradationStage = field(default_factory=_first_stage)
    second: DegradationStage = field(default_factory=_second_stage)
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")

    def validate(self) -> None:
        self.first.validate("degradation.first")
        self.second.validate("degradation.second")
        allowed = {"area", "bilinear", "bicubic", "nearest"}
        if not self.resize_modes or set(self.resize_modes) - allowed:
            raise ValueError(f"degradation.resize_modes must be a non-empty subset of {allowed}")


@dataclass
class DataConfig:
    """A folder of aligned HQ faces (FFHQ layout: one face per file, any depth of folders)."""

    train_dir: Path | None = None
    val_dir: Path | None = None  # held-out faces for validation images and PSNR
    image_size: int = 512
    hflip: bool = True
    num_workers: int = 4
    val_images: int = 8
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def validate(self) -> None:
        if self.image_size < 16:
            raise ValueError("data.image_size must be at least 16")
        if self.num_workers < 0 or self.val_images < 0:
            raise ValueError("data.num_workers and data.val_images must be >= 0")
        self.degradation.validate()


# --- engine ----------------------------------------------------------------------------------


@dataclass
class EngineConfig:
    """The loop around a stage: devices, precision, checkpoints, logs, validation."""

    output_dir: Path = Path("runs/osdface")
    seed: int = 0
    max_steps: int = 150_000
    stop_after_steps: int = 0  # > 0: stop (with a checkpoint) after this many steps of this run
    batch_size: int = 2  # per process; the global batch is batch_size x processes
    mixed_precision: Literal["no", "bf16"] = "bf16"  # autocast; trainable weights stay fp32
    gradient_checkpointing: bool = True
    grad_clip: float = 1.0  # max grad norm of each optimizer's parameters; 0 turns it off
    checkpoint_every: int = 2_000
    keep_checkpoints: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 50
    val_every: int = 2_000
    ema_decay: float = 0.0  # 0 = no EMA; else the exported weights are the EMA's
    tracker: Literal["tensorboard", "none"] = "tensorboard"
    progress: bool = True

    def validate(self) -> None:
        positive = (
            "max_steps",
            "batch_size",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "val_every",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be at least 1")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("engine.ema_decay must lie in [0, 1)")
        if self.grad_clip < 0 or self.stop_after_steps < 0:
            raise ValueError("engine.grad_clip and engine.stop_after_steps must be >= 0")


# --- stage 1 ---------------------------------------------------------------------------------


@dataclass
class Stage1Config:
    """VQ autoencoders for HQ and LQ faces, then their association (the VRE's tokenizer).

    Phases run one after another, counted in steps: the HQ autoencoder alone, the LQ one
    alone, then both with the association loss (lambda_assoc 0 then 1). With FFHQ (70 k) at a
    global batch of 32 an epoch is ~2,188 steps: the paper's 50 / 10 / 10 epochs are the
    defaults below.
    """

    weights_dir: Path | None = None  # holds train/vgg19-dcbb9e9d.pth (perceptual loss)
    vre: VREConfig = field(default_factory=VREConfig)
    hq_steps: int = 109_375
    lq_steps: int = 21_875
    assoc_steps: int = 21_875
    lr: float = 1.44e-4
    betas: tuple[float, float] = (0.5, 0.9)  # taming-transformers' VQGAN optimiser
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    vq_beta: float = 0.25
    gan_weight: float = 0.8  # times the adaptive ratio of gradient norms
    gan_start: int = 10_000  # an autoencoder's own training steps before its GAN term starts
    disc_channels: int = 64
    disc_layers: int = 3
    assoc_weight: float = 1.0
    assoc_temperature: float = 0.07
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(
            output_dir=Path("runs/stage1"),
            batch_size=4,
            max_steps=1,  # replaced by the sum of the phases in validate()
            checkpoint_every=5_000,
            val_every=5_000,
        )
    )
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        if min(self.hq_steps, self.lq_steps, self.assoc_steps) < 0:
            raise ValueError("stage-1 phase lengths must be >= 0")
        if self.data.image_size != self.vre.resolution:
            raise ValueError("data.image_size must equal vre.resolution")
        # max_steps is derived: the three phases end the run.
        self.engine.max_steps = self.hq_steps + self.lq_steps + self.assoc_steps
        self.engine.validate()
        self.data.validate()


# --- stage 2 ---------------------------------------------------------------------------------

# The UNet layers the LoRA adapts (peft suffix match): attention projections, feed-forwards
# and the ResNet and resampling convolutions, as in OSEDiff, whose code OSDFace builds on.
DEFAULT_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "conv",
    "conv_out",
)


@dataclass
class Stage2Config:
    """The one-step generator: LoRA on the SD2.1-base UNet and the prompt projection.

    Loss = mse_weight * MSE + id_weight * (1 - cos ArcFace) + per_weight * EA-DISTS
    + gan_weight * GAN. The weights below are ours (see docs/training.md), not
    numbers taken from the paper.
    """

    weights_dir: Path = DEFAULT_WEIGHTS_DIR  # sd21-base/, osdface/, train/
    vre_tokenizer: Path | None = None  # stage 1's vre_tokenizer.safetensors; default: weights'
    init: Literal["scratch", "osdface"] = "scratch"  # osdface: start from the weights' LoRA
    lora_rank: int = 16
    lora_alpha: int = 16  # stored in config.json with the LoRA: scale alpha / rank = 1
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    lr: float = 1e-4
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    mse_weight: float = 1.0
    id_weight: float = 0.1
    per_weight: float = 1.0
    gan_weight: float = 0.01
    gan_start: int = 0  # generator steps before the GAN term and the discriminator start
    disc_every: int = 1  # one discriminator update every N generator updates
    disc_lr: float = 1e-4
    disc_head_channels: int = 128
    disc_timesteps: tuple[int, int] = (0, 999)  # t for the discriminator's forward noise
    engine: EngineConfig = field(
        default_factory=lambda: EngineConfig(
            output_dir=Path("runs/stage2"),
            max_steps=150_000,
            batch_size=2,
        )
    )
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        if self.lora_rank < 1 or self.lora_alpha < 1:
            raise ValueError("lora_rank and lora_alpha must be >= 1")
        if self.disc_every < 1 or self.gan_start < 0 or self.warmup_steps < 0:
            raise ValueError("disc_every must be >= 1, gan_start and warmup_steps >= 0")
        lo, hi = self.disc_timesteps
        if not 0 <= lo <= hi <= 999:
            raise ValueError("disc_timesteps must satisfy 0 <= low <= high <= 999")
        self.engine.validate()
        self.data.validate()


# --- loading ---------------------------------------------------------------------------------


class _StageConfig(Protocol):
    """A stage's top-level config: a dataclass that checks itself."""

    __dataclass_fields__: typing.ClassVar[dict[str, dataclasses.Field[Any]]]

    def validate(self) -> None: ...


C = TypeVar("C", bound=_StageConfig)
D = TypeVar("D", bound="DataclassInstance")


def load_config(cls: type[C], path: Path | None = None, overrides: Sequence[str] = ()) -> C:
    """Defaults, then the file (YAML or JSON), then `key.sub=value` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else (yaml.safe_load(text) or {})
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a config file must hold a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value")
        _set_dotted(data, key.strip(), yaml.safe_load(value))
    config = from_dict(cls, data)
    config.validate()
    return config


def from_dict(cls: type[D], data: dict[str, Any], where: str = "", base: D | None = None) -> D:
    """Build dataclass `cls` from a nested dict over `base` (default: the defaults)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config keys in {where or cls.__name__}: {sorted(unknown)}")
    base = cls() if base is None else base
    kwargs = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, path, getattr(base, name))
    return dataclasses.replace(base, **kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (paths and tuples as strings and lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _convert(hint: Any, value: Any, path: str, current: Any) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping")
        return from_dict(hint, value, path, current)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, current)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{path} must be one of {typing.get_args(hint)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"{path} must be a list")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, path, None) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{path} must have {len(args)} items")
        return tuple(_convert(a, v, path, None) for a, v in zip(args, value, strict=True))
    if hint is Path:
        return Path(str(value)).expanduser()
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path} must be true or false")
        return value
    if hint in (int, float, str):
        if hint is int and (isinstance(value, bool) or not float(value).is_integer()):
            raise ValueError(f"{path} must be an integer, got {value!r}")
        return hint(value)
    raise TypeError(f"{path}: unsupported config type {hint}")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section")
    node[last] = value


def _check_range(
    name: str, pair: tuple[float, float], low: float, high: float | None = None
) -> None:
    lo, hi = pair
    if lo > hi or lo < low or (high is not None and hi > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an ordered pair within {bound}, got {pair}")
