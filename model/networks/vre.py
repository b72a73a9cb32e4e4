"""Visual Representation Embedder (VRE): an aligned face -> 77 prompt tokens for the UNet.

The LQ tokenizer of OSDFace: a Taming/DAEFR-style VQ encoder, `quant_conv`, the LQ codebook,
then a selection of 77 distinct codebook vectors ordered by how close the face's features came to
them, projected from 512 to 1024 dims (the SD2.1 cross-attention width).

Parameter names match the released checkpoint once its `vqvae_LQ.` prefix is stripped, so the
weights load strictly. Inference only: the training-time autoencoder lives in `train/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from model.config import VREConfig


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm, swish, conv3x3, twice, with a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the spatial positions, residual.

    The released block also carries `norm2`, used only when it cross-attends to a second
    feature map during the association stage; the encoder never does, but the tensor is in the
    checkpoint and is kept so the load stays strict.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(channels, groups)
        self.norm2 = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm1(x)
        q = self.q(hn).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = self.k(hn).flatten(2).transpose(1, 2)
        v = self.v(hn).flatten(2).transpose(1, 2)
        # SDPA's default scale is C^-0.5, the released block's scale.
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right and bottom by one, then a 3x3 stride-2 convolution without padding."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class DownLevel(nn.Module):
    """One encoder level: ResNet blocks, each followed by attention where the resolution has
    it, then the stride-2 downsample on every level but the last (the block, attn, downsample
    names of the release)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.downsample: Downsample | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i](h)
        if self.downsample is not None:
            h = self.downsample(h)
        return h


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution (names as released)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class VQEncoder(nn.Module):
    """Image (B, 3, R, R) -> features (B, z_channels, R / 2^(L-1), R / 2^(L-1))."""

    def __init__(self, config: VREConfig) -> None:
        super().__init__()
        g = config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList()
        resolution = config.resolution
        in_mult = (1, *config.ch_mult)
        for level, mult in enumerate(config.ch_mult):
            block_in, block_out = config.ch * in_mult[level], config.ch * mult
            stage = DownLevel()
            for _ in range(config.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if resolution in config.attn_resolutions:
                    stage.attn.append(AttnBlock(block_in, g))
            if level != len(config.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(stage)
        self.mid = MidBlock(block_in, g)
        self.norm_out = group_norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = stage(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Codebook(nn.Module):
    """The LQ codebook, (codebook_size, codebook_dim); named like the released quantizer."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)


class PromptProjection(nn.Module):
    """TwoLayerConv1x1: tokens (B, T, 512) -> (B, T, 1024); both SiLUs are in the release."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_dim, hidden, 1)
        self.conv2 = nn.Conv1d(hidden, out_dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.transpose(1, 2)  # (B, 512, T): convolve over the token axis
        x = F.silu(self.conv2(F.silu(self.conv1(x))))
        return x.transpose(1, 2)  # (B, T, 1024)


@contextmanager
def without_tf32() -> Iterator[None]:
    """IEEE fp32 for cuBLAS matmuls and cuDNN convolutions inside the block; restored after.

    The 77 tokens are a discrete choice. On CUDA, cuDNN's fp32 convolutions default to TF32
    (10-bit mantissa), enough to move a feature past another code and pick other tokens than
    the CPU does; without TF32 the VRE's choice is the CPU's up to fp32 summation order. The
    flags are process-wide: CUDA work other threads launch meanwhile also runs without TF32
    (slower for that moment, never less exact). They do nothing on the CPU. The legacy
    `allow_tf32` flags, as bench/ and tests/ set them: mixing them with the newer
    `fp32_precision` ones makes PyTorch refuse to read either.
    """
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def nearest_codes(features: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Nearest code per position, in float32.

    Args:
        features: (B, N, C) pre-quantisation features.
        codebook: (K, C) code vectors.

    Returns:
        `(distance, index)`, both (B, N): squared L2 distance to the nearest code and its index
        (the lowest index on ties). Expanded as |z|^2 + |e|^2 - 2 z.e, as the released quantizer
        computes it, so rounding picks the same codes.
    """
    z = features.float()
    e = codebook.float()
    d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * (z @ e.t())  # (B, N, K)
    return d.min(dim=-1)


def select_token_indices(
    distance: torch.Tensor, index: torch.Tensor, codebook_size: int, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_tokens` distinct codes met when walking positions by ascending distance.

    Vectorised over the batch; the same tokens as the authors' per-image loop (positions with
    equal distance are walked in position order).

    Args:
        distance: (B, N) each position's distance to its nearest code.
        index: (B, N) each position's nearest code.

    Returns:
        `(codes, valid)`, both (B, num_tokens): code indices in walk order, and False for the
        rows past the number of distinct codes (those tokens are zero vectors).
    """
    b, n = index.shape
    order = distance.argsort(dim=-1, stable=True)  # (B, N) positions by ascending distance
    walked = index.gather(1, order)  # (B, N) codes in walk order
    step = torch.arange(n, device=index.device).expand(b, n)
    first_step = torch.full((b, codebook_size), n, device=index.device, dtype=torch.long)
    first_step.scatter_reduce_(1, walked, step, reduce="amin")  # (B, K) first time each code met
    first_sorted, codes = first_step.sort(dim=-1, stable=True)  # unmet codes sort last (= n)
    k = min(num_tokens, codebook_size)
    codes, valid = codes[:, :k], first_sorted[:, :k] < n
    if k < num_tokens:
        pad = num_tokens - k
        codes = F.pad(codes, (0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    return codes, valid


class VisualRepresentationEmbedder(nn.Module):
    """Aligned faces -> prompt tokens for the UNet's cross-attention."""

    def __init__(self, config: VREConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = VQEncoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_dim, 1)
        self.quantize = Codebook(config.codebook_size, config.codebook_dim)
        self.projection = PromptProjection(
            config.codebook_dim, config.proj_hidden, config.prompt_dim
        )

    def features(self, lq: torch.Tensor) -> torch.Tensor:
        """lq (B, 3, H, W) in [-1, 1] -> pre-quantisation features (B, N, codebook_dim)."""
        # The released pipeline normalises the [-1, 1] image a second time ((x - 0.5) / 0.5,
        # so the encoder sees [-3, 1]); the released weights were trained and used that way.
        x = (lq - 0.5) / 0.5
        h = self.quant_conv(self.encoder(x))  # (B, 512, 16, 16)
        return h.flatten(2).transpose(1, 2)  # (B, 256, 512)

    def tokens(self, lq: torch.Tensor) -> torch.Tensor:
        """lq (B, 3, H, W) in [-1, 1] -> selected codebook vectors (B, num_tokens, 512).

        Without TF32 on CUDA (`without_tf32`), so the choice is the CPU's."""
        codebook = self.quantize.embedding.weight
        with without_tf32():
            distance, index = nearest_codes(self.features(lq), codebook)
        codes, valid = select_token_indices(
            distance, index, self.config.codebook_size, self.config.num_tokens
        )
        tokens = codebook[codes]  # (B, 77, 512)
        return tokens * valid.unsqueeze(-1).to(tokens.dtype)

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        """lq (B, 3, H, W) in [-1, 1] -> prompt (B, num_tokens, prompt_dim), without TF32."""
        with without_tf32():
            return self.projection(self.tokens(lq))
