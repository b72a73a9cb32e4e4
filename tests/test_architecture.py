"""Full-size architecture from the bundled SD2.1-base configs, built on the meta device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

CONFIGS = Path(__file__).resolve().parents[1] / "model/configs/sd21-base"


def _millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_unet_and_vae_parameter_counts() -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
    assert _millions(unet) == pytest.approx(865.9, abs=0.05)
    assert _millions(vae) == pytest.approx(83.65, abs=0.05)
    assert _millions(vae.encoder) + _millions(vae.quant_conv) == pytest.approx(34.16, abs=0.01)
    assert unet.config.cross_attention_dim == 1024
    assert vae.config.scaling_factor == pytest.approx(0.18215)


def test_bundled_scheduler_is_sd21_base() -> None:
    scheduler = DDPMScheduler.from_pretrained(CONFIGS / "scheduler")
    assert scheduler.config.prediction_type == "epsilon"
    assert float(scheduler.alphas_cumprod[399]) == pytest.approx(0.426086, abs=1e-6)
