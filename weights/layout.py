"""The on-disk layout of a weights folder, and file checksums.

Layout of a weights folder::

    sd21-base/unet/      config.json, diffusion_pytorch_model.safetensors   (diffusers layout)
    sd21-base/vae/       config.json, diffusion_pytorch_model.safetensors
    sd21-base/scheduler/ scheduler_config.json
    osdface/associate_2.ckpt                 released (Lightning pickle)
    osdface/embedding_change_weights.pth     released (pickle)
    osdface/pytorch_lora_weights.safetensors released (peft-style LoRA)
    osdface/config.json                      model constants (OSDFaceConfig)
    osdface/vre.safetensors                  written by `osdface weights convert`
    osdface/unet-merged/                     written by `osdface weights merge`
    facexlib/detection_Resnet50_Final.pth    face detector (facexlib's file names)
    realesrgan/RealESRGAN_x{2,4}plus.pth     background networks; .safetensors beside: converted
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from model.errors import WeightsNotFoundError

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class WeightsLayout:
    """Paths inside one weights folder."""

    root: Path

    @property
    def sd21(self) -> Path:
        return self.root / "sd21-base"

    @property
    def unet_dir(self) -> Path:
        return self.sd21 / "unet"

    @property
    def vae_dir(self) -> Path:
        return self.sd21 / "vae"

    @property
    def scheduler_dir(self) -> Path:
        return self.sd21 / "scheduler"

    @property
    def osdface(self) -> Path:
        return self.root / "osdface"

    @property
    def released_vre(self) -> Path:
        return self.osdface / "associate_2.ckpt"

    @property
    def released_projection(self) -> Path:
        return self.osdface / "embedding_change_weights.pth"

    @property
    def lora(self) -> Path:
        return self.osdface / "pytorch_lora_weights.safetensors"

    @property
    def vre(self) -> Path:
        return self.osdface / "vre.safetensors"

    @property
    def merged_unet_dir(self) -> Path:
        return self.osdface / "unet-merged"

    @property
    def facexlib(self) -> Path:
        return self.root / "facexlib"


BACKGROUND_FOLDER = "realesrgan"


def background_file(root: Path, scale: int, suffix: str = ".safetensors") -> Path:
    """Real-ESRGAN x`scale` (weights/background.py): the released `.pth`, or the `.safetensors`
    converted from it, which is the one loaded. Here so the command line can check for it
    before torch is imported."""
    return root / BACKGROUND_FOLDER / f"RealESRGAN_x{scale}plus{suffix}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def require(path: Path, hint: str) -> Path:
    if not path.exists():
        raise WeightsNotFoundError(f"{path} is missing ({hint})")
    return path


def missing_for_restore(layout: WeightsLayout, *, merged: bool = True) -> list[str]:
    """What the restorer cannot load without, as short descriptions; [] when all is there.

    Cheap (existence only, no hashing): the command line asks before importing torch. Either
    form of the UNet will do: merged, or base + LoRA.
    """
    missing = []
    if not layout.root.is_dir():
        return [f"the folder {layout.root} does not exist"]
    if not layout.vre.is_file():  # loading never converts the released pickles
        missing.append("osdface/vre.safetensors (`osdface weights convert` writes it)")
    merged_file = layout.merged_unet_dir / SAFETENSORS_NAME
    base = [layout.unet_dir / "config.json", layout.unet_dir / SAFETENSORS_NAME, layout.lora]
    if not (merged and merged_file.is_file()) and not all(p.is_file() for p in base):
        missing += [str(p.relative_to(layout.root)) for p in base if not p.is_file()]
    for path in (
        layout.vae_dir / "config.json",
        layout.vae_dir / SAFETENSORS_NAME,
        layout.scheduler_dir / "scheduler_config.json",
    ):
        if not path.is_file():
            missing.append(str(path.relative_to(layout.root)))
    return missing
