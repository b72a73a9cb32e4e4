"""The OSDFace LoRA: key and shape checks, then peft adapters attached or fused into the UNet."""

from __future__ import annotations

import torch

# From the defining module: the package root re-exports a dummy class first (see weights/load.py).
from diffusers.models import UNet2DConditionModel
from torch import nn

from model.config import OSDFaceConfig
from model.errors import LoraKeyError


def _lora_module_path(key: str) -> tuple[str, str]:
    """`unet.<path>.lora_A.weight` -> (`<path>`, `A`)."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if key.startswith("unet.") and key.endswith(suffix):
            return key[len("unet.") : -len(suffix)], part
    raise LoraKeyError(f"LoRA key {key!r} is not of the form unet.<module>.lora_[AB].weight")


def check_lora(unet: nn.Module, lora: dict[str, torch.Tensor], rank: int) -> list[str]:
    """Every LoRA tensor must name a Linear/Conv2d of the UNet and fit its shape.

    Returns the module paths the LoRA adapts. Raises LoraKeyError naming every stray key.
    """
    modules = dict(unet.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    targets: dict[str, nn.Linear | nn.Conv2d] = {}
    stray, bad = [], []
    for key, tensor in lora.items():
        path, part = _lora_module_path(key)
        module = modules.get(path)
        if not isinstance(module, nn.Linear | nn.Conv2d):
            stray.append(key)
            continue
        targets[path] = module
        pairs.setdefault(path, {})[part] = tensor
    if stray:
        raise LoraKeyError(f"{len(stray)} LoRA keys match no UNet Linear/Conv2d: {stray[:8]}")
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            bad.append(f"{path}: only lora_{next(iter(ab))}")
            continue
        bad.extend(_lora_shape_problems(path, targets[path], ab["A"], ab["B"], rank))
    if bad:
        raise LoraKeyError(f"LoRA tensors do not fit their modules: {bad[:8]}")
    return sorted(pairs)


def _lora_shape_problems(
    path: str, module: nn.Linear | nn.Conv2d, a: torch.Tensor, b: torch.Tensor, rank: int
) -> list[str]:
    weight = module.weight
    out_features, in_features = weight.shape[0], weight.shape[1]
    kernel = tuple(weight.shape[2:])
    want_a = (rank, in_features, *kernel)
    want_b = (out_features, rank, *((1,) * len(kernel)))
    problems = []
    if tuple(a.shape) != want_a:
        problems.append(f"{path}.lora_A {tuple(a.shape)} != {want_a}")
    if tuple(b.shape) != want_b:
        problems.append(f"{path}.lora_B {tuple(b.shape)} != {want_b}")
    return problems


ADAPTER_NAME = "osdface"


def attach_lora(
    unet: UNet2DConditionModel, lora: dict[str, torch.Tensor], config: OSDFaceConfig
) -> UNet2DConditionModel:
    """Inject the LoRA as peft adapter layers (unmerged), scaled alpha / rank."""
    check_lora(unet, lora, config.lora_rank)
    unet.load_lora_adapter(lora, prefix="unet", adapter_name=ADAPTER_NAME)
    # diffusers infers alpha = rank from a file without alphas; the config's alpha rescales.
    unet.set_adapters([ADAPTER_NAME], weights=[config.lora_scale])
    return unet


def merge_lora(
    unet: UNet2DConditionModel, lora: dict[str, torch.Tensor], config: OSDFaceConfig
) -> UNet2DConditionModel:
    """Fuse W += scale * B @ A into the UNet's weights and drop the adapter layers."""
    check_lora(unet, lora, config.lora_rank)
    unet.load_lora_adapter(lora, prefix="unet", adapter_name=ADAPTER_NAME)
    unet.fuse_lora(lora_scale=config.lora_scale, adapter_names=[ADAPTER_NAME])
    unet.unload_lora()
    return unet
