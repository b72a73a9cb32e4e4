"""Tiny random OSDFace weights written in the RELEASED file formats and layout.

- `osdface/associate_2.ckpt`: a Lightning-style pickle checkpoint (`state_dict` with
  `vqvae_LQ.*`, `vqvae_HQ.*`, decoder keys) plus other objects the loader must skip;
- `osdface/embedding_change_weights.pth`: a plain pickled state dict;
- `osdface/pytorch_lora_weights.safetensors`: peft-style keys over linear and conv layers;
- `sd21-base/{unet,vae,scheduler}`: diffusers folders, tiny UNet and VAE, SD2.1-base scheduler.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

if __name__ == "__main__":
    # Before diffusers imports them: the README runs this module, and their notes are not its
    # run's. Only then: the CUDA tests import this module on a GPU image without the CLI's
    # packages (pydantic, uvicorn...), which osdface.cli imports.
    from osdface.cli import QUIET_LIBRARIES

    for _name in QUIET_LIBRARIES:
        logging.getLogger(_name).setLevel(logging.ERROR)

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from model.config import OSDFaceConfig, VREConfig
from model.networks.vre import VisualRepresentationEmbedder

REPO = Path(__file__).resolve().parents[1]
SCHEDULER_CONFIG = REPO / "model/configs/sd21-base/scheduler/scheduler_config.json"

TINY_VRE = VREConfig(
    ch=8,
    ch_mult=(1, 1, 1, 1, 1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    z_channels=16,
    norm_groups=4,
    codebook_size=64,
    codebook_dim=16,
    num_tokens=77,
    proj_hidden=8,
    prompt_dim=32,
)
TINY_CONFIG = OSDFaceConfig(lora_rank=4, lora_alpha=4, vre=TINY_VRE)

TINY_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    attention_head_dim=(2, 4),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    use_linear_projection=True,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=4,
    block_out_channels=(4, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)


class LightningCallbackState:
    """Stands for the non-tensor objects a Lightning checkpoint pickles by reference."""

    def __init__(self) -> None:
        self.best_model_score = 0.5


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    """Well-conditioned random weights everywhere (unit gain per layer, non-trivial norms).

    Default inits leave some tensors at exact constants (zeros, ones), which would hide key
    mix-ups; too large a scale makes fp32 rounding explode through the tiny networks.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def lora_targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Attention projections (linear) and ResNet convolutions (conv), as the release adapts."""
    picked = []
    for name, m in unet.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] in ("to_q", "to_k", "to_v", "0"):
            if ".attn" in name:
                picked.append((name, m))
        elif isinstance(m, nn.Conv2d) and name.endswith(("conv1", "conv2")):
            picked.append((name, m))
    return picked


def make_lora(unet: nn.Module, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for name, m in lora_targets(unet):
        w = m.weight
        kernel = tuple(w.shape[2:])
        state[f"unet.{name}.lora_A.weight"] = (
            torch.randn(rank, w.shape[1], *kernel, generator=generator) * 0.1
        )
        state[f"unet.{name}.lora_B.weight"] = (
            torch.randn(w.shape[0], rank, *((1,) * len(kernel)), generator=generator) * 0.1
        )
    return state


def write_tiny_weights(
    root: Path,
    *,
    config: OSDFaceConfig = TINY_CONFIG,
    seed: int = 0,
    prepare: bool = True,
    detector_dir: Path | None = None,
) -> Path:
    """Write the released layout under `root`; `prepare` also converts and merges (as `make`)."""
    g = torch.Generator().manual_seed(seed)
    sd = root / "sd21-base"
    unet = UNet2DConditionModel(**{**TINY_UNET, "cross_attention_dim": config.vre.prompt_dim})
    vae = AutoencoderKL(**TINY_VAE)
    _randomise(unet, g)
    _randomise(vae, g)
    unet.save_pretrained(sd / "unet", safe_serialization=True)
    vae.save_pretrained(sd / "vae", safe_serialization=True)
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SCHEDULER_CONFIG, sd / "scheduler/scheduler_config.json")

    osd = root / "osdface"
    osd.mkdir(parents=True, exist_ok=True)
    _write_released_vre(osd, config.vre, g)
    save_file(make_lora(unet, config.lora_rank, g), str(osd / "pytorch_lora_weights.safetensors"))
    config.save(osd)
    if detector_dir is not None:
        _link_detectors(root / "facexlib", detector_dir)
    if prepare:
        from weights.convert import convert_released, write_merged_unet
        from weights.layout import WeightsLayout

        layout = WeightsLayout(root)
        convert_released(layout, config)
        write_merged_unet(layout, config)
    return root


def _write_released_vre(osd: Path, vre_config: VREConfig, g: torch.Generator) -> None:
    vre = VisualRepresentationEmbedder(vre_config)
    _randomise(vre, g)
    with torch.no_grad():  # a codebook spread like trained codes, so selection is not degenerate
        vre.quantize.embedding.weight.copy_(
            torch.randn(vre.quantize.embedding.weight.shape, generator=g)
        )
    state = vre.state_dict()
    lq = {f"vqvae_LQ.{k}": v for k, v in state.items() if not k.startswith("projection.")}
    decoder_like = {
        "vqvae_LQ.decoder.conv_in.weight": torch.randn(8, 16, 3, 3, generator=g),
        "vqvae_LQ.post_quant_conv.weight": torch.randn(16, 16, 1, 1, generator=g),
        "vqvae_HQ.encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g),
        "vqvae_HQ.quantize.embedding.weight": torch.randn(64, 16, generator=g),
    }
    checkpoint = {
        "epoch": 9,
        "global_step": 12345,
        "pytorch-lightning_version": "1.9.0",
        "state_dict": {**lq, **decoder_like},
        "callbacks": {"ModelCheckpoint": LightningCallbackState()},
        "hyper_parameters": argparse.Namespace(lr=1.44e-4, batch_size=32),
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}],
        "lr_schedulers": [],
    }
    torch.save(checkpoint, osd / "associate_2.ckpt")
    projection = {
        k[len("projection.") :]: v for k, v in state.items() if k.startswith("projection.")
    }
    torch.save(projection, osd / "embedding_change_weights.pth")


DETECTOR_FILES = ("detection_mobilenet0.25_Final.pth", "detection_Resnet50_Final.pth")


def _link_detectors(target: Path, source: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in DETECTOR_FILES:
        if (source / name).is_file() and not (target / name).exists():
            os.symlink((source / name).resolve(), target / name)


def has_detector(root: Path) -> bool:
    return any((root / "facexlib" / name).is_file() for name in DETECTOR_FILES)


if (
    __name__ == "__main__"
):  # `python -m tests.tiny_weights DIR`: a weights folder for trying the CLI
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--detectors", type=Path, default=REPO.parent / "shared/assets/detectors")
    parser.add_argument("--released-only", action="store_true", help="skip convert and merge")
    a = parser.parse_args()
    write_tiny_weights(a.root, prepare=not a.released_only, detector_dir=a.detectors)
    if not has_detector(a.root):
        # Without a detector the try-out cannot serve whole photos: say so, and fail.
        print(
            f"no face detector in {a.detectors}: download detection_mobilenet0.25_Final.pth "
            "there (README, 'Try it without the real weights') or pass --detectors DIR",
            file=sys.stderr,
        )
        sys.exit(2)
    print(json.dumps({"weights": str(a.root)}))
