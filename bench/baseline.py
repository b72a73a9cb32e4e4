"""A baseline that runs like the authors' released inference, for bench/model.py to compare with.

Built from the same weights folder and modules as `OSDFaceRestorer`, so outputs are comparable,
but run the way the release runs them:

- fp32, NCHW, one image at a time (the release restores faces one by one);
- the UNet is the base UNet with the LoRA attached as unmerged peft adapter layers;
- the 77 tokens are picked by a Python loop over positions sorted by distance, with one
  `.item()` (a device sync on CUDA) per position visited;
- the latent is `latent_dist.sample()` (the release), seeded here so runs repeat;
- diffusers' defaults otherwise (attention processors, cuDNN settings as PyTorch ships them).

It is a measuring stick, not a product path: nothing in the service uses it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from model.config import OSDFaceConfig
from weights.layout import WeightsLayout
from weights.load import load_scheduler, load_unet, load_vae, load_vre

STAGES = ("vre", "vae_encode", "unet", "vae_decode")


def select_codes_loop(features: torch.Tensor, codebook: torch.Tensor, num_tokens: int) -> list[int]:
    """The authors' token selection for ONE image, as a loop.

    Args:
        features: (N, C) pre-quantisation features of one image.
        codebook: (K, C) code vectors.

    Returns:
        Up to `num_tokens` code indices: each position's nearest code, positions walked by
        ascending distance (ties in position order), each code kept the first time it is met.
    """
    z, e = features.float(), codebook.float()
    d = torch.sum(z**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.matmul(z, e.t())
    min_distance, nearest = torch.min(d, dim=1)  # (N,), (N,)
    order = torch.argsort(min_distance, stable=True)
    kept: list[int] = []
    for pos in order:
        code = nearest[pos].item()  # one host-device sync per position, as in the release
        if code not in kept:
            kept.append(code)
        if len(kept) == num_tokens:
            break
    return kept


def tokens_from_codes(codes: list[int], codebook: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(num_tokens, C): the kept codes' vectors in order, zero rows after the last kept code."""
    tokens = torch.zeros(
        num_tokens, codebook.shape[1], dtype=codebook.dtype, device=codebook.device
    )
    for row, code in enumerate(codes):
        tokens[row] = codebook[code]
    return tokens


@dataclass
class BaselineOutput:
    """images: (B, 3, S, S) float32 in [0, 1], RGB, on the CPU; summed seconds per stage."""

    images: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


class AuthorsStyleBaseline:
    """OSDFace inference the release's way (see the module docstring)."""

    def __init__(self, weights_dir: Path | str, device: str | torch.device = "cpu") -> None:
        layout = WeightsLayout(Path(weights_dir))
        self.config = OSDFaceConfig.load(layout.osdface)
        self.device = torch.device(device)
        self.vre = self._ready(load_vre(layout, self.config))
        self.vae = self._ready(load_vae(layout))
        self.unet = self._ready(load_unet(layout, self.config, merged=False))
        self.alphas_cumprod = load_scheduler(layout).alphas_cumprod.double()
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def _ready(self, module: nn.Module) -> nn.Module:
        return nn.Module.to(module, device=self.device, dtype=torch.float32).eval()

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        *,
        latent: Literal["sample", "mode"] = "sample",
        seed: int = 0,
    ) -> BaselineOutput:
        """images: (B, 3, S, S) float in [0, 1], RGB; restored one image at a time."""
        timings = dict.fromkeys(STAGES, 0.0)
        outs = [self._one(img[None], latent, seed, timings) for img in images]
        return BaselineOutput(torch.cat(outs), timings)

    def _one(self, image: torch.Tensor, latent: str, seed: int, timings: dict) -> torch.Tensor:
        lq = image.to(self.device, torch.float32) * 2 - 1
        with _stage("vre", timings, self.device):
            prompt = self._prompt(lq)
        with _stage("vae_encode", timings, self.device):
            dist = self.vae.encode(lq).latent_dist
            if latent == "sample":
                generator = torch.Generator(device=self.device).manual_seed(seed)
                z = dist.sample(generator=generator) * self.scaling_factor
            else:
                z = dist.mode() * self.scaling_factor
        with _stage("unet", timings, self.device):
            t = self.config.timestep
            eps = self.unet(z, t, encoder_hidden_states=prompt).sample
            a = self.alphas_cumprod[t].item()
            x0 = ((z.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)).float()
        with _stage("vae_decode", timings, self.device):
            out = self.vae.decode(x0 / self.scaling_factor).sample
            out = (out.clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1)
        return out.cpu()

    def _prompt(self, lq: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) in [-1, 1] -> (1, 77, 1024), through the selection loop."""
        features = self.vre.features(lq)[0]  # (N, C)
        codebook = self.vre.quantize.embedding.weight
        n = self.config.vre.num_tokens
        codes = select_codes_loop(features, codebook, n)
        tokens = tokens_from_codes(codes, codebook, n)
        return self.vre.projection(tokens[None])


@contextmanager
def _stage(name: str, timings: dict[str, float], device: torch.device) -> Iterator[None]:
    """Add a stage's wall time to `timings`, syncing CUDA so the time is the stage's own."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] += time.perf_counter() - start
