"""Helpers for the training tests: synthetic faces on disk and tiny stage configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from model.config import OSDFaceConfig, VREConfig
from tests.tiny_weights import TINY_VAE, write_tiny_weights
from train.config import DataConfig, EngineConfig
from train.data import FaceDataset, list_images, validation_batch
from weights.convert import convert_released
from weights.layout import WeightsLayout

# 32x32 faces: 32 -> 16 in the VQ encoder, so 256 token positions as at full size; the VAE
# makes 4x4 latents of them.
TRAIN_VRE = VREConfig(
    ch=8,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    resolution=32,
    z_channels=16,
    norm_groups=4,
    codebook_size=96,
    codebook_dim=16,
    num_tokens=77,
    proj_hidden=8,
    prompt_dim=32,
)
TRAIN_OSDFACE = OSDFaceConfig(image_size=32, lora_rank=4, lora_alpha=4, vre=TRAIN_VRE)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread: with two on a busy 2-core machine, OpenMP's
    hand-offs cost more than the arithmetic (measured: 10-20x slower steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_face(rng: np.random.Generator, size: int) -> np.ndarray:
    """A face-like (size, size, 3) uint8 RGB picture: background, head, eyes, mouth, hair."""
    img = np.zeros((size, size, 3), np.uint8)
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    for y in range(size):
        img[y] = (top + (bottom - top) * y / size).astype(np.uint8)
    c = size // 2
    skin = tuple(int(v) for v in rng.integers(90, 240, 3))
    axes = (int(size * rng.uniform(0.25, 0.32)), int(size * rng.uniform(0.32, 0.4)))
    cv2.ellipse(img, (c, c + size // 16), axes, 0, 0, 360, skin, -1)
    hair = tuple(int(v) for v in rng.integers(0, 120, 3))
    cv2.ellipse(img, (c, c - size // 5), (axes[0], size // 6), 0, 180, 360, hair, -1)
    eye_y, dx = c - size // 16, int(size * rng.uniform(0.1, 0.14))
    for x in (c - dx, c + dx):
        cv2.circle(img, (x, eye_y), max(1, size // 24), (255, 255, 255), -1)
        cv2.circle(img, (x, eye_y), max(1, size // 48), (30, 30, 30), -1)
    mouth = tuple(int(v) for v in rng.integers(60, 200, 3))
    cv2.ellipse(img, (c, c + size // 4), (size // 8, size // 24), 0, 0, 180, mouth, -1)
    return img


def write_faces(folder: Path, count: int, size: int = 32, seed: int = 0) -> Path:
    """`count` synthetic faces as PNG files in `folder` (RGB written as OpenCV's BGR)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        rgb = synthetic_face(rng, size)
        cv2.imwrite(str(folder / f"{i:05d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def write_train_weights(root: Path) -> Path:
    """Tiny released-layout weights at 32 px for stage 2. The VAE keeps full resolution (one
    block, no downsampling) and its default init, so a tiny LoRA can steer its output: the
    overfit test then measures the training, not the capacity of a random 4x4-latent decoder."""
    write_tiny_weights(root, config=TRAIN_OSDFACE, prepare=False)
    full_res = {
        **TINY_VAE,
        "block_out_channels": (8,),
        "down_block_types": ("DownEncoderBlock2D",),
        "up_block_types": ("UpDecoderBlock2D",),
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoencoderKL(**full_res).save_pretrained(root / "sd21-base/vae", safe_serialization=True)
    convert_released(WeightsLayout(root), TRAIN_OSDFACE)
    return root


def tiny_engine(out: Path) -> EngineConfig:
    """The stage tests' engine: CPU float32, batches of 2, no checkpoint or validation unless a
    test asks (engine_* overrides), logs every step, no tracker."""
    return EngineConfig(
        output_dir=out,
        batch_size=2,
        mixed_precision="no",
        gradient_checkpointing=False,
        checkpoint_every=1000,
        val_every=1000,
        log_every=1,
        tracker="none",
        progress=False,
    )


def tiny_data(faces: Path) -> DataConfig:
    """The stage tests' data: the 32 px faces in `faces` for both training and validation."""
    return DataConfig(train_dir=faces, val_dir=faces, image_size=32, num_workers=0, val_images=2)


def with_overrides(config, overrides: dict):
    """`config` with `overrides` set (`engine_x` sets `config.engine.x`), validated."""
    for key, value in overrides.items():
        if key.startswith("engine_"):
            config.engine = dataclasses.replace(config.engine, **{key[len("engine_") :]: value})
        else:
            setattr(config, key, value)
    config.validate()
    return config


def fixed_batch(faces: Path, n: int = 2) -> dict[str, torch.Tensor]:
    """The first `n` faces of `faces` as a deterministic 32 px batch (no flips)."""
    ds = FaceDataset(list_images(faces), 32, DataConfig().degradation, seed=0, hflip=False)
    return validation_batch(ds, n)


def restore_args(inputs: Path, outputs: Path, weights: Path) -> list[str]:
    """`osdface restore` of aligned faces in `inputs` into `outputs`, on CPU in float32."""
    return [
        "restore",
        str(inputs),
        "-o",
        str(outputs),
        "--weights",
        str(weights),
        "--aligned",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]
