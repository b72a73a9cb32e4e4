"""The authors'-style reference: OSDFace inference the way the release runs it.

bench/speed.py and bench/paired.py time it as the baseline; the tests use it, with parts
written independently of `model/` (tests/reference_osdface.py), as the reference to check the
restorer against.

`from_weights` builds it from the same weights folder and modules as `OSDFaceRestorer`, so
outputs are comparable, but run the way the release runs them:

- fp32, NCHW, one image at a time (the release restores faces one by one);
- the UNet is the base UNet with the LoRA attached as unmerged peft adapter layers;
- the 77 tokens are picked by a Python loop over positions sorted by distance, with one
  `.item()` (a device sync on CUDA) per position visited;
- the latent is `latent_dist.sample()` (the release), seeded here so runs repeat;
- diffusers' defaults otherwise (attention processors, cuDNN settings as PyTorch ships them).

It is a measuring stick and a reference, not a product path: nothing in the service uses it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from model.config import OSDFaceConfig
from model.image_processor import denormalize, normalize
from model.networks.vre import VisualRepresentationEmbedder
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


@dataclass
class AuthorsStyleBaseline:
    """OSDFace inference the release's way (see the module docstring), one image at a time.

    The parts are given: `from_weights` loads the project's (VRE modules, peft LoRA adapters,
    ᾱ from the scheduler); tests/reference_osdface.py passes parts written independently of
    `model/` (a functional VQ encoder, a LoRA added by hand, ᾱ from the formula).
    """

    prompt: Callable[[torch.Tensor], torch.Tensor]  # (1, 3, S, S) [-1, 1] -> (1, 77, 1024)
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    alpha_bar: float
    timestep: int
    device: torch.device

    @classmethod
    def from_weights(
        cls, weights_dir: Path | str, device: str | torch.device = "cpu"
    ) -> AuthorsStyleBaseline:
        layout = WeightsLayout(Path(weights_dir))
        config = OSDFaceConfig.load(layout.osdface)
        device = torch.device(device)
        vre = _ready(load_vre(layout, config), device)
        alphas_cumprod = load_scheduler(layout).alphas_cumprod.double()
        return cls(
            prompt=partial(prompt_by_loop, vre, config.vre.num_tokens),
            vae=_ready(load_vae(layout), device),
            unet=_ready(load_unet(layout, config, merged=False), device),
            alpha_bar=alphas_cumprod[config.timestep].item(),
            timestep=config.timestep,
            device=device,
        )

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

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
        lq = normalize(image.to(self.device, torch.float32))
        with _stage("vre", timings, self.device):
            prompt = self.prompt(lq)
        with _stage("vae_encode", timings, self.device):
            dist = self.vae.encode(lq).latent_dist
            if latent == "sample":
                generator = torch.Generator(device=self.device).manual_seed(seed)
                z = dist.sample(generator=generator) * self.scaling_factor
            else:
                z = dist.mode() * self.scaling_factor
        with _stage("unet", timings, self.device):
            eps = self.unet(z, self.timestep, encoder_hidden_states=prompt).sample
            a = self.alpha_bar  # the release's formula, apart from restorer.x0_from_eps
            x0 = ((z.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)).float()
        with _stage("vae_decode", timings, self.device):
            out = denormalize(self.vae.decode(x0 / self.scaling_factor).sample)
        return out.cpu()


def prompt_by_loop(
    vre: VisualRepresentationEmbedder, num_tokens: int, lq: torch.Tensor
) -> torch.Tensor:
    """(1, 3, S, S) in [-1, 1] -> (1, 77, 1024): the VRE's modules, the selection loop."""
    features = vre.features(lq)[0]  # (N, C)
    codebook = vre.quantize.embedding.weight
    codes = select_codes_loop(features, codebook, num_tokens)
    tokens = tokens_from_codes(codes, codebook, num_tokens)
    return vre.projection(tokens[None])


def _ready(module: nn.Module, device: torch.device) -> nn.Module:
    return nn.Module.to(module, device=device, dtype=torch.float32).eval()


@contextmanager
def _stage(name: str, timings: dict[str, float], device: torch.device) -> Iterator[None]:
    """Add a stage's wall time to `timings`, syncing CUDA so the time is the stage's own."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] += time.perf_counter() - start
