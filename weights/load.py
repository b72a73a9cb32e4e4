"""Loading every part of the restorer from a weights folder, strictly.

Every load compares key sets and shapes and names what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

# From the defining modules: the package root's try/except re-exports the dummy classes first,
# which hides these classes' attributes from the type checker.
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from model.config import OSDFaceConfig
from model.errors import WeightsError, WeightsNotFoundError
from model.networks.vre import VisualRepresentationEmbedder
from weights.layout import SAFETENSORS_NAME, WeightsLayout, require
from weights.lora import attach_lora, merge_lora
from weights.strict import load_strict, read_safetensors

logger = logging.getLogger(__name__)

DiffusersModel = TypeVar("DiffusersModel", AutoencoderKL, UNet2DConditionModel)


def load_diffusers_model(cls: type[DiffusersModel], folder: Path, what: str) -> DiffusersModel:
    """Build a diffusers model from its config.json and load its safetensors strictly."""
    # Every diffusers folder is two levels below the weights folder (sd21-base/vae, ...).
    fetch = f"osdface weights fetch --dir {folder.parent.parent}"
    require(folder / "config.json", f"{what} config; run `{fetch}`")
    # Without return_unused_kwargs the config alone comes back (diffusers annotates the tuple).
    config = cast(dict[str, Any], cls.load_config(folder))
    with torch.device("meta"):
        model = cls.from_config(config)
    assert not isinstance(model, tuple), "from_config without return_unused_kwargs"
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


def load_unet(
    layout: WeightsLayout, config: OSDFaceConfig, *, merged: bool = True
) -> UNet2DConditionModel:
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
