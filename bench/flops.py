"""Multiply-adds per face and stage, counted by torch's flop counter on the meta device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from model.config import OSDFaceConfig
from model.networks.fastpath.upsample import use_subpixel_upsampling
from model.networks.restorer import STAGES
from model.networks.vre import VisualRepresentationEmbedder


def count_gmacs(weights: Path) -> dict[str, float]:
    """GMACs per face and stage at batch 1, counted on the meta device (no compute, no memory).

    `attention` is the part of the total spent in the attention products (QK^T and AV).
    """
    config = OSDFaceConfig.load(weights / "osdface")
    s = config.image_size
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(weights / "sd21-base/unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(weights / "sd21-base/vae"))
        vre = VisualRepresentationEmbedder(config.vre)
        x = torch.zeros(1, 3, s, s)
        z = torch.zeros(1, vae.config.latent_channels, s // 8, s // 8)
        prompt = torch.zeros(1, config.vre.num_tokens, config.vre.prompt_dim)
        t = torch.tensor([config.timestep])
    stages: dict[str, Callable[[], object]] = {
        "vre": lambda: vre(x),
        "vae_encode": lambda: vae.encode(x).latent_dist.mode(),
        "unet": lambda: unet(z, t, encoder_hidden_states=prompt),
        "vae_decode": lambda: vae.decode(z),
    }
    out, attention = {}, 0.0
    with torch.inference_mode():
        for name, fn in stages.items():
            with FlopCounterMode(display=False) as counter:
                fn()
            out[name] = counter.get_total_flops() / 2e9
            ops = counter.get_flop_counts().get("Global", {})
            attention += sum(
                v for k, v in ops.items() if "bmm" in str(k) or "dot_product" in str(k)
            )
    out["total"] = sum(out[k] for k in STAGES)
    out["attention"] = attention / 2e9
    # The fast path's subpixel upsampling computes the same layers with fewer products.
    use_subpixel_upsampling(unet)
    use_subpixel_upsampling(vae)
    with torch.inference_mode():
        for name in ("unet", "vae_decode"):
            with FlopCounterMode(display=False) as counter:
                stages[name]()
            out[f"{name}_subpixel"] = counter.get_total_flops() / 2e9
    out["total_subpixel"] = out["total"] + sum(
        out[f"{k}_subpixel"] - out[k] for k in ("unet", "vae_decode")
    )
    return out
