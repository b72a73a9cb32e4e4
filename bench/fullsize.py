"""Full-size OSDFace weights with random values, written in the released layout.

The architecture is the real one: SD2.1-base UNet and VAE from the configs bundled in
`model/configs/sd21-base`, the VRE from the released `VREConfig`, a rank-16 LoRA over the UNet's
attention, feed-forward and ResNet layers. The files are those of the release (a Lightning-style
`associate_2.ckpt`, `embedding_change_weights.pth`, peft-style `pytorch_lora_weights.safetensors`)
and are then converted and merged by the project's own code (`weights.load`), so loading them
exercises and times the real start-up path. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn

from model.atomic import partial_name
from model.config import OSDFaceConfig
from model.image_processor import normalize
from model.networks.vre import VisualRepresentationEmbedder
from weights.convert import convert_released, write_merged_unet
from weights.layout import WeightsLayout

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "model/configs/sd21-base"
MARKER = "bench-weights.json"
FORMAT = 2  # bump when the written weights change, so old folders are not reused
# Module-name endings the LoRA adapts: attention projections, feed-forward, the transformer's
# in/out projections and the ResNet convolutions, as OSEDiff-style UNet LoRAs do.
LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut",
)  # fmt: skip


def lora_for(unet: nn.Module, rank: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """peft-style LoRA tensors for every targeted Linear/Conv2d; B @ A about 5% of W."""
    state = {}
    for name, module in unet.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d) or not name.endswith(LORA_TARGETS):
            continue
        w = module.weight
        fan_in = w[0].numel()
        kernel = tuple(w.shape[2:])
        a = torch.randn(rank, w.shape[1], *kernel, generator=generator) / fan_in**0.5
        b = torch.randn(w.shape[0], rank, *((1,) * len(kernel)), generator=generator) * 0.01
        state[f"unet.{name}.lora_A.weight"] = a
        state[f"unet.{name}.lora_B.weight"] = b
    return state


def trained_like_codebook(vre: VisualRepresentationEmbedder, generator: torch.Generator):
    """(K, C) codes drawn from the encoder's own features of random smooth images, plus noise.

    A trained codebook lies among the features it quantises; N(0, 1) codes lie far from a
    random encoder's features, and every position then picks one of the same 3 or 4 codes,
    which leaves 73 of the 77 tokens empty. Drawn like this, a face uses ~77 distinct codes.
    """
    k, dim = vre.quantize.embedding.weight.shape
    size = vre.config.resolution
    per_image = (size // 2 ** (len(vre.config.ch_mult) - 1)) ** 2
    n_images = -(-k // per_image)
    coarse = torch.rand(n_images, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic")
    with torch.no_grad():
        features = vre.features(normalize(images.clamp(0, 1))).reshape(-1, dim)  # (n * N, C)
    picked = features[torch.randperm(features.shape[0], generator=generator)[:k]]
    return picked + 0.1 * picked.std() * torch.randn(k, dim, generator=generator)


def _write_released_vre(osd: Path, config: OSDFaceConfig, generator: torch.Generator) -> None:
    vre = VisualRepresentationEmbedder(config.vre).eval()  # PyTorch's default initialisation
    with torch.no_grad():
        vre.quantize.embedding.weight.copy_(trained_like_codebook(vre, generator))
    state = vre.state_dict()
    lq = {f"vqvae_LQ.{k}": v for k, v in state.items() if not k.startswith("projection.")}
    torch.save({"state_dict": lq, "global_step": 0}, osd / "associate_2.ckpt")
    projection = {
        k.removeprefix("projection."): v for k, v in state.items() if k.startswith("projection.")
    }
    torch.save(projection, osd / "embedding_change_weights.pth")


def write_full_size_weights(root: Path, *, seed: int = 0) -> Path:
    """Write the released layout under `root`, then convert and merge with `weights.load`."""
    start = time.perf_counter()
    torch.manual_seed(seed)  # the modules' default initialisers draw from the global generator
    g = torch.Generator().manual_seed(seed)
    config = OSDFaceConfig()
    sd = root / "sd21-base"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
    unet.save_pretrained(sd / "unet", safe_serialization=True)
    osd = root / "osdface"
    osd.mkdir(parents=True, exist_ok=True)
    save_file(lora_for(unet, config.lora_rank, g), str(osd / "pytorch_lora_weights.safetensors"))
    del unet
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
    vae.save_pretrained(sd / "vae", safe_serialization=True)
    del vae
    (sd / "scheduler").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(
        CONFIGS / "scheduler/scheduler_config.json", sd / "scheduler/scheduler_config.json"
    )
    _write_released_vre(osd, config, g)
    config.save(osd)
    layout = WeightsLayout(root)
    convert_released(layout, config)
    write_merged_unet(layout, config)
    (root / MARKER).write_text(json.dumps({"kind": "full", "seed": seed, "format": FORMAT}) + "\n")
    logger.info(
        "full-size random weights written to %s in %.1f s", root, time.perf_counter() - start
    )
    return root


def write_tiny(root: Path, *, seed: int = 0) -> Path:
    """Tiny weights (tests/tiny_weights.py), for trying the harness and gpu.sh quickly."""
    from tests.tiny_weights import write_tiny_weights

    write_tiny_weights(root, seed=seed)
    (root / MARKER).write_text(json.dumps({"kind": "tiny", "seed": seed, "format": FORMAT}) + "\n")
    return root


def ensure_weights(root: Path, *, tiny: bool, seed: int = 0) -> Path:
    """Reuse `root` if it holds complete weights of the wanted kind, else write them there."""
    marker = root / MARKER
    kind = "tiny" if tiny else "full"
    if marker.is_file() and json.loads(marker.read_text()) == {
        "kind": kind,
        "seed": seed,
        "format": FORMAT,
    }:
        logger.info("reusing %s weights in %s", kind, root)
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty and holds no {kind} bench weights")
    # Written under a temporary name and renamed when complete: a run killed while writing
    # leaves no half folder under `root`, and the next run starts that one afresh.
    temp = partial_name(root)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    if tiny:
        write_tiny(temp, seed=seed)
    else:
        write_full_size_weights(temp, seed=seed)
    os.replace(temp, root)  # over an empty `root`, if there is one
    return root


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.fullsize DIR [--tiny]`: write (or keep) the weights ahead of a run."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("root", type=Path)
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ensure_weights(args.root, tiny=args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
