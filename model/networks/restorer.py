"""The OSDFace one-step restorer: aligned faces in, restored faces out, one UNet call per batch."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import diffusers
import torch
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from model.config import LatentMode, OSDFaceConfig
from model.errors import InvalidInputError
from model.image_processor import denormalize, normalize
from model.networks.fastpath import FastPathConfig
from model.networks.fastpath.clock import StageClock
from model.networks.fastpath.flags import cudnn_autotuning
from model.networks.fastpath.graphs import padded
from model.networks.fastpath.load import FastPath
from model.networks.fastpath.placement import Transfer, place
from model.networks.vre import VisualRepresentationEmbedder
from weights.layout import SAFETENSORS_NAME, WeightsLayout, sha256_file
from weights.load import alpha_bar, load_unet, load_vae, load_vre

logger = logging.getLogger(__name__)

STAGES = ("vre", "vae_encode", "unet", "vae_decode")


@dataclass
class RestoreOutput:
    """images: (B, 3, S, S) float32 in [0, 1], RGB, on the CPU; timings in seconds."""

    images: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def x0_from_eps(z: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """Clean latent from the noise prediction, x0 = (z - sqrt(1 - ᾱ) eps) / sqrt(ᾱ), in float64."""
    x0 = (z.double() - math.sqrt(1.0 - alpha_bar) * eps.double()) / math.sqrt(alpha_bar)
    return x0.to(z.dtype)


class OSDFaceRestorer:
    """Load once, call many times; holds no per-call state, so concurrent callers are safe."""

    def __init__(
        self,
        vre: VisualRepresentationEmbedder,
        vae: AutoencoderKL,
        unet: UNet2DConditionModel,
        alpha_bar: float,
        config: OSDFaceConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        latent: LatentMode = "mode",
        files: dict[str, str] | None = None,
        fast: FastPathConfig | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.latent = latent
        self.alpha_bar = alpha_bar
        self.files = files or {}
        self.vre, self.vae, self.unet = vre, vae, unet
        self.scaling_factor = float(vae.config["scaling_factor"])
        # One tensor for every call: the UNet's CUDA graph, when there is one, holds it.
        self._timestep = torch.tensor([config.timestep], device=device)
        self.fast: FastPath | None = None
        if fast is None:  # the plain path: every network cast once to `dtype` on `device`
            for network in (vre, vae, unet):
                place(network, device, dtype)
            self.vre_dtype = self.decode_dtype = dtype
            self.transfer = Transfer(device, dtype)
        else:  # places the networks and wraps their calls (model/networks/fastpath/)
            self.fast = FastPath.load(
                fast, vre, vae, unet, device=device, dtype=dtype, timestep=self._timestep
            )
            self.vre_dtype, self.decode_dtype = self.fast.vre_dtype, self.fast.decode_dtype
            self.transfer = self.fast.transfer

    @classmethod
    def from_pretrained(
        cls,
        weights_dir: Path | str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        merge_lora: bool = True,
        latent: LatentMode = "mode",
        fast: FastPathConfig | None = None,
    ) -> OSDFaceRestorer:
        """Load strictly from a weights folder (layout in `weights.layout`); never unpickles.

        The VRE is read from `vre.safetensors` (`osdface weights convert` writes it from the
        released pickles); the LoRA is merged at load if no merged UNet exists. `fast` turns
        on the fast path (model/networks/fastpath/); None keeps the plain path.
        """
        layout = WeightsLayout(Path(weights_dir))
        config = OSDFaceConfig.load(layout.osdface)
        vre = load_vre(layout, config)
        vae = load_vae(layout)
        unet = load_unet(layout, config, merged=merge_lora)
        files = {
            str(p.relative_to(layout.root)): sha256_file(p)
            for p in (layout.vre, layout.lora, layout.merged_unet_dir / SAFETENSORS_NAME)
            if p.is_file()
        }
        return cls(
            vre,
            vae,
            unet,
            alpha_bar(layout, config.timestep),
            config,
            device=torch.device(device),
            dtype=dtype,
            latent=latent,
            files=files,
            fast=fast,
        )

    # --- the one call --------------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self, images: torch.Tensor, *, latent: LatentMode | None = None, seed: int | None = None
    ) -> RestoreOutput:
        """Restore a batch of aligned faces.

        Args:
            images: (B, 3, S, S) float in [0, 1], RGB, S = config.image_size, any device.
            latent: "mode" (deterministic) or "sample" (the release's `.sample()`, with `seed`).

        Returns:
            RestoreOutput with images (B, 3, S, S) float32 in [0, 1], RGB, on the CPU.
        """
        latent = latent or self.latent
        self._check_input(images, latent)
        batch = images.shape[0]
        size = batch if self.fast is None else self.fast.run_size(batch)
        if size != batch:  # compiled for fixed sizes: pad, restore, drop the extra rows
            full = self(padded(images, size), latent=latent, seed=seed)
            return RestoreOutput(full.images[:batch], full.timings)
        clock = self._clock()
        lq = normalize(self.transfer.to_device(images))  # (B, 3, S, S) in [-1, 1]

        # 1. tokens: the VRE's prompt, (B, 77, 1024). Independent of 2., so with `overlap` it
        #    runs on a second CUDA stream, concurrently with the encoder.
        with clock("vre", side=True):
            prompt = self.vre(lq.to(self.vre_dtype)).to(self.dtype)
        # 2. encode: z_L, (B, 4, S/8, S/8)
        with clock("vae_encode"):
            posterior = self.vae.encode(lq.to(self.dtype)).latent_dist
            z = self._latent(posterior, latent, seed) * self.scaling_factor
        prompt = clock.join(prompt)
        # 3. one UNet step at T_L, then the clean latent
        with clock("unet"):
            eps = self.unet(z, self._timestep, encoder_hidden_states=prompt).sample
            x0 = x0_from_eps(z, eps, self.alpha_bar)
        # 4. decode, back to [0, 1]
        with clock("vae_decode"):
            decoded = self.vae.decode((x0 / self.scaling_factor).to(self.decode_dtype)).sample
            out = denormalize(decoded)
        return RestoreOutput(self.transfer.to_host(out), clock.seconds())

    def _clock(self) -> StageClock:
        if self.fast is None:  # a device sync after each stage
            return StageClock(self.device, events=False)
        return StageClock(self.device, events=True, side=self.fast.side)

    def _latent(
        self, posterior: DiagonalGaussianDistribution, latent: LatentMode, seed: int | None
    ) -> torch.Tensor:
        if latent == "mode":
            return posterior.mode()
        generator = torch.Generator(device=self.device)
        generator.manual_seed(0 if seed is None else seed)
        return posterior.sample(generator=generator)

    def _check_input(self, images: torch.Tensor, latent: str) -> None:
        s = self.config.image_size
        if not isinstance(images, torch.Tensor):
            raise InvalidInputError(f"expected a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s) or images.shape[0] == 0:
            raise InvalidInputError(
                f"expected (B, 3, {s}, {s}) with B >= 1, got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise InvalidInputError(f"expected a float tensor in [0, 1], got {images.dtype}")
        if latent not in get_args(LatentMode):
            raise InvalidInputError(f"latent must be 'mode' or 'sample', got {latent!r}")
        lo, hi = images.aminmax()
        if not (torch.isfinite(lo) and torch.isfinite(hi)) or lo < 0 or hi > 1:
            raise InvalidInputError(f"pixel values must lie in [0, 1], got [{lo:.3g}, {hi:.3g}]")

    # --- service helpers -----------------------------------------------------------------

    def warmup(self, batch_size: int = 1) -> None:
        """Run one batch so kernels, allocator and any compilation are ready before traffic.

        With CUDA graphs, compilation or cuDNN autotuning on, every batch size the fast path
        captures is run; cuDNN autotunes here only (`cudnn_benchmark`), the flag is put back
        after. Call it on the thread that will call the restorer: inductor's CUDA graphs
        (`compile_mode="reduce-overhead"`) belong to the thread that recorded them.
        """
        s = self.config.image_size
        sizes = (batch_size,) if self.fast is None else self.fast.warmup_sizes(batch_size)
        with cudnn_autotuning(self.fast is not None and self.fast.config.cudnn_benchmark):
            for size in sizes:
                self(torch.full((size, 3, s, s), 0.5))

    def worker_stream(self) -> torch.cuda.Stream | None:
        """A CUDA stream for the one thread that calls this restorer to run its calls on, apart
        from other threads' default-stream work; None on the CPU or when the fast path's
        `worker_stream` is off. The caller enters it (`torch.cuda.stream`) around each call."""
        if self.device.type != "cuda":
            return None
        if self.fast is None:
            return torch.cuda.Stream(self.device)
        return self.fast.worker_stream()

    def describe(self) -> dict:
        return {
            "files": self.files,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "latent": self.latent,
            "timestep": self.config.timestep,
            "num_tokens": self.config.vre.num_tokens,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
            "fast_path": {"enabled": False} if self.fast is None else self.fast.describe(),
        }
