"""Real-ESRGAN weight files for background super-resolution: read without pickle, checked, built.

The released files (`RealESRGAN_x2plus.pth`, `RealESRGAN_x4plus.pth`) are `torch.save` pickles
holding `{"params_ema": state_dict}` in BasicSR's RRDBNet key layout. `osdface weights convert`
(and `fetch --background`) reads them through the restricted unpickler (`weights.pickle_safe`,
nothing pickled is executed), checks their keys and shapes against the layout the architecture
implies, and saves them beside as `.safetensors`. Loading reads only the safetensors, checks
them again, and hands them to spandrel (`ModelLoader().load_from_state_dict`), which builds the
network: no RRDBNet code lives here.

Layout: `<weights>/realesrgan/RealESRGAN_x{2,4}plus.pth` and the `.safetensors` converted from it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError
from torch import nn

from model.atomic import atomic_path
from model.config import BACKGROUND_SCALES
from model.errors import StateDictMismatchError, WeightsError, WeightsNotFoundError
from weights.layout import BACKGROUND_FOLDER, background_file, sha256_file
from weights.pickle_safe import load_checkpoint, tensors_only
from weights.strict import read_safetensors

logger = logging.getLogger(__name__)

FOLDER = BACKGROUND_FOLDER
# Network name -> (released file name, output scale). Both files are RRDBNet with 23 blocks;
# the x2 file folds the input 2x2 pixels into 12 channels first (pixel unshuffle).
RELEASED: dict[str, tuple[str, int]] = {
    name: (background_file(Path(), scale, ".pth").name, scale)
    for name, scale in BACKGROUND_SCALES.items()
}
STATE_KEYS = ("params_ema", "params")  # BasicSR keeps the EMA weights first when it has them
GROWTH = 32  # channels each dense-block convolution adds (fixed in Real-ESRGAN and spandrel)
_BLOCK_KEY = re.compile(r"body\.(\d+)\.rdb[123]\.conv[1-5]\.(weight|bias)$")


@dataclass(frozen=True)
class BackgroundNet:
    """A loaded Real-ESRGAN network: `module` maps (B, 3, H, W) in [0, 1] to (B, 3, sH, sW)."""

    name: str
    module: nn.Module
    scale: int
    files: dict[str, str]  # relative path -> sha256

    @property
    def align(self) -> int:
        """Input pixels folded together before the body (x2: a 2x2 pixel unshuffle)."""
        return 4 // self.scale


def released_path(root: Path, name: str) -> Path:
    if name not in RELEASED:
        raise WeightsError(f"unknown background network {name!r}; one of {sorted(RELEASED)}")
    return background_file(root, RELEASED[name][1], ".pth")


def present_backgrounds(root: Path) -> list[str]:
    """The networks whose released or converted file is in the weights folder `root`."""
    return [
        name
        for name in RELEASED
        if any(p.is_file() for p in (released_path(root, name), _converted(root, name)))
    ]


def _converted(root: Path, name: str) -> Path:
    return released_path(root, name).with_suffix(".safetensors")


def expected_shapes(num_blocks: int, features: int, in_channels: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Real-ESRGAN RRDBNet file (BasicSR names), with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(name: str, out_ch: int, in_ch: int) -> None:
        shapes[f"{name}.weight"] = (out_ch, in_ch, 3, 3)
        shapes[f"{name}.bias"] = (out_ch,)

    conv("conv_first", features, in_channels)
    for block in range(num_blocks):
        for rdb in (1, 2, 3):
            for k in range(1, 6):
                out_ch = features if k == 5 else GROWTH
                conv(f"body.{block}.rdb{rdb}.conv{k}", out_ch, features + (k - 1) * GROWTH)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        conv(name, features, features)
    conv("conv_last", 3, features)
    return shapes


def check_released_state(what: str, state: dict[str, torch.Tensor], scale: int) -> None:
    """Raise StateDictMismatchError naming every missing, unexpected and mis-shaped tensor.

    The block count and width are read from the file; the input channels follow from the
    scale (3 for x4, 12 for x2's unshuffled input).
    """
    if "conv_first.weight" not in state:
        raise StateDictMismatchError(what, missing=["conv_first.weight"])
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    num_blocks = max(blocks) + 1 if blocks else 0
    features = int(state["conv_first.weight"].shape[0])
    in_channels = 3 * (4 // scale) ** 2
    expected = expected_shapes(num_blocks, features, in_channels)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), expected[k])
        for k in expected
        if k in state and tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or mismatched or num_blocks == 0:
        raise StateDictMismatchError(what, missing, unexpected, mismatched)


def read_released(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a released `.pth`, through the restricted unpickler."""
    ckpt = load_checkpoint(path)
    if isinstance(ckpt, dict):
        for key in STATE_KEYS:
            if isinstance(ckpt.get(key), dict):
                return tensors_only(ckpt[key])
    raise WeightsError(f"{path}: no {' or '.join(STATE_KEYS)} state dict inside")


def convert_background(root: Path, name: str) -> Path:
    """The released `.pth` of `name` -> checked `.safetensors` beside it (no pickled code runs)."""
    pth = released_path(root, name)
    if not pth.is_file():
        raise WeightsNotFoundError(
            f"{pth} is missing: run `osdface weights fetch --background --dir {root}`"
        )
    state = read_released(pth)
    check_released_state(f"{name} ({pth})", state, RELEASED[name][1])
    target = _converted(root, name)
    metadata = {"source": json.dumps({pth.name: sha256_file(pth)})}
    with atomic_path(target) as part:
        save_file({k: v.contiguous() for k, v in state.items()}, str(part), metadata=metadata)
    logger.info("wrote %s (%d tensors)", target, len(state))
    return target


def load_background_net(
    root: Path, name: str, device: torch.device, dtype: torch.dtype
) -> BackgroundNet:
    """Load `name` ('realesrgan-x2' / 'realesrgan-x4') from the weights folder `root`, strictly.

    Only the converted safetensors are read; loading never unpickles.
    """
    converted, scale = _converted(root, name), RELEASED[name][1]
    if not converted.is_file():
        step = "convert" if released_path(root, name).is_file() else "fetch --background"
        raise WeightsNotFoundError(
            f"{converted} is missing: run `osdface weights {step} --dir {root}`"
        )
    state = read_safetensors(converted)
    check_released_state(f"{name} ({converted})", state, scale)
    net = _build(name, state, scale)
    files = {str(converted.relative_to(root)): sha256_file(converted)}
    return BackgroundNet(name, net.to(device=device, dtype=dtype).eval(), scale, files)


def _build(name: str, state: dict[str, torch.Tensor], scale: int) -> nn.Module:
    try:
        descriptor = ModelLoader().load_from_state_dict({"params_ema": state})
    except UnsupportedModelError as exc:
        raise WeightsError(f"{name}: spandrel does not recognise the architecture") from exc
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.architecture.id != "ESRGAN":
        raise WeightsError(f"{name}: expected an ESRGAN network, got {descriptor.architecture.id}")
    if descriptor.scale != scale:
        raise WeightsError(f"{name}: the file is a x{descriptor.scale} network, not x{scale}")
    # spandrel's own load is strict; the counts match only if none of ours was dropped.
    built = len(descriptor.model.state_dict())
    if built != len(state):
        raise WeightsError(f"{name}: {len(state)} tensors in the file, {built} in the network")
    return descriptor.model
