"""Weights: the on-disk layout, strict loading, conversion of the released pickles, LoRA merge.

Layout of a weights folder::

    sd21-base/unet/      config.json, diffusion_pytorch_model.safetensors   (diffusers layout)
    sd21-base/vae/       config.json, diffusion_pytorch_model.safetensors
    sd21-base/scheduler/ scheduler_config.json
    osdface/associate_2.ckpt                 released (Lightning pickle)
    osdface/embedding_change_weights.pth     released (pickle)
    osdface/pytorch_lora_weights.safetensors released (peft-style LoRA)
    osdface/config.json                      model constants (OSDFaceConfig)
    osdface/vre.safetensors                  written by `osdface weights convert`
    osdface/unet-merged/                     written by `osdface weights merge`
    facexlib/detection_Resnet50_Final.pth    face detector (facexlib's file names)

Every load compares key sets and shapes and names what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from model.config import OSDFaceConfig
from model.errors import LoraKeyError, StateDictMismatchError, WeightsError, WeightsNotFoundError
from model.pickle_safe import load_checkpoint, tensors_only
from model.vre import VisualRepresentationEmbedder

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
LQ_PREFIX = "vqvae_LQ."
# Decoder-side parts of the LQ autoencoder: trained with it, unused by the tokenizer.
LQ_DECODER_PREFIXES = ("decoder.", "post_quant_conv.")


@dataclass(frozen=True)
class WeightsLayout:
    """Paths inside one weights folder."""

    root: Path

    @property
    def sd21(self) -> Path:
        return self.root / "sd21-base"

    @property
    def unet_dir(self) -> Path:
        return self.sd21 / "unet"

    @property
    def vae_dir(self) -> Path:
        return self.sd21 / "vae"

    @property
    def scheduler_dir(self) -> Path:
        return self.sd21 / "scheduler"

    @property
    def osdface(self) -> Path:
        return self.root / "osdface"

    @property
    def released_vre(self) -> Path:
        return self.osdface / "associate_2.ckpt"

    @property
    def released_projection(self) -> Path:
        return self.osdface / "embedding_change_weights.pth"

    @property
    def lora(self) -> Path:
        return self.osdface / "pytorch_lora_weights.safetensors"

    @property
    def vre(self) -> Path:
        return self.osdface / "vre.safetensors"

    @property
    def merged_unet_dir(self) -> Path:
        return self.osdface / "unet-merged"

    @property
    def facexlib(self) -> Path:
        return self.root / "facexlib"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def require(path: Path, hint: str) -> Path:
    if not path.exists():
        raise WeightsNotFoundError(f"{path} is missing ({hint})")
    return path


# --- strict state dicts ----------------------------------------------------------------------


def check_state_dict(what: str, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise StateDictMismatchError naming every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(what, missing, unexpected, mismatched)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupt file raises WeightsError naming it."""
    require(path, "see README: Weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e})") from e


