"""Discriminators: a patch-GAN on images (stage 1) and a latent discriminator (stage 2).

The latent discriminator judges SD latents with forward-diffusion noise at a random t, through
a frozen copy of the SD UNet's encoder half (conv_in, time embedding, down blocks, mid block)
and small trainable heads on each of those blocks' outputs. The features are frozen but NOT
run under `no_grad` for the generator's loss: gradients must flow through them back to the
fake latents and on to the LoRA (a sibling codebase wraps them in `no_grad`, and its GAN term
trains nothing; `tests/test_train_stage2.py` checks ours does).
"""

from __future__ import annotations

import copy
import math

import torch
from diffusers.models import UNet2DConditionModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.losses import hinge_d_loss, softplus_d_loss, softplus_g_loss


def _groups(channels: int, most: int = 32) -> int:
    return math.gcd(channels, most)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / VQGAN): image (B, 3, S, S) in [-1, 1] -> logits (B, 1, s, s).

    GroupNorm where VQGAN has BatchNorm, so there are no running statistics to keep in step
    across processes, and real and fake can share one batch.
    """

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < layers else 1
            c = channels * mult
            seq += [
                nn.Conv2d(channels * prev, c, 4, stride, 1, bias=False),
                nn.GroupNorm(_groups(c), c),
                nn.LeakyReLU(0.2),
            ]
        seq.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.main(image)


class LatentFeatures(nn.Module):
    """Frozen copy of a UNet's conv_in, time embedding, down blocks and mid block.

    (B, 4, h, w) latents and timesteps (B,) -> one feature map per down block and the mid
    block's output. The cross-attention sees one zero token: the discriminator is
    unconditional (there is no text encoder in OSDFace).
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.conv_in = copy.deepcopy(unet.conv_in)
        self.time_proj = copy.deepcopy(unet.time_proj)
        self.time_embedding = copy.deepcopy(unet.time_embedding)
        self.down_blocks = copy.deepcopy(unet.down_blocks)
        self.mid_block = copy.deepcopy(unet.mid_block)
        self.context_dim: int = unet.config["cross_attention_dim"]
        # What each down block and the mid block emit (their last ResNet's channels).
        widths: list[int] = list(unet.config["block_out_channels"])
        self.channels = [*widths, widths[-1]]
        self.requires_grad_(False).eval()
        self.gradient_checkpointing = False

    def train(self, mode: bool = True) -> LatentFeatures:
        return super().train(False)  # frozen: always eval

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> list[torch.Tensor]:
        dtype = self.conv_in.weight.dtype
        x = latents.to(dtype)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        context = x.new_zeros(x.shape[0], 1, self.context_dim)
        h, feats = self.conv_in(x), []
        for block in self.down_blocks:
            h = self._run(self._down, block, h, emb, context)
            feats.append(h)
        h = self._run(self._mid, self.mid_block, h, emb, context)
        feats.append(h)
        return feats

    def _run(self, fn, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, block, *args, use_reentrant=False)
        return fn(block, *args)

    @staticmethod
    def _down(block, h, emb, context):
        if getattr(block, "has_cross_attention", False):
            return block(hidden_states=h, temb=emb, encoder_hidden_states=context)[0]
        return block(hidden_states=h, temb=emb)[0]

    @staticmethod
    def _mid(block, h, emb, context):
        if getattr(block, "has_cross_attention", False):
            return block(h, emb, encoder_hidden_states=context)
        return block(h, emb)


class LatentDiscriminator(nn.Module):
    """D(noised latent) -> logits per position of every feature level; only the heads train."""

    alphas_cumprod: torch.Tensor  # a buffer, (1000,) float64

    def __init__(
        self,
        unet: UNet2DConditionModel,
        alphas_cumprod: torch.Tensor,
        head_channels: int = 128,
        timesteps: tuple[int, int] = (0, 999),
    ) -> None:
        super().__init__()
        self.features = LatentFeatures(unet)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(c, head_channels, 3, padding=1),
                nn.GroupNorm(_groups(head_channels), head_channels),
                nn.SiLU(),
                nn.Conv2d(head_channels, 1, 1),
            )
            for c in self.features.channels
        )
        self.register_buffer("alphas_cumprod", alphas_cumprod.double().clone(), persistent=False)
        self.timesteps = timesteps

    def logits(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """latents (B, 4, h, w) already noised at `timesteps` (B,) -> logits (B, P) float32."""
        feats = self.features(latents, timesteps)
        logits = [
            head(f.to(next(head.parameters()).dtype)).flatten(1)
            for head, f in zip(self.heads, feats, strict=True)
        ]
        return torch.cat(logits, dim=1).float()

    def noise(
        self, latents: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z_t | z_0): sqrt(ab_t) z + sqrt(1 - ab_t) eps, t uniform in `timesteps`, per sample.

        Drawn on the CPU from `generator` (saved with each checkpoint) so runs resume exactly,
        then moved to the latents' device.
        """
        b = latents.shape[0]
        lo, hi = self.timesteps
        t = torch.randint(lo, hi + 1, (b,), generator=generator)
        eps = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        ab = self.alphas_cumprod.cpu()[t].float().view(b, 1, 1, 1)
        eps, ab, t = eps.to(latents.device), ab.to(latents.device), t.to(latents.device)
        return ab.sqrt() * latents.float() + (1 - ab).sqrt() * eps, t

    def forward(
        self, fake: torch.Tensor, generator: torch.Generator, real: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The GAN losses, so that DDP sees one forward per backward.

        Without `real`: the generator's loss softplus(-D(fake)); gradients reach `fake`
        through the frozen features (call it with the heads frozen). With `real`: the
        discriminator's loss softplus(-D(real)) + softplus(D(fake)), `fake` detached here so
        no generator gradient is computed; real and fake are noised independently and judged
        in one batch.
        """
        if real is None:
            noised, t = self.noise(fake, generator)
            return softplus_g_loss(self.logits(noised, t))
        both, t = self.noise(torch.cat([real.detach(), fake.detach()]), generator)
        real_logits, fake_logits = self.logits(both, t).chunk(2)
        return softplus_d_loss(real_logits, fake_logits)


def patch_d_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the patch discriminator; real and fake in one batch, fake detached."""
    logits = disc(torch.cat([real.detach(), fake.detach()]))
    real_logits, fake_logits = logits.chunk(2)
    return hinge_d_loss(real_logits, fake_logits)
