"""Stage 1's VQ autoencoder: the restorer's VRE encoder, a codebook and a mirrored decoder.

The encoder, `quant_conv` and codebook are the very modules `model.networks.vre` builds, under the
same names, so the LQ autoencoder's `tokenizer_state_dict()` loads strictly into
`VisualRepresentationEmbedder` (everything but its projection, which stage 2 trains).

Images are (B, 3, S, S) float in [-1, 1], RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.config import VREConfig
from model.networks.vre import (
    AttnBlock,
    MidBlock,
    ResnetBlock,
    VQEncoder,
    group_norm,
    nearest_codes,
)

TOKENIZER_PREFIXES = ("encoder.", "quant_conv.", "quantize.")


def encoder_input(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] image -> what the VQ encoder sees.

    `VisualRepresentationEmbedder.features` normalises its [-1, 1] input a second time,
    (x - 0.5) / 0.5, as the released pipeline does; training feeds the encoder the same thing
    so the exported tokenizer sees at inference what it saw in training.
    """
    return (image - 0.5) / 0.5


def freeze_unused_norms(module: nn.Module) -> None:
    """`AttnBlock.norm2` only exists so the released checkpoint loads strictly; it is never
    used in `forward`. Freezing it keeps DDP from waiting for gradients that never come."""
    for m in module.modules():
        if isinstance(m, AttnBlock):
            m.norm2.requires_grad_(False)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with the straight-through estimator.

    The codebook is learnt by gradient: loss = ||sg[z] - e||^2 + beta ||z - sg[e]||^2
    (codebook term plus commitment term, van den Oord et al.), both means over all elements.
    """

    def __init__(self, size: int, dim: int, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(size, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / size, 1.0 / size)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, C, H, W) -> (z_q with straight-through gradient, VQ loss, indices (B, H*W))."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        with torch.autocast(z.device.type, enabled=False):  # distances in fp32, not bf16
            _, index = nearest_codes(flat.detach().float(), self.embedding.weight.detach())
        z_q = self.embedding(index).view(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()
        return z_q, loss, index


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UpLevel(nn.Module):
    """One decoder level: ResNet blocks, each followed by attention where the resolution has
    it, then x2 upsampling on every level but the last (the block, attn, upsample names)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.upsample: Upsample | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class VQDecoder(nn.Module):
    """The encoder mirrored: features (B, z, R/2^(L-1), ...) -> image (B, 3, R, R) in ~[-1, 1].

    Taming-style, as the released checkpoint's decoders: num_res_blocks + 1 ResNet blocks per
    level, attention at the same resolutions as the encoder, nearest upsampling.
    """

    def __init__(self, config: VREConfig) -> None:
        super().__init__()
        g = config.norm_groups
        levels = len(config.ch_mult)
        block_in = config.ch * config.ch_mult[-1]
        resolution = config.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, g)
        ups: list[UpLevel] = []
        for level in reversed(range(levels)):
            block_out = config.ch * config.ch_mult[level]
            stage = UpLevel()
            for _ in range(config.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != 0:
                stage.upsample = Upsample(block_in)
                resolution *= 2
            ups.insert(0, stage)  # indexed by level, as the encoder's `down`
        self.up = nn.ModuleList(ups)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, config.in_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        for stage in reversed(self.up):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(stage, h, use_reentrant=False)
            else:
                h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class VQOutput:
    recon: torch.Tensor  # (B, 3, S, S), ~[-1, 1]
    vq_loss: torch.Tensor  # scalar
    features: torch.Tensor  # (B, codebook_dim, h, w) pre-quantisation (after quant_conv)
    indices: torch.Tensor  # (B, h*w) code per position


class VQAutoencoder(nn.Module):
    """encoder -> quant_conv -> quantize -> post_quant_conv -> decoder."""

    def __init__(self, config: VREConfig, beta: float = 0.25) -> None:
        super().__init__()
        self.config = config
        self.encoder = VQEncoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_dim, beta)
        self.post_quant_conv = nn.Conv2d(config.codebook_dim, config.z_channels, 1)
        self.decoder = VQDecoder(config)
        self.gradient_checkpointing = False
        freeze_unused_norms(self)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True
        self.decoder.gradient_checkpointing = True

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """[-1, 1] image (B, 3, S, S) -> pre-quantisation features (B, codebook_dim, h, w)."""
        x = encoder_input(image)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            h = checkpoint(self.encoder, x, use_reentrant=False)
        else:
            h = self.encoder(x)
        return self.quant_conv(h)

    def forward(self, image: torch.Tensor) -> VQOutput:
        features = self.features(image)
        z_q, vq_loss, indices = self.quantize(features)
        recon = self.decoder(self.post_quant_conv(z_q))
        return VQOutput(recon, vq_loss, features, indices)

    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def tokenizer_state_dict(self) -> dict[str, torch.Tensor]:
        """Encoder, quant_conv and codebook under the names `VisualRepresentationEmbedder` uses."""
        return {
            k: v.detach().float().cpu().contiguous()
            for k, v in self.state_dict().items()
            if k.startswith(TOKENIZER_PREFIXES)
        }