def load_strict(what: str, model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    check_state_dict(what, model, state)
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise StateDictMismatchError(what, missing=leftovers)
    return model


# --- SD2.1-base parts -------------------------------------------------------------------------


def load_diffusers_model(cls: type, folder: Path, what: str) -> nn.Module:
    """Build a diffusers model from its config.json and load its safetensors strictly."""
    require(folder / "config.json", f"{what} config; run `osdface weights fetch`")
    config = cls.load_config(folder)
    with torch.device("meta"):
        model = cls.from_config(config)
    state = read_safetensors(require(folder / SAFETENSORS_NAME, f"{what} weights"))
    return load_strict(f"{what} ({folder / SAFETENSORS_NAME})", model, state).eval()


def load_vae(layout: WeightsLayout) -> AutoencoderKL:
    return load_diffusers_model(AutoencoderKL, layout.vae_dir, "VAE")


def load_base_unet(layout: WeightsLayout) -> UNet2DConditionModel:
    return load_diffusers_model(UNet2DConditionModel, layout.unet_dir, "UNet")


def load_scheduler(layout: WeightsLayout) -> DDPMScheduler:
    require(layout.scheduler_dir / "scheduler_config.json", "SD2.1-base scheduler config")
    scheduler = DDPMScheduler.from_pretrained(layout.scheduler_dir)
    if scheduler.config.prediction_type != "epsilon":
        raise WeightsError(
            f"scheduler predicts {scheduler.config.prediction_type!r}; OSDFace needs 'epsilon'"
        )
    return scheduler


def alpha_bar(layout: WeightsLayout, timestep: int) -> float:
    """ᾱ at `timestep`, from the scheduler config on disk (as diffusers computes it)."""
    return float(load_scheduler(layout).alphas_cumprod[timestep].double())


# --- LoRA ------------------------------------------------------------------------------------


def _lora_module_path(key: str) -> tuple[str, str]:
    """`unet.<path>.lora_A.weight` -> (`<path>`, `A`)."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if key.startswith("unet.") and key.endswith(suffix):
            return key[len("unet.") : -len(suffix)], part
    raise LoraKeyError(f"LoRA key {key!r} is not of the form unet.<module>.lora_[AB].weight")


def check_lora(unet: nn.Module, lora: dict[str, torch.Tensor], rank: int) -> list[str]:
    """Every LoRA tensor must name a Linear/Conv2d of the UNet and fit its shape.

    Returns the module paths the LoRA adapts. Raises LoraKeyError naming every stray key.
    """
    modules = dict(unet.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    stray, bad = [], []
    for key, tensor in lora.items():
        path, part = _lora_module_path(key)
        module = modules.get(path)
        if not isinstance(module, nn.Linear | nn.Conv2d):
            stray.append(key)
            continue
        pairs.setdefault(path, {})[part] = tensor
    if stray:
        raise LoraKeyError(f"{len(stray)} LoRA keys match no UNet Linear/Conv2d: {stray[:8]}")
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            bad.append(f"{path}: only lora_{next(iter(ab))}")
            continue
        bad.extend(_lora_shape_problems(path, modules[path], ab["A"], ab["B"], rank))
    if bad:
        raise LoraKeyError(f"LoRA tensors do not fit their modules: {bad[:8]}")
    return sorted(pairs)


def _lora_shape_problems(
    path: str, module: nn.Module, a: torch.Tensor, b: torch.Tensor, rank: int
) -> list[str]:
    weight = module.weight
    out_features, in_features = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    want_a = (rank, in_features, *kernel)
    want_b = (out_features, rank, *((1,) * len(kernel)))
    problems = []
    if tuple(a.shape) != want_a:
        problems.append(f"{path}.lora_A {tuple(a.shape)} != {want_a}")
    if tuple(b.shape) != want_b:
        problems.append(f"{path}.lora_B {tuple(b.shape)} != {want_b}")
    return problems


ADAPTER_NAME = "osdface"


def attach_lora(unet: UNet2DConditionModel, lora: dict[str, torch.Tensor], config: OSDFaceConfig):
    """Inject the LoRA as peft adapter layers (unmerged), scaled alpha / rank."""
    check_lora(unet, lora, config.lora_rank)
    unet.load_lora_adapter(lora, prefix="unet", adapter_name=ADAPTER_NAME)
    # diffusers infers alpha = rank from a file without alphas; the config's alpha rescales.
    unet.set_adapters([ADAPTER_NAME], weights=[config.lora_scale])
    return unet


def merge_lora(unet: UNet2DConditionModel, lora: dict[str, torch.Tensor], config: OSDFaceConfig):
    """Fuse W += scale * B @ A into the UNet's weights and drop the adapter layers."""
    check_lora(unet, lora, config.lora_rank)
    unet.load_lora_adapter(lora, prefix="unet", adapter_name=ADAPTER_NAME)
    unet.fuse_lora(lora_scale=config.lora_scale, adapter_names=[ADAPTER_NAME])
    unet.unload_lora()
    return unet


def load_unet(layout: WeightsLayout, config: OSDFaceConfig, *, merged: bool = True):
    """The OSDFace UNet: the merged file when present, else base UNet + LoRA.

    `merged=False` keeps the LoRA as separate adapter layers (the authors' way; slower).
    """
    if merged and (layout.merged_unet_dir / SAFETENSORS_NAME).is_file():
        return load_diffusers_model(UNet2DConditionModel, layout.merged_unet_dir, "merged UNet")
    unet = load_base_unet(layout)
    lora = read_safetensors(require(layout.lora, "OSDFace LoRA"))
    if merged:
        logger.warning(
            "no merged UNet in %s; merging the LoRA at load time "
            "(run `osdface weights merge` once to skip this)",
            layout.merged_unet_dir,
        )
        return merge_lora(unet, lora, config)
    return attach_lora(unet, lora, config)


def write_merged_unet(layout: WeightsLayout, config: OSDFaceConfig) -> Path:
    """`osdface weights merge`: save base UNet + fused LoRA as one safetensors."""
    unet = merge_lora(load_base_unet(layout), read_safetensors(layout.lora), config)
    unet.save_pretrained(layout.merged_unet_dir, safe_serialization=True)
    logger.info("merged UNet written to %s", layout.merged_unet_dir)
    return layout.merged_unet_dir


# --- VRE -------------------------------------------------------------------------------------


def vre_state_from_released(layout: WeightsLayout) -> dict[str, torch.Tensor]:
    """Tensors of the two released pickles, renamed to `VisualRepresentationEmbedder` keys."""
    ckpt = load_checkpoint(require(layout.released_vre, "OSDFace associate_2.ckpt"))
    state = tensors_only(ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt)
    lq = {k[len(LQ_PREFIX) :]: v for k, v in state.items() if k.startswith(LQ_PREFIX)}
    lq = {k: v for k, v in lq.items() if not k.startswith(LQ_DECODER_PREFIXES)}
    if not lq:
        raise WeightsError(f"{layout.released_vre}: no tensors under {LQ_PREFIX!r}")
    proj = load_checkpoint(require(layout.released_projection, "embedding_change_weights.pth"))
    proj = tensors_only(proj.get("state_dict", proj) if isinstance(proj, dict) else proj)
    return {**lq, **{f"projection.{k}": v for k, v in proj.items()}}


def convert_released(layout: WeightsLayout, config: OSDFaceConfig) -> Path:
    """`osdface weights convert`: released pickles -> checked `vre.safetensors`."""
    state = vre_state_from_released(layout)
    with torch.device("meta"):
        model = VisualRepresentationEmbedder(config.vre)
    check_state_dict("released VRE + projection", model, state)
    metadata = {
        "source": json.dumps(
            {
                layout.released_vre.name: sha256_file(layout.released_vre),
                layout.released_projection.name: sha256_file(layout.released_projection),
            }
        )
    }
    state = {k: v.contiguous().float() for k, v in state.items()}
    save_file(state, str(layout.vre), metadata=metadata)
    if not (layout.osdface / "config.json").is_file():
        config.save(layout.osdface)
    logger.info("wrote %s (%d tensors)", layout.vre, len(state))
    return layout.vre


def load_vre(layout: WeightsLayout, config: OSDFaceConfig) -> VisualRepresentationEmbedder:
    """The VRE from `vre.safetensors` (converted once from the released pickles)."""
    if not layout.vre.is_file():
        raise WeightsNotFoundError(
            f"{layout.vre} is missing: run `osdface weights convert --dir {layout.root}` "
            "(it reads the released pickles without executing them)"
        )
    with torch.device("meta"):
        model = VisualRepresentationEmbedder(config.vre)
    return load_strict(f"VRE ({layout.vre})", model, read_safetensors(layout.vre)).eval()
