"""What both training stages share: their datasets, and freezing a module for a while."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from train.config import Stage1Config, Stage2Config
from train.data import FaceDataset, list_images, validation_batch


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Temporarily no gradients for `module`'s parameters (the discriminator while the
    generator's loss goes through it); those that required grad are restored after."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)


def build_datasets(
    config: Stage1Config | Stage2Config, seed: int
) -> tuple[FaceDataset, dict[str, torch.Tensor] | None]:
    """Training faces and the fixed validation batch (None without a val folder)."""
    data = config.data
    if data.train_dir is None:
        raise ValueError("data.train_dir is required (a folder of aligned HQ faces)")
    train = FaceDataset(
        list_images(data.train_dir), data.image_size, data.degradation, seed=seed, hflip=data.hflip
    )
    val = None
    if data.val_dir is not None and data.val_images > 0:
        held_out = FaceDataset(
            list_images(data.val_dir), data.image_size, data.degradation, seed=seed + 1, hflip=False
        )
        val = validation_batch(held_out, data.val_images)
    return train, val
