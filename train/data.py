"""Training data: aligned HQ faces from a folder and their synthetic low-quality twins.

Degradation (two stages, as the paper takes from WaveFace; every range in
`train.config.DegradationConfig`)::

    stage:  blur (isotropic or anisotropic Gaussian) -> downsample -> Gaussian noise -> JPEG
    lq = resize_back(stage_2(stage_1(hq)))      # stage 2 runs with its probability

Seeding is per sample, not per worker: the random generator of sample `index` in epoch
`epoch` is `default_rng([seed, epoch, index])`, so the same face gets the same degradation
whatever the number of workers, processes or restarts (resume is exact).

Images are RGB float32 in [0, 1], HWC inside this module (OpenCV's layout), CHW tensors out;
BGR appears only at the OpenCV read and JPEG calls.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from model.errors import ImageDecodeError
from train.config import DegradationConfig, DegradationStage

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_INTERPOLATION = {
    "area": cv2.INTER_AREA,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursively), sorted so indices are stable."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def read_rgb(path: Path, size: int) -> np.ndarray:
    """An image file -> (size, size, 3) float32 RGB in [0, 1] (resized if it is not square)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ImageDecodeError(f"{path}: not a readable image")
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if rgb.shape[:2] != (size, size):
        mode = cv2.INTER_AREA if rgb.shape[0] > size else cv2.INTER_CUBIC
        rgb = cv2.resize(rgb, (size, size), interpolation=mode)
    return rgb.astype(np.float32) / 255.0


# --- degradation -----------------------------------------------------------------------------


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """(size, size) float32 Gaussian, covariance R(theta) diag(sx^2, sy^2) R(theta)^T, sum 1."""
    half = size // 2
    ax = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    c, s = math.cos(theta), math.sin(theta)
    rotation = np.array([[c, -s], [s, c]])
    cov = rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T
    inv = np.linalg.inv(cov)
    grid = np.stack([xx, yy], axis=-1)  # (size, size, 2)
    kernel = np.exp(-0.5 * np.einsum("...i,ij,...j->...", grid, inv, grid))
    return (kernel / kernel.sum()).astype(np.float32)


@dataclass
class StageParams:
    """What one degradation stage drew (None: that step was skipped)."""

    blur: tuple[float, float, float] | None = None  # sigma_x, sigma_y, theta
    downsample: float | None = None
    resize_mode: str | None = None
    noise_sigma: float | None = None
    jpeg_quality: int | None = None


def sample_stage(
    rng: np.random.Generator, stage: DegradationStage, modes: tuple[str, ...]
) -> StageParams | None:
    """Draw one stage's parameters; None when the whole stage is skipped."""
    if rng.random() >= stage.prob:
        return None
    p = StageParams()
    if rng.random() < stage.blur_prob:
        sx = rng.uniform(*stage.blur_sigma)
        if rng.random() < stage.isotropic_prob:
            p.blur = (sx, sx, 0.0)
        else:
            p.blur = (sx, rng.uniform(*stage.blur_sigma), rng.uniform(0.0, math.pi))
    if rng.random() < stage.downsample_prob:
        p.downsample = rng.uniform(*stage.downsample)
        p.resize_mode = modes[rng.integers(len(modes))]
    if rng.random() < stage.noise_prob:
        p.noise_sigma = rng.uniform(*stage.noise_sigma)
    if rng.random() < stage.jpeg_prob:
        lo, hi = stage.jpeg_quality
        p.jpeg_quality = int(rng.integers(lo, hi + 1))
    return p


