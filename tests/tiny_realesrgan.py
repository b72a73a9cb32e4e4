"""Tiny random Real-ESRGAN networks written as the RELEASED `.pth` files.

spandrel's RRDBNet is built small (few features, one or two blocks), its old-style keys are
renamed here, by hand, to the BasicSR names the released files use, and the result is saved
with `torch.save({"params_ema": state})` like `RealESRGAN_x{2,4}plus.pth`, then converted by the
real `convert_background` (as `osdface weights convert` does). The module itself is returned
too, as the reference the loaded network must reproduce.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from spandrel.architectures.ESRGAN import ESRGAN
from torch import nn

from weights.background import FOLDER, RELEASED, convert_background


def tiny_rrdbnet(scale: int, *, features: int = 8, blocks: int = 1, seed: int = 0) -> nn.Module:
    """spandrel's RRDBNet as Real-ESRGAN builds it: x4, or x2 through a 2x2 pixel unshuffle."""
    torch.manual_seed(seed)
    shuffle = 4 // scale if scale != 4 else None
    net = ESRGAN(
        in_nc=3 * (4 // scale) ** 2,
        out_nc=3,
        num_filters=features,
        num_blocks=blocks,
        scale=4,
        shuffle_factor=shuffle,
    )
    with torch.no_grad():  # default init gives near-constant output; spread it a little
        for p in net.parameters():
            p.mul_(1.5)
    return net.eval()


def released_keys(module: nn.Module, blocks: int) -> dict[str, torch.Tensor]:
    """spandrel's sequential names -> BasicSR's (`conv_first`, `body.N.rdbK.convJ`, ...)."""
    fixed = {
        "model.0": "conv_first",
        f"model.1.sub.{blocks}": "conv_body",
        "model.3": "conv_up1",
        "model.6": "conv_up2",
        "model.8": "conv_hr",
        "model.10": "conv_last",
    }
    block = re.compile(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
    out = {}
    for key, value in module.state_dict().items():
        if m := block.match(key):
            out[f"body.{m[1]}.rdb{m[2]}.conv{m[3]}.{m[4]}"] = value.clone()
        else:
            prefix, _, kind = key.rpartition(".")
            out[f"{fixed[prefix]}.{kind}"] = value.clone()
    return out


def write_tiny_realesrgan(
    root: Path,
    name: str,
    *,
    features: int = 8,
    blocks: int = 1,
    seed: int = 0,
    convert: bool = True,
) -> nn.Module:
    """Write `<root>/realesrgan/RealESRGAN_x?plus.pth` (and convert it); the reference module."""
    filename, scale = RELEASED[name]
    net = tiny_rrdbnet(scale, features=features, blocks=blocks, seed=seed)
    target = root / FOLDER / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": released_keys(net, blocks)}, target)
    if convert:
        convert_background(root, name)
    return net
