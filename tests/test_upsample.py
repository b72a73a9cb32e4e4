"""Subpixel upsampling computes diffusers' nearest-2x + 3x3 `Upsample2D`, with less work.

The reference is diffusers' own layer (and, independently of it, `F.interpolate` + `F.conv2d`);
the GMAC counts come from torch's flop counter on the full-size architecture (meta tensors).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.upsampling import Upsample2D
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from model.errors import InvalidInputError
from model.networks.fastpath.upsample import SubpixelUpsample2D, use_subpixel_upsampling

CONFIGS = Path(__file__).resolve().parents[1] / "model/configs/sd21-base"


def random_upsample(c_in: int, c_out: int, dtype=torch.float32, seed: int = 0) -> Upsample2D:
    torch.manual_seed(seed)
    up = Upsample2D(c_in, use_conv=True, out_channels=c_out).to(dtype).eval()
    nn.init.normal_(up.conv.bias)  # diffusers' default init is small; make the bias matter
    return up


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("c_in", "c_out", "h", "w"), [(8, 8, 5, 7), (6, 10, 1, 1), (4, 3, 16, 16)])
def test_equals_nearest_upsample_then_conv_in_float64(c_in, c_out, h, w, channels_last) -> None:
    up = random_upsample(c_in, c_out, torch.float64)
    x = torch.randn(2, c_in, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = F.conv2d(
        F.interpolate(x, scale_factor=2, mode="nearest"), up.conv.weight, up.conv.bias, padding=1
    )
    with torch.no_grad():
        got = SubpixelUpsample2D.from_upsample(up)(x)
        assert torch.equal(up(x), want)  # the reference is diffusers' layer
    assert got.shape == (2, c_out, 2 * h, 2 * w)
    assert (got - want).abs().max().item() < 1e-12
    assert got.is_contiguous(
        memory_format=torch.channels_last
        if channels_last and h * w > 1
        else torch.contiguous_format
    )


def test_float32_differs_by_rounding_only() -> None:
    up = random_upsample(32, 32)
    x = torch.randn(1, 32, 12, 12)
    with torch.no_grad():
        got, want = SubpixelUpsample2D.from_upsample(up)(x), up(x)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_accepts_the_doubled_output_size_only() -> None:
    sub = SubpixelUpsample2D.from_upsample(random_upsample(4, 4))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert sub(x, (12, 12)).shape == (1, 4, 12, 12)
        with pytest.raises(InvalidInputError, match="asked for"):
            sub(x, (13, 12))


@pytest.mark.parametrize(
    "layer",
    [
        Upsample2D(4, use_conv=False),
        Upsample2D(4, use_conv=True, use_conv_transpose=True),
        Upsample2D(4, use_conv=True, kernel_size=5, padding=2),
        Upsample2D(4, use_conv=True, norm_type="ln_norm", eps=1e-5, elementwise_affine=True),
        Upsample2D(4, use_conv=True, interpolate=False),
        nn.Conv2d(4, 4, 3, padding=1),
    ],
    ids=["no_conv", "transpose", "kernel5", "norm", "no_interpolate", "not_upsample"],
)
def test_other_layers_are_left_alone(layer: nn.Module) -> None:
    assert SubpixelUpsample2D.from_upsample(layer) is None
    wrapper = nn.Sequential(layer)
    assert use_subpixel_upsampling(wrapper) == 0 and wrapper[0] is layer


def test_upsample_around_a_lora_layer_is_left_alone() -> None:
    """Unmerged LoRA wraps the convolution: summing its kernels would drop the adapter."""

    class Wrapped(nn.Module):
        def __init__(self, conv: nn.Conv2d):
            super().__init__()
            self.base_layer = conv

    up = random_upsample(4, 4)
    up.conv = Wrapped(up.conv)
    assert SubpixelUpsample2D.from_upsample(up) is None


def full_size(name: str, cls):
    with torch.device("meta"):
        return cls.from_config(cls.load_config(CONFIGS / name))


def gmacs(fn) -> float:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops() / 2e9


def test_full_size_decoder_and_unet_do_less_work() -> None:
    vae, unet = full_size("vae", AutoencoderKL), full_size("unet", UNet2DConditionModel)
    z = torch.empty(1, 4, 64, 64, device="meta")
    prompt = torch.empty(1, 77, 1024, device="meta")

    def decode():
        return vae.decode(z).sample

    def denoise():
        return unet(z, 399, encoder_hidden_states=prompt).sample

    before = gmacs(decode), gmacs(denoise)
    assert use_subpixel_upsampling(vae) == 3 and use_subpixel_upsampling(unet) == 3
    after = gmacs(decode), gmacs(denoise)
    # Hand count: the three 3x3 convs at 2x resolution, 36 vs 16 MACs per input pixel and
    # channel pair, the latter over (H + 1) x (W + 1).
    dec_before = (512 * 512 * 128**2 + 512 * 512 * 256**2 + 256 * 256 * 512**2) * 9 / 1e9
    dec_after = (512 * 2048 * 65**2 + 512 * 2048 * 129**2 + 256 * 1024 * 257**2) * 4 / 1e9
    assert before[0] - after[0] == pytest.approx(dec_before - dec_after, rel=1e-6)
    unet_before = (1280**2 * 16**2 + 1280**2 * 32**2 + 640**2 * 64**2) * 9 / 1e9
    unet_after = (1280 * 5120 * 9**2 + 1280 * 5120 * 17**2 + 640 * 2560 * 33**2) * 4 / 1e9
    assert before[1] - after[1] == pytest.approx(unet_before - unet_after, rel=1e-6)
    assert round(after[0]) == 1066 and round(after[1]) == 385