def apply_stage(
    img: np.ndarray, p: StageParams, kernel_size: int, rng: np.random.Generator
) -> np.ndarray:
    """One stage on (H, W, 3) float32 RGB in [0, 1]; returns the same layout and range."""
    if p.blur is not None:
        kernel = gaussian_kernel(kernel_size, *p.blur)
        img = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    if p.downsample is not None:
        assert p.resize_mode is not None, "sample_stage draws the factor and mode together"
        h, w = img.shape[:2]
        size = (max(4, round(w / p.downsample)), max(4, round(h / p.downsample)))
        img = cv2.resize(img, size, interpolation=_INTERPOLATION[p.resize_mode])
    if p.noise_sigma is not None:
        img = img + rng.normal(0.0, p.noise_sigma / 255.0, img.shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0)
    if p.jpeg_quality is not None:
        img = jpeg(img, p.jpeg_quality)
    return img


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of (H, W, 3) float32 RGB [0, 1] (OpenCV encodes BGR)."""
    bgr = cv2.cvtColor((img * 255.0).round().astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if decoded is None:
        raise RuntimeError("OpenCV failed to decode the JPEG it encoded")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def degrade(
    hq: np.ndarray, config: DegradationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[StageParams | None]]:
    """HQ (S, S, 3) float32 RGB [0, 1] -> LQ of the same shape and range, and what was drawn."""
    size = hq.shape[:2][::-1]
    img, drawn = hq, []
    for stage in (config.first, config.second):
        p = sample_stage(rng, stage, config.resize_modes)
        drawn.append(p)
        if p is not None:
            img = apply_stage(img, p, stage.kernel_size, rng)
    mode = config.resize_modes[rng.integers(len(config.resize_modes))]
    if img.shape[:2][::-1] != size:
        img = cv2.resize(img, size, interpolation=_INTERPOLATION[mode])
    return np.clip(img, 0.0, 1.0).astype(np.float32), drawn


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: independent of worker, rank and restart."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


# --- dataset and sampler ---------------------------------------------------------------------


class FaceItem(TypedDict):
    """One face: `gt` and `lq` (3, H, W) float32 RGB in [0, 1]; `index` into the file list."""

    gt: torch.Tensor
    lq: torch.Tensor
    index: int


class FaceDataset(Dataset):
    """Aligned HQ faces and their degraded twins.

    Items are keyed `(epoch, index)` (see `TrainBatches`), or a plain index (epoch 0).
    Returns {"gt": (3, S, S), "lq": (3, S, S)} float32 RGB in [0, 1], and "index".
    """

    def __init__(
        self,
        files: list[Path],
        image_size: int,
        degradation: DegradationConfig,
        *,
        seed: int,
        hflip: bool,
    ) -> None:
        self.files = files
        self.image_size = image_size
        self.degradation = degradation
        self.seed = seed
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: int | tuple[int, int]) -> FaceItem:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = sample_rng(self.seed, epoch, index)
        hq = read_rgb(self.files[index], self.image_size)
        if self.hflip and rng.random() < 0.5:
            hq = np.ascontiguousarray(hq[:, ::-1])
        lq, _ = degrade(hq, self.degradation, rng)
        return {"gt": _to_chw(hq), "lq": _to_chw(lq), "index": index}


def _to_chw(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


class TrainBatches(Sampler[list[tuple[int, int]]]):
    """Endless batches of `(epoch, index)` keys for one rank, starting at global step `start`.

    Each epoch is a permutation seeded by (seed, epoch); global batch g of the epoch takes
    positions [g*B*W, (g+1)*B*W) and rank r its slice of B. The position is the step count,
    so resuming at step k yields exactly the batches an uninterrupted run would.
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
    ) -> None:
        self.length, self.batch_size = length, batch_size
        self.seed, self.rank, self.world, self.start = seed, rank, world, start
        self.per_epoch = length // (batch_size * world)
        if self.per_epoch < 1:
            raise ValueError(
                f"{length} images are fewer than one global batch ({batch_size} x {world})"
            )

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while True:
            epoch, g = divmod(step, self.per_epoch)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
            first = (g * self.world + self.rank) * self.batch_size
            yield [(epoch, int(i)) for i in order[first : first + self.batch_size]]
            step += 1


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # workers are the parallelism; OpenCV's own threads would oversubscribe


def train_loader(
    dataset: FaceDataset,
    batch_size: int,
    *,
    seed: int,
    rank: int,
    world: int,
    start: int,
    num_workers: int,
) -> DataLoader:
    """A loader of endless batches for this rank from global step `start` (see TrainBatches)."""
    sampler = TrainBatches(len(dataset), batch_size, seed=seed, rank=rank, world=world, start=start)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )


def validation_batch(dataset: FaceDataset, count: int) -> dict[str, torch.Tensor]:
    """The first `count` validation faces, degraded with epoch 0: the same every time."""
    items = [dataset[(0, i)] for i in range(min(count, len(dataset)))]
    return {
        "gt": torch.stack([it["gt"] for it in items]),
        "lq": torch.stack([it["lq"] for it in items]),
    }
