"""Where the networks' weights and the batches live: device, dtype, memory format, copies.

All of it happens once, at load, except the host <-> device copies of `Transfer`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from model.device import TORCH_DTYPES
from model.networks.fastpath.config import FastPathConfig
from model.networks.fastpath.upsample import use_subpixel_upsampling

logger = logging.getLogger(__name__)

# The VAE's parts that run in the decoder's dtype; the others run in the compute dtype.
VAE_DECODER_SIDE = ("decoder", "post_quant_conv")


def resolve_decode_dtype(config: FastPathConfig, dtype: torch.dtype) -> torch.dtype:
    """The VAE decoder's dtype: bf16 instead of fp16 (range), else the compute dtype."""
    if config.decode_dtype != "auto":
        return TORCH_DTYPES[config.decode_dtype]
    return torch.bfloat16 if dtype == torch.float16 else dtype


def place(
    module: nn.Module, device: torch.device, dtype: torch.dtype, *, channels_last: bool = False
) -> nn.Module:
    """`module` (in place) on `device` in `dtype`, NHWC if asked, in eval mode without grads."""
    # nn.Module.to, not diffusers' override (which warns about fp32-kept modules SD has none of).
    module = nn.Module.to(module, device=device, dtype=dtype)
    if channels_last and device.type == "cpu":
        _own_copies_nhwc(module)
    elif channels_last:
        module = nn.Module.to(module, memory_format=torch.channels_last)
    return module.eval().requires_grad_(False)


def place_vae(
    vae: nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    decode_dtype: torch.dtype,
    *,
    channels_last: bool,
) -> nn.Module:
    """Encoder side in the compute dtype, decoder side in `decode_dtype`, each cast once."""
    for name, child in vae.named_children():
        part_dtype = decode_dtype if name in VAE_DECODER_SIDE else dtype
        place(child, device, part_dtype, channels_last=channels_last)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def _own_copies_nhwc(module: nn.Module) -> None:
    """Copy every CPU tensor once: 4-D ones to NHWC, the others as they are.

    Tensors loaded from safetensors are views of one mmap of the file. Converting only the 4-D
    weights would leave the others holding the whole mapping, and with it every page already
    read, resident beside the copies (+3 GiB at full size); copying all releases it.
    """
    for t in (*module.parameters(), *module.buffers()):
        fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
        t.data = t.data.clone(memory_format=fmt)


def subpixel_upsampling(module: nn.Module) -> None:
    """Swap the module's nearest-2x + 3x3 layers for their subpixel form (upsample.py).

    Before the cast: the summed kernels are rounded once, from the loaded weights.
    """
    replaced = use_subpixel_upsampling(module)
    if replaced:
        logger.info("%s: %d upsampling layers run subpixel", type(module).__name__, replaced)


def sdpa_attention(*models: nn.Module) -> None:
    """diffusers' PyTorch-SDPA attention processors in each (VAE, UNet)."""
    from diffusers.models.attention import AttentionMixin
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in models:
        if not isinstance(model, AttentionMixin):
            raise TypeError(f"{type(model).__name__} has no diffusers attention processors")
        model.set_attn_processor(AttnProcessor2_0())


@dataclass(frozen=True)
class Transfer:
    """Copies of the restorer's batches between the host and `device`.

    The plain path copies straight into the compute dtype; the fast path copies float32 (the VRE
    may run in fp32), in NHWC when the networks are, through page-locked memory when `pin`.
    """

    device: torch.device
    dtype: torch.dtype  # of the batch on the device
    channels_last: bool = False
    pin: bool = False

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) on any device -> on `device`, in `dtype` (and NHWC if set)."""
        if self.pin and images.device.type == "cpu" and not images.is_pinned():
            images = images.pin_memory()
        x = images.to(self.device, self.dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def to_host(self, out: torch.Tensor) -> torch.Tensor:
        """Device output -> float32 NCHW on the CPU (through pinned memory when set)."""
        out = out.float().contiguous()
        if not self.pin:
            return out.cpu()
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host
